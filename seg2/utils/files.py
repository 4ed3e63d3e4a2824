"""File helpers for seg2's caches: a content hash (cache keys), atomic writes that get the mode of
a normal file, and the removal of temporary files a killed run left behind."""

import hashlib
import logging
import os
import secrets
import time
from contextlib import contextmanager
from typing import Iterator, List

__all__ = ["file_sha256", "atomic_write", "TMP_PREFIX", "remove_stale_tmp_files"]

logger = logging.getLogger(__name__)

# Temporary files of atomic_write start with this, beside their destination.
TMP_PREFIX = ".tmp-"


def file_sha256(path: str) -> str:
    """SHA-256 of the bytes of ``path``, in hex (cache keys follow the content, not the name,
    size or modification time: an annotation file edited in place keeps its size)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator:
    """
    Open a temporary file beside ``path`` and rename it onto ``path`` when the block ends, so a
    reader never sees half a file; on an exception the temporary file is removed. The file is
    created as ``open()`` creates files (mode 0o666 less the umask: readable by others where the
    umask allows, like the rest of the output), not with the 0600 of ``tempfile.mkstemp``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(
            folder, f"{TMP_PREFIX}{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}"
        )
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_stale_tmp_files(folder: str, max_age_s: float = 600.0) -> List[str]:
    """
    Remove the temporary files of :func:`atomic_write` in ``folder`` (not its subfolders) that
    were last modified more than ``max_age_s`` ago: a run killed between creating one and renaming
    it left them. Younger ones may belong to a process writing now and are kept (a cache file
    takes milliseconds to write). Returns the removed paths.
    """
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for e in entries:
        if not e.name.startswith(TMP_PREFIX):
            continue
        try:
            if (
                e.is_file(follow_symlinks=False)
                and now - e.stat(follow_symlinks=False).st_mtime > max_age_s
            ):
                os.remove(e.path)
                removed.append(e.path)
        except FileNotFoundError:
            pass  # removed by a concurrent run
    if removed:
        logger.info(
            f"Removed {len(removed)} temporary file(s) left in {folder} by an interrupted run"
        )
    return removed
