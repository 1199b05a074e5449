"""``dmpo-edge inspect BUNDLE|model.pt``: a readable summary.

For a bundle: stages with I/O names, shapes and dtypes, per-stage and cumulative FLOPs, precision and how it was
made, thresholds, accuracy report, engines present (numpy only: runs on a Jetson without torch). For a model.pt:
config, classes, metrics.
"""

from __future__ import annotations

__all__ = ["add_arguments", "run"]


def add_arguments(p) -> None:
    from .options import add_allow_pickle, add_json_lines

    p.add_argument("path", metavar="BUNDLE|MODEL.pt", help="bundle folder or checkpoint file")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of a bundle's files")
    add_json_lines(p, what="a bundle's manifest")
    add_allow_pickle(p)


def run(args) -> int:
    import json
    import os

    if args.json and os.path.isdir(args.path):
        from ..bundle import Bundle

        print(json.dumps(Bundle.load(args.path, verify=not args.no_verify).manifest, indent=2))
        return 0
    from ..compile.summary import summarize

    print(summarize(args.path, verify=not args.no_verify, allow_pickle=args.allow_pickle))
    return 0
