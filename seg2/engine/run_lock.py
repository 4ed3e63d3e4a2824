"""
One run per output folder: a training (or ``--eval-only``) run holds an exclusive ``fcntl.flock``
on ``OUTPUT_DIR/.seg2_run.lock`` for its life, and a second run started on the same folder stops
with one line naming the first (pid, host, start time, command) instead of interleaving
``metrics.json``, ``log.txt`` and overwriting ``config.yaml`` and the checkpoints.

The kernel drops a ``flock`` when its process ends, however it ends (a crash, ``kill -9``), so a
lock is never left stuck; the file itself stays, holding the details of the last holder. A lock
taken again in the same process (``setup()`` and then the ``Trainer``, or several Trainers in one
script) is shared: it is counted and released with its last holder.
"""

import datetime
import errno
import fcntl
import logging
import os
import shlex
import socket
import sys
import threading
import weakref
from typing import Dict, List, Optional

from ..utils import Seg2Error

__all__ = ["LOCK_FILE", "RunLock", "acquire_run_lock"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".seg2_run.lock"

# realpath of the lock file -> [open file, count of RunLock objects holding it, owner pid]
_HELD: Dict[str, List] = {}
_MUTEX = threading.Lock()


class RunLock:
    """A holder of the run lock of one output folder (from :func:`acquire_run_lock`).
    :meth:`release` (also at garbage collection) gives it up; the lock is freed with the last
    holder in this process."""

    def __init__(self, key: str):
        self.path = key
        self._finalizer = weakref.finalize(self, _release, key)

    def release(self) -> None:
        self._finalizer()

    @property
    def held(self) -> bool:
        return self._finalizer.alive


def _release(key: str) -> None:
    with _MUTEX:
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _HELD[key]
            if entry[2] == os.getpid():
                # Unlock explicitly: forked children (DataLoader workers still alive) share the
                # open file, and closing our descriptor alone would leave it locked.
                fcntl.flock(entry[0].fileno(), fcntl.LOCK_UN)
            entry[0].close()


def _describe_holder(f) -> str:
    f.seek(0)
    text = f.read().strip()
    return text or "a process that has not written its details yet"


def acquire_run_lock(output_dir: str, what: Optional[str] = None) -> RunLock:
    """
    Take the run lock of ``output_dir`` (created if absent) for this process.

    Args:
        output_dir: the run's ``OUTPUT_DIR``.
        what: the command recorded for others to read (default: this process's command line).

    Raises:
        Seg2Error: another process holds it; the message names that process.
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise Seg2Error(f"OUTPUT_DIR={output_dir}: cannot create the folder ({e.strerror})") from e
    key = os.path.realpath(os.path.join(output_dir, LOCK_FILE))
    with _MUTEX:
        entry = _HELD.get(key)
        if entry is not None and entry[2] != os.getpid():  # inherited by a fork: not ours
            del _HELD[key]
            entry = None
        if entry is not None:
            entry[1] += 1
            return RunLock(key)
        try:
            f = open(key, "a+")
        except OSError as e:
            raise Seg2Error(
                f"OUTPUT_DIR={output_dir}: cannot create the run lock {key} ({e.strerror}): is "
                "the folder read-only?"
            ) from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.close()
                raise Seg2Error(f"OUTPUT_DIR={output_dir}: cannot lock {key} ({e.strerror})") from e
            holder = _describe_holder(f)
            f.close()
            raise Seg2Error(
                f"OUTPUT_DIR={output_dir} is in use by another seg2 run ({holder}); wait for "
                "it, stop "
                "it, or give this run another OUTPUT_DIR"
            ) from None
        command = what or " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        try:
            f.seek(0)
            f.truncate()
            f.write(
                f"pid {os.getpid()} on host {socket.gethostname()}, started {started}: {command}\n"
            )
            f.flush()
        except OSError as e:
            f.close()
            raise Seg2Error(
                f"OUTPUT_DIR={output_dir}: cannot write {key} ({e.strerror}): is the disk full?"
            ) from e
        _HELD[key] = [f, 1, os.getpid()]
        return RunLock(key)
