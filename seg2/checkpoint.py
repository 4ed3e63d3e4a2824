"""
seg2's checkpointer, below :mod:`seg2.engine` and :mod:`seg2.inference`, which both load weights
with it (it imports :mod:`seg2.utils` and detectron2 only).

What it adds to detectron2's ``DetectionCheckpointer``, each a one-line :class:`Seg2Error`:

* a truncated or damaged file, and a local file that does not exist, are named;
* weights that are not the model's: detectron2 logs the parameters it could not load and goes on
  (``--eval-only`` with a checkpoint of another architecture evaluated a random model). A strict
  load (evaluation, prediction, export, every resume) refuses a file that leaves any parameter of
  the model unloaded, holds entries the model does not have, or shapes that differ; a load that
  starts a training (``strict=False``: ImageNet backbones whose heads are new) only refuses a file
  of which nothing fits;
* ``--resume`` whose ``last_checkpoint`` names a deleted file falls back to the newest checkpoint
  left, with a warning naming both;
* saving writes a temporary file and renames it: a save cut short (a full disk, a read-only
  folder) removes the partial file, leaves ``last_checkpoint`` naming the previous checkpoint, and
  ends the run with one line naming the folder.
"""

import logging
import os
import pickle
import re
import secrets
import zipfile
from typing import List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .utils import Seg2Error

__all__ = ["Seg2Checkpointer", "EXPECTED_MISSING_SUFFIXES"]

logger = logging.getLogger(__name__)

# Entries a model may lack in a file without any effect on what it computes: BatchNorm's step
# counter (not in Caffe2/pycls files; used only with momentum=None). detectron2 itself already
# excuses pixel_mean/pixel_std (set from the config) and old anchor buffers.
EXPECTED_MISSING_SUFFIXES = ("num_batches_tracked",)

_PERIODIC = re.compile(r"^model_(\d+)\.pth$")


def _examples(keys, n=3) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return f" (e.g. {shown}{', ...' if len(keys) > n else ''})" if keys else ""


