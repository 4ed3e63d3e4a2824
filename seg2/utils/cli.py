"""
The one entry point of seg2's tools: a :class:`~seg2.utils.Seg2Error` raised anywhere in a run (the
main process, a DataLoader worker, a process of ``launch``, an evaluator) ends the tool with the
single line ``seg2: error: <message>`` on stderr and exit status 1; its traceback only with
``--debug`` or ``SEG2_DEBUG=1``.

    parser = argparse.ArgumentParser(); add_debug_argument(parser)
    args = parser.parse_args()
    run_tool(main, args, debug=args.debug)
"""

import logging
import os
import re
import sys
import traceback
from typing import Callable, Optional

from . import Seg2Error

__all__ = ["add_debug_argument", "debug_enabled", "seg2_error_message", "run_tool"]

DEBUG_ENV = "SEG2_DEBUG"
# torch re-raises an exception of a DataLoader worker (torch._utils.ExceptionWrapper) or of a
# spawned process (torch.multiprocessing.ProcessRaisedException) with the whole formatted
# traceback as its message; the original message follows the last "<module>.Seg2Error: " line
# (the exception object itself does not cross the process boundary).
_WORKER = re.compile(r"\ACaught \w+ in (DataLoader worker process \d+)\.")
_LAST_SEG2_ERROR = re.compile(r"^(?:[\w.]+\.)?(?:Seg2Error|UnreadableFileError|InvalidArgument): ", re.MULTILINE)


def add_debug_argument(parser):
    """Add ``--debug`` (print the traceback of a Seg2Error too) to an argparse parser."""
    parser.add_argument(
        "--debug", action="store_true", help=f"print the traceback of a seg2 error too (or set {DEBUG_ENV}=1)"
    )
    return parser


def debug_enabled(flag: bool = False) -> bool:
    return bool(flag) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def seg2_error_message(exc: BaseException) -> Optional[str]:
    """The message of a :class:`Seg2Error`, also when torch re-raised it from a DataLoader worker
    (then followed by where it was raised) or from a process of ``launch``; None for any other
    exception."""
    text = str(exc)
    if not isinstance(exc, Seg2Error):
        if type(exc).__name__ != "ProcessRaisedException" or not _LAST_SEG2_ERROR.search(text):
            return None
    matches = list(_LAST_SEG2_ERROR.finditer(text))
    if not matches:
        return text
    message = text[matches[-1].end():].strip()
    worker = _WORKER.match(text)
    return f"{message} (in {worker.group(1)})" if worker else message


class _DropSeg2Tracebacks(logging.Filter):
    """detectron2's training loop logs every exception with its traceback ("Exception during
    training:") before re-raising it; for a Seg2Error the tool's one line says it all."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or seg2_error_message(exc) is None


_TRAIN_LOOP_LOGGERS = ("detectron2.engine.train_loop",)


def run_tool(main: Callable, *args, debug: bool = False, **kwargs):
    """
    ``main(*args, **kwargs)``, its return value returned; a Seg2Error (see
    :func:`seg2_error_message`) ends the process with ``seg2: error: <message>`` on stderr and
    exit status 1, after its traceback where :func:`debug_enabled`.
    """
    debug = debug_enabled(debug)
    filt = None if debug else _DropSeg2Tracebacks()
    if filt is not None:
        for name in _TRAIN_LOOP_LOGGERS:
            logging.getLogger(name).addFilter(filt)
    try:
        return main(*args, **kwargs)
    except Exception as e:
        message = seg2_error_message(e)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"seg2: error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if filt is not None:
            for name in _TRAIN_LOOP_LOGGERS:
                logging.getLogger(name).removeFilter(filt)
