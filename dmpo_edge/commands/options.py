"""The options several commands share, each defined once (as Polygraphy keeps its CLI arguments in argument groups).

A command calls ``add_<option>(parser)`` instead of spelling the flag itself, so the name, default, metavar and help
of ``--backend``, ``--data``, ``--json``, ``--quiet`` ... read the same in every ``--help``. Values that need the
bundle to check (the backend) are checked when the command runs, with one :class:`DmpoEdgeError` line: an argparse
``choices`` error would exit from inside the parser with its own message format instead.

Kept numpy-free: every command's ``--help`` imports this module.
"""

from __future__ import annotations

__all__ = [
    "BACKEND_CHOICES", "add_allow_pickle", "add_backend", "add_batch_size", "add_bundle", "add_data",
    "add_in_flight", "add_json_lines", "add_json_report", "add_quiet", "add_thresholds", "add_trt_builder", "checked_backend",
]

# What a user may pass to --backend. ``null`` (no inference, for host-overhead measurements) is offered only where a
# command's output still means something without real stage outputs (run); eval/calibrate/bench would print noise.
BACKEND_CHOICES = ("auto", "ort", "trt")
BACKEND_HELP = ("auto (default: TensorRT when engines for this GPU are built and TensorRT is installed, "
                "else ONNX Runtime), ort (ONNX Runtime) or trt (TensorRT)")


def add_bundle(p) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by 'dmpo-edge compile'")


def add_backend(p, *, allow_null: bool = False) -> None:
    """``--backend`` with one default everywhere: ``auto``; checked later by :func:`checked_backend`."""
    extra = "; null runs no inference (measures the pipeline's own cost)" if allow_null else ""
    p.add_argument("--backend", default="auto", metavar="auto|ort|trt" + ("|null" if allow_null else ""),
                   help="backend that runs the stages: " + BACKEND_HELP + extra)


def checked_backend(name, bundle=None, *, where: str, allow_null: bool = False) -> str:
    """The backend name a command asked for, lower-cased and validated; ``auto`` resolved against ``bundle``."""
    from ..errors import DmpoEdgeError

    allowed = BACKEND_CHOICES + (("null",) if allow_null else ())
    name = str(name).lower()
    if name not in allowed:
        raise DmpoEdgeError(where, f"unknown backend '{name}'. Expected one of {', '.join(allowed)}")
    if bundle is None:
        return name
    from ..runtime.backends import resolve_backend_name

    return resolve_backend_name(name, bundle)


def _data_help(what: str, split: str | None, labelled: bool) -> str:
    sfx = f":{split}" if split else "[:train|val|test]"
    folder = "a folder with one sub-folder of images per class" if labelled else "a folder of images (class sub-folders optional)"
    return (f"{what}: {folder}, digits{sfx} (the bundled digits set), fashion-mnist{sfx} (Debian's dataset-fashion-mnist) "
            f"or idx:DIR{sfx} (MNIST-style IDX files)")


def add_data(p, flag: str = "--data", *, what: str = "labelled images", split: str | None = None,
             labelled: bool = True, required: bool = False, default=None, note: str = "") -> None:
    """A data set spec (``FOLDER`` or ``digits:SPLIT``), as :func:`dmpo_edge.calib.datasets.load_dataset` reads it."""
    help_ = _data_help(what, split, labelled) + (f". {note}" if note else "")
    if default is not None:
        help_ += f" (default {default})"
    p.add_argument(flag, required=required, default=default, metavar="DATA", help=help_)


def add_batch_size(p, *, default: int = 64, what: str = "stage batch size") -> None:
    p.add_argument("--batch-size", type=int, default=default, metavar="N", help=f"{what} (default {default})")


def add_json_report(p, *, what: str = "report") -> None:
    """``--json OUT``: also write the command's full report as JSON to a file (written atomically)."""
    p.add_argument("--json", metavar="OUT", help=f"also write the {what} (JSON) to OUT")


def add_json_lines(p, *, what: str) -> None:
    """``--json`` as a switch: print JSON to standard output instead of text (for commands that stream results)."""
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON instead of text")


def add_quiet(p, *, what: str = "no progress bars or progress messages") -> None:
    p.add_argument("--quiet", action="store_true", help=what)


def add_thresholds(p) -> None:
    p.add_argument("--thresholds", default=None, metavar="T0,T1,...",
                   help="explicit exit thresholds overriding the bundle's, one per early exit")



def serve_thresholds(text, where: str):
    """``--thresholds`` of the serving commands: None (the bundle's own) or a list, as the Triton model parses it."""
    if text is None:
        return None
    from ..errors import DmpoEdgeError
    from ..runtime.serve.triton_model import parse_thresholds

    try:
        return parse_thresholds(text)
    except ValueError:
        raise DmpoEdgeError(where, f"{text!r} is not a comma-separated list of numbers") from None

def add_in_flight(p, *, what: str = "batches") -> None:
    """Batches the pipeline keeps in flight; both spellings work in every command (``run`` said ``--in-flight``,
    ``bench`` ``--max-in-flight``, the pipeline's own name)."""
    p.add_argument("--max-in-flight", "--in-flight", dest="max_in_flight", type=int, default=2, metavar="N",
                   help=f"pipeline: {what} in flight (default 2)")


def add_allow_pickle(p) -> None:
    p.add_argument("--allow-pickle", action="store_true", help="load a pickled nn.Module checkpoint (runs code from it)")


def add_trt_builder(p) -> None:
    """The TensorRT builder settings ``compile`` (when it builds) and ``build`` share."""
    p.add_argument("--buckets", metavar="B1,B2", help="extra TensorRT optimisation profiles for these batch sizes, e.g. 1,8,32")
    p.add_argument("--workspace-mib", type=int, default=1024, metavar="MIB",
                   help="TensorRT builder workspace cap in MiB (default 1024: fits 8 GB Jetsons)")
    p.add_argument("--frontend", default="onnx", choices=("onnx", "torch-tensorrt"),
                   help="engine builder frontend: onnx (default: parse the bundle's graphs) or torch-tensorrt")
