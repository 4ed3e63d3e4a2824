"""
The one entry point of seg2's tools: a :class:`~seg2.utils.Seg2Error` raised anywhere in a run (the
main process, a DataLoader worker, a process of ``launch``, an evaluator) ends the tool with the
single line ``seg2: error: <message>`` on stderr and exit status 1; its traceback only with
``--debug`` or ``SEG2_DEBUG=1``.

    parser = argparse.ArgumentParser(); add_debug_argument(parser)
    args = parser.parse_args()
    run_tool(main, args, debug=args.debug)
"""

import errno
import logging
import os
import re
import sys
import traceback
from typing import Callable, Optional

from . import Seg2Error

__all__ = [
    "add_debug_argument",
    "check_device",
    "check_num_gpus",
    "debug_enabled",
    "seg2_error_message",
    "run_tool",
]

DEBUG_ENV = "SEG2_DEBUG"
# torch re-raises an exception of a DataLoader worker (torch._utils.ExceptionWrapper) or of a
# spawned process (torch.multiprocessing.ProcessRaisedException) with the whole formatted
# traceback as its message; the original message follows the last "<module>.Seg2Error: " line
# (the exception object itself does not cross the process boundary).
_WORKER = re.compile(r"\ACaught \w+ in (DataLoader worker process \d+)\.")
_LAST_SEG2_ERROR = re.compile(
    r"^(?:[\w.]+\.)?(?:Seg2Error|UnreadableFileError|InvalidArgument): ", re.MULTILINE
)


def add_debug_argument(parser):
    """Add ``--debug`` (print the traceback of a Seg2Error too) to an argparse parser."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of a seg2 error too (or set {DEBUG_ENV}=1)",
    )
    return parser


def debug_enabled(flag: bool = False) -> bool:
    return bool(flag) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def seg2_error_message(exc: BaseException) -> Optional[str]:
    """The message of a :class:`Seg2Error`, also when torch re-raised it from a DataLoader worker
    (then followed by where it was raised) or from a process of ``launch``; None for any other
    exception."""
    text = str(exc)
    yaml_error = _yaml_error_message(exc)
    if yaml_error is not None:
        return yaml_error
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        # A full disk or a read-only folder, wherever the write was (a log, metrics.json, events).
        return f"cannot write {exc.filename or 'a file'}: {exc.strerror}"
    if not isinstance(exc, Seg2Error):
        if type(exc).__name__ != "ProcessRaisedException" or not _LAST_SEG2_ERROR.search(text):
            return None
    matches = list(_LAST_SEG2_ERROR.finditer(text))
    if not matches:
        return text
    message = text[matches[-1].end() :].strip()
    worker = _WORKER.match(text)
    return f"{message} (in {worker.group(1)})" if worker else message


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _yaml_error_message(exc: BaseException) -> Optional[str]:
    """A YAML syntax error of a config file (yacs lets PyYAML's error through) as one line naming
    the file, line and column; None for other exceptions."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - detectron2 depends on PyYAML
        return None
    if not isinstance(exc, yaml.YAMLError):
        return None
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = (
        f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}"
        if mark is not None
        else "a config file"
    )
    problem = " ".join(
        str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p
    )
    return f"bad YAML in {where}: {problem or type(exc).__name__}"


def check_device(device: str, key: str = "MODEL.DEVICE") -> None:
    """A :class:`Seg2Error` naming ``key`` where ``device`` is a CUDA device this machine lacks
    (torch's own error is an assertion or a driver message deep in the model's ``.to()``)."""
    import torch

    if not str(device).startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise Seg2Error(
            f"{key}={device}, but torch finds no CUDA device on this machine "
            f"(torch.cuda.is_available() is False): set {key} cpu"
        )
    index = str(device).partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise Seg2Error(
            f"{key}={device}, but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def check_num_gpus(num_gpus: int) -> None:
    """A :class:`Seg2Error` for ``--num-gpus`` beyond this machine's CUDA devices (detectron2's
    ``launch`` then fails inside each process: an assertion, or DistributedDataParallel refusing
    ``device_ids`` for a CPU model)."""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus > 1 and num_gpus > have:
        raise Seg2Error(
            f"--num-gpus {num_gpus}, but torch finds {have} CUDA device(s) on this machine: "
            f"use --num-gpus {max(have, 1)}"
        )


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
