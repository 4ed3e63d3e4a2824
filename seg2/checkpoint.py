"""
seg2's checkpointer, below :mod:`seg2.engine` and :mod:`seg2.inference`, which both load weights
with it (it imports :mod:`seg2.utils` and detectron2 only).
"""

import logging
import os
import pickle
import zipfile

from detectron2.checkpoint import DetectionCheckpointer

from .utils import Seg2Error

__all__ = ["Seg2Checkpointer"]

logger = logging.getLogger(__name__)


class Seg2Checkpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` whose loading of a truncated or damaged file (an
    interrupted save or copy) is a one-line :class:`Seg2Error` naming the file, not torch's
    ``PytorchStreamReader failed ...`` traceback."""

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            try:
                size = f"{os.path.getsize(filename)} bytes"
            except OSError:
                size = "unreadable"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise Seg2Error(
                f"cannot read the checkpoint {filename} ({size}): {reason}. A truncated file (a save "
                "or copy cut short) fails this way: delete it and resume from an earlier checkpoint "
                "(write its file name into last_checkpoint in the output folder), or set MODEL.WEIGHTS "
                "to another file"
            ) from e
