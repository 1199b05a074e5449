"""``dmpo-edge``: a thin command line that only composes library calls.

Each command lives in ``dmpo_edge/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when it runs, so ``--help`` stays numpy-only.
A :class:`DmpoEdgeError` is printed as one line with a non-zero exit; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import DmpoEdgeError

# name -> one-line help. The module dmpo_edge.commands.<name> provides the arguments and the work.
COMMANDS = {
    "tune": "tune a DMPO early-exit model on an image folder or the bundled digits set -> model.pt",
    "compile": "split model.pt into per-stage ONNX (fp32/fp16/int8), calibrate, write a bundle",
    "build": "build TensorRT engines for a bundle on this machine (the target)",
    "inspect": "print a readable summary of a bundle or a model.pt",
    "calibrate": "set a bundle's exit thresholds on labelled held-out data (budget, max drop, sweep)",
    "eval": "per-exit accuracy and the accuracy-versus-cost curve of a bundle",
    "run": "classify frames from a folder, video, camera or GStreamer pipeline with early exits",
    "bench": "trtexec-style latency benchmark of the early-exit pipeline against the static model",
    "demo": "the whole job on digits or fashion-mnist: tune, compile --int8, calibrate, run, bench, summary",
    "serve": "serve a bundle over HTTP and gRPC with Triton Inference Server (PyTriton; the 'serve' extra)",
    "export-triton": "write a Triton model repository (Python backend, dynamic batching) for a bundle",
}


def _module_name(cmd: str) -> str:
    return "dmpo_edge.commands." + ("eval_" if cmd == "eval" else cmd.replace("-", "_"))


def build_parser(with_commands: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmpo-edge",
        description="Early-exit DMPO classifiers on the edge: tune, compile, calibrate, run and benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"dmpo-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name == with_commands:
            importlib.import_module(_module_name(name)).add_arguments(p)
            if "--verbose" not in p._option_string_actions:
                p.add_argument("--verbose", action="store_true",
                               help="show library warnings and decoder output in full (default: one summary line)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        args = build_parser(cmd).parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 0
        from .quiet import library_output_collected

        with library_output_collected(verbose=bool(getattr(args, "verbose", False))) as noise:
            try:
                rc = int(importlib.import_module(_module_name(args.command)).run(args) or 0)
            except DmpoEdgeError as exc:
                err = exc
            else:
                err = None
        hidden = noise.summary()
        if err is not None:
            raise err
        if hidden:
            print(f"dmpo-edge: note: {hidden}", file=sys.stderr)
        return rc
    except DmpoEdgeError as exc:
        from .terminal import printable  # file names and class names may carry escapes or undecodable bytes

        hidden = locals().get("hidden")
        print(f"dmpo-edge: error: {printable(exc)}" + (f" ({hidden})" if hidden else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmpo-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