class Seg2Checkpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` with one-line errors for a file that cannot be read,
    does not exist, or does not fit the model, and atomic saves (see the module's docstring).

    Args:
        strict (bool): the default of :meth:`load`: True (evaluation, prediction, export) refuses
            a file that does not hold exactly the model's parameters; False (the initial weights
            of a training) refuses only a file of which no parameter fits. A resume from
            ``last_checkpoint`` is always strict.
    """

    def __init__(
        self, model, save_dir="", *, save_to_disk=None, strict: bool = True, **checkpointables
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = strict
        self._strict_now = strict
        self._loading = None

    # ---- loading -------------------------------------------------------------------------------

    def load(self, path, checkpointables=None, *, strict: Optional[bool] = None):
        """detectron2's ``load``; ``strict`` (default: the checkpointer's) as in the class docs."""
        if path:
            local = path.split("?", 1)[0]
            if "://" not in local and not os.path.isfile(local):
                what = (
                    "is a folder, not a checkpoint file"
                    if os.path.isdir(local)
                    else "does not exist"
                )
                raise Seg2Error(
                    f"the checkpoint {local} {what} (MODEL.WEIGHTS, or the file named in "
                    "last_checkpoint)"
                )
        self._strict_now = self.strict if strict is None else strict
        self._loading = path
        try:
            return super().load(path, checkpointables)
        except OSError as e:  # a download (detectron2://, https://) that failed
            raise Seg2Error(f"cannot get the checkpoint {path}: {e}") from e
        finally:
            self._loading = None

    def resume_or_load(self, path, *, resume=True):
        """
        With ``resume`` and a ``last_checkpoint`` in ``save_dir``: a strict load of the file it
        names (the newest checkpoint left, with a warning, where that file was deleted) and of
        every checkpointable. Otherwise ``path`` (the model only), by :attr:`strict`.
        """
        if resume and self.has_checkpoint():
            return self.load(self._resume_file(), strict=True)
        return self.load(path, checkpointables=[])

    def checkpoint_files(self) -> List[str]:
        """The periodic checkpoints of ``save_dir`` (``model_NNNNNNN.pth``) by iteration, then
        ``model_final.pth`` where it exists: the files a resume can start from."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        names = os.listdir(self.save_dir)
        periodic = sorted((int(m.group(1)), n) for n in names if (m := _PERIODIC.match(n)))
        ret = [os.path.join(self.save_dir, n) for _, n in periodic]
        if "model_final.pth" in names:
            ret.append(os.path.join(self.save_dir, "model_final.pth"))
        return ret

    def _resume_file(self) -> str:
        named = self.get_checkpoint_file()
        if os.path.isfile(named):
            return named
        left = self.checkpoint_files()
        tag = os.path.join(self.save_dir, "last_checkpoint")
        if not left:
            raise Seg2Error(
                f"--resume: {tag} names {named}, which does not exist, and {self.save_dir} "
                "holds no other "
                "checkpoint (model_NNNNNNN.pth, model_final.pth): run without --resume to start "
                "from MODEL.WEIGHTS"
            )
        logger.warning(
            f"--resume: {tag} names {named}, which does not exist; resuming from {left[-1]}, "
            "the newest "
            f"checkpoint left (of {len(left)})"
        )
        return left[-1]

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except (
            RuntimeError,
            EOFError,
            ValueError,
            OSError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
        ) as e:
            try:
                size = f"{os.path.getsize(filename)} bytes"
            except OSError:
                size = "unreadable"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise Seg2Error(
                f"cannot read the checkpoint {filename} ({size}): {reason}. A truncated file (a "
                "save "
                "or copy cut short) fails this way: delete it and resume from an earlier "
                "checkpoint "
                "(write its file name into last_checkpoint in the output folder), or set "
                "MODEL.WEIGHTS "
                "to another file"
            ) from e

    def _load_model(self, checkpoint):
        model_keys = list(self.model.state_dict())
        in_file = len(checkpoint.get("model", {}) or {})
        incompatible = super()._load_model(checkpoint)
        missing = [
            k for k in incompatible.missing_keys if not k.endswith(EXPECTED_MISSING_SUFFIXES)
        ]
        unexpected = list(incompatible.unexpected_keys)
        shapes = list(incompatible.incorrect_shapes)
        # torch's BatchNorm fills a num_batches_tracked absent from the file without reporting it
        not_loaded = set(incompatible.missing_keys) | {k for k, _, _ in shapes}
        loaded = sum(
            1
            for k in model_keys
            if k not in not_loaded and not k.endswith(EXPECTED_MISSING_SUFFIXES)
        )
        path = self._loading
        model = type(self.model).__name__
        if self._strict_now and (missing or unexpected or shapes):
            parts = []
            if missing:
                parts.append(
                    f"{len(missing)} of the model's {len(model_keys)} parameters and buffers "
                    "are not in "
                    f"the file{_examples(missing)}"
                )
            if unexpected:
                parts.append(
                    f"{len(unexpected)} of the file's {in_file} entries are not in the model"
                    f"{_examples(unexpected)}"
                )
            if shapes:
                ex = ", ".join(
                    f"{k!r}: {tuple(a)} in the file, {tuple(b)} in the model"
                    for k, a, b in shapes[:2]
                )
                parts.append(f"{len(shapes)} have another shape ({ex})")
            raise Seg2Error(
                f"the checkpoint {path} does not fit this config's {model}: "
                + "; ".join(parts)
                + ". Is it a checkpoint of another model (MODEL.META_ARCHITECTURE, backbone, head, "
                "class count)?"
            )
        if not self._strict_now and in_file and loaded <= 0:
            raise Seg2Error(
                f"none of the {in_file} entries of {path} fits this config's {model} "
                f"({len(missing)} of its "
                f"{len(model_keys)} parameters and buffers missing{_examples(missing)}; file "
                "entries"
                f"{_examples(unexpected)}): MODEL.WEIGHTS names weights of another model"
            )
        if not self._strict_now and (missing or shapes):
            logger.info(
                f"{path}: {loaded} of the model's {len(model_keys)} parameters and buffers loaded; "
                f"{len(missing) + len(shapes)} start from their initialisation"
            )
        return incompatible

    # ---- saving --------------------------------------------------------------------------------

    def save(self, name: str, **kwargs) -> None:
        """fvcore's ``save``, written to a temporary file renamed into place; ``last_checkpoint``
        is updated only once the checkpoint is whole. A failed write removes the temporary file
        and raises a :class:`Seg2Error` naming the folder."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._write_atomic(save_file, lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        self._write_atomic(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename),
            "w",
        )

    def _write_atomic(self, path: str, write, mode: str) -> None:
        # detectron2 writes into the final file (PathManager.open(path, "wb")): a full disk leaves
        # a partial checkpoint there, and then names it in last_checkpoint.
        tmp = os.path.join(
            os.path.dirname(path),
            f".tmp-{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}",
        )
        try:
            with open(tmp, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            try:
                os.remove(tmp)
            except OSError:
                pass
            reason = (
                getattr(e, "strerror", None)
                or (str(e).strip().splitlines() or [type(e).__name__])[0]
            )
            try:  # torch's message for a full disk is "unexpected pos ...": say how full it is
                st = os.statvfs(os.path.dirname(path) or ".")
                reason += f"; {st.f_bavail * st.f_frsize} bytes free there"
            except OSError:
                pass
            raise Seg2Error(
                f"cannot write {path} ({reason}): is {self.save_dir} (OUTPUT_DIR) full or "
                "read-only? The partial file was removed; last_checkpoint is unchanged"
            ) from e
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
