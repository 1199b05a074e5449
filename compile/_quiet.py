"""Keep third-party chatter (exporters, ModelOpt, ONNX Runtime's quantizer) off the console during compile.

The compile progress bar says what runs; a failure still surfaces as an exception with its message.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

__all__ = ["quiet_tools"]

_PREFIXES = ("modelopt", "torch", "onnxscript", "onnx_ir", "onnxruntime", "onnxconverter_common", "polygraphy", "root")


@contextlib.contextmanager
def quiet_tools():
    """Silence loggers of the compile tools (ModelOpt sets explicit levels and a stdout handler on its own
    ``modelopt.onnx`` logger, so the parent's level alone is not enough), Python warnings and prints."""
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _PREFIXES]
    loggers = [logging.getLogger(n) for n in names] + [logging.getLogger()]
    levels = [lg.level for lg in loggers]
    disabled = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
        if lg.name.startswith("modelopt"):
            lg.disabled = True  # its handler writes to the stdout object captured at import time
    if "onnxruntime" in sys.modules:
        sys.modules["onnxruntime"].set_default_logger_severity(3)  # its C++ side warns about each dropped initializer
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv, dis in zip(loggers, levels, disabled):
            lg.setLevel(lv)
            lg.disabled = dis
