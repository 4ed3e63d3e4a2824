"""
Exact resume: the training data stream as a function of (seed, position) only, and the RNG states
of the main process, both saved in every checkpoint.

detectron2's train loader cannot say where it is: its ``TrainingSampler`` is an infinite seeded
stream that restarts from the seed when a run is resumed, ``DataLoader`` workers draw their
augmentations from RNGs seeded once per run, ``MapDataset`` replaces an unreadable sample from a
RNG whose state depends on history, and ``AspectRatioGroupedDataset`` carries half-filled batches
from one iteration to the next. A resumed run therefore trained on other samples with other
augmentations than the uninterrupted run (max abs weight difference 0.48 after a short CPU run).

:class:`ResumableTrainLoader` keeps detectron2's sampler (the same index stream) and grouping
rule, and changes what makes them history-dependent:

* the sample at stream position ``p`` is mapped with python's, numpy's and torch's global RNGs
  seeded from ``(seed, rank, p)`` (and restored afterwards, so that mapping in the main process
  does not disturb the model's RNG stream): its augmentation is the same whatever ran before and
  whichever worker maps it (also with another ``DATALOADER.NUM_WORKERS``);
* an unreadable sample (the mapper returns None) is replaced by an index drawn from
  ``(seed, rank, p, attempt)``;
* workers map whole batch-sized chunks of the stream and the main process receives them in stream
  order, so that its state is two numbers and a few positions: the next stream position and the
  positions waiting in the aspect-ratio buckets (:meth:`ResumableTrainLoader.state_dict`).

:class:`RNGStates` saves and restores the global RNG states of python, numpy, torch and CUDA.
"""

import contextlib
import itertools
import logging
import os
import random
from typing import List, Optional

import numpy as np
import torch
from detectron2.data import DatasetFromList
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..utils import Seg2Error

__all__ = [
    "ResumableTrainLoader",
    "RNGStates",
    "forked_rng",
    "build_resumable_sampler",
    "RESUMABLE_SAMPLERS",
]

logger = logging.getLogger(__name__)

RESUMABLE_SAMPLERS = (
    "TrainingSampler",
    "RepeatFactorTrainingSampler",
    "RandomSubsetTrainingSampler",
)
# Attempts to replace an unreadable sample before giving up (the mapper's own share limit,
# SEG2.DATALOADER.MAX_BAD_SAMPLE_SHARE, normally stops the run long before).
_MAX_ATTEMPTS = 1000


def _get_states():
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


@contextlib.contextmanager
def forked_rng(seed: Optional[int] = None):
    """Run the block with python's, numpy's and torch's (CPU) global RNGs seeded from ``seed``
    (None: left as they are), and restore their states afterwards."""
    saved = _get_states()
    try:
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        yield
    finally:
        _set_states(saved)


def _sample_seed(seed: int, rank: int, position: int, attempt: int = 0) -> int:
    words = np.random.SeedSequence([seed % 2**63, rank, position, attempt]).generate_state(
        2, dtype=np.uint32
    )
    return (int(words[0]) << 31) | (int(words[1]) >> 1)  # < 2**63: torch.manual_seed takes it


class RNGStates:
    """A checkpointable (``state_dict`` / ``load_state_dict``) of the global RNG states of python,
    numpy, torch and, where present, CUDA. Each process saves and restores its own; detectron2
    saves only the main process's checkpoint, so in a run of several processes only the main one's
    states come back (the others keep the seeds of ``default_setup``)."""

    def state_dict(self):
        states = _get_states()
        # As plain values and tensors: torch.load(weights_only=True) refuses numpy arrays.
        name, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = [
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    def load_state_dict(self, states):
        if not comm.is_main_process():
            return
        states = dict(states)
        name, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)
        _set_states(states)
        if "cuda" in states and torch.cuda.is_available():
            cuda = states["cuda"]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            else:
                logger.warning(
                    f"The checkpoint holds the CUDA RNG states of {len(cuda)} device(s), this "
                    "machine has "
                    f"{torch.cuda.device_count()}: they are not restored"
                )


def build_resumable_sampler(cfg, dataset: list) -> Optional[torch.utils.data.Sampler]:
    """detectron2's training sampler of ``cfg.DATALOADER.SAMPLER_TRAIN`` for ``dataset``, seeded
    by ``cfg.SEED`` (also RandomSubsetTrainingSampler, which detectron2 seeds at random); None for
    the samplers without a seeded stream (the weighted ones)."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset), seed=cfg.SEED)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT
        )
        return RepeatFactorTrainingSampler(factors, seed=cfg.SEED)
    if name == "RandomSubsetTrainingSampler":
        return RandomSubsetTrainingSampler(
            len(dataset),
            cfg.DATALOADER.RANDOM_SUBSET_RATIO,
            seed_shuffle=cfg.SEED,
            seed_subset=cfg.SEED,
        )
    return None


class _Stream(IterableDataset):
    """What a DataLoader worker runs: the chunks ``j`` (``batch_size`` stream positions each, from
    ``start``) with ``j % num_workers == worker id``, each as a list of (position, mapped dict)."""

    def __init__(self, owner: "ResumableTrainLoader", start: int):
        self.owner, self.start = owner, start

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        B = self.owner.batch_size
        stream = itertools.islice(iter(self.owner.sampler), self.start, None)
        for j in itertools.count():
            chunk = list(itertools.islice(stream, B))
            if len(chunk) < B:
                return
            if j % nw == wid:
                first = self.start + j * B
                yield [
                    (first + k, self.owner.map_sample(first + k, idx))
                    for k, idx in enumerate(chunk)
                ]


def _no_collate(batch):
    return batch


class ResumableTrainLoader:
    """
    The train loader of :meth:`seg2.engine.Trainer.build_train_loader`: an iterable of batches
    (lists of ``batch_size`` mapped dicts) as detectron2's ``build_detection_train_loader`` gives
    them, with :meth:`state_dict` / :meth:`load_state_dict` for an exact resume (module docstring).

    Args:
        dataset: the training records.
        mapper: the dataset mapper (a record -> a dict, or None for an unreadable sample).
        sampler: a seeded infinite index stream (detectron2's ``TrainingSampler`` and kin).
        batch_size: images per batch in this process.
        num_workers: DataLoader workers.
        aspect_ratio_grouping: detectron2's grouping (images wider than tall, and the others).
        seed: the seed of the per-sample RNGs (``SEED``; a random one where negative).
    """

    def __init__(
        self,
        dataset: list,
        mapper,
        sampler,
        batch_size: int,
        *,
        num_workers: int = 0,
        aspect_ratio_grouping: bool = True,
        seed: int = -1,
    ):
        if batch_size <= 0:
            raise Seg2Error(
                f"SOLVER.IMS_PER_BATCH gives {batch_size} image(s) per process: it must be positive"
            )
        self.records = DatasetFromList(dataset, copy=False)
        self.mapper, self.sampler = mapper, sampler
        self.batch_size, self.num_workers = batch_size, num_workers
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.seed = int(seed) if seed >= 0 else int.from_bytes(os.urandom(4), "big")
        self.rank = comm.get_rank()
        self.position = 0  # the next stream position the batches take
        self.buckets: List[List] = [[], []]  # (position, mapped dict) waiting for a batch
        self.restored = False

    def __len__(self):  # pragma: no cover - an infinite stream, as detectron2's
        raise TypeError("the training stream is infinite")

    def map_sample(self, position: int, index: int):
        """The mapped dict of stream position ``position`` (record ``index``), a function of the
        seed, the rank and the position only."""
        for attempt in range(_MAX_ATTEMPTS):
            with forked_rng(_sample_seed(self.seed, self.rank, position, attempt)):
                data = self.mapper(self.records[index])
                if data is not None:
                    return data
                # An unreadable sample: another index, drawn from (seed, rank, position, attempt).
                index = random.randrange(len(self.records))
        raise Seg2Error(
            f"{_MAX_ATTEMPTS} training samples in a row were unreadable (stream position "
            f"{position})"
        )

    def state_dict(self):
        return {
            "position": self.position,
            "buckets": [[p for p, _ in b] for b in self.buckets],
            "seed": self.seed,
            "batch_size": self.batch_size,
            "rank": self.rank,
        }

    def load_state_dict(self, state):
        if state.get("batch_size") != self.batch_size:
            raise Seg2Error(
                f"the checkpoint's train loader took {state.get('batch_size')} image(s) per "
                "batch and process, "
                f"this run {self.batch_size} (SOLVER.IMS_PER_BATCH / processes): resume with "
                "the same "
                "SOLVER.IMS_PER_BATCH and --num-gpus"
            )
        self.seed = int(state["seed"])
        self.position = int(state["position"])
        # Only the main process's state is saved: in the others, the same position (exact without
        # aspect-ratio grouping, where every process takes batch_size positions per iteration).
        self.buckets = (
            [[(p, None) for p in b] for b in state["buckets"]]
            if comm.is_main_process()
            else [[], []]
        )
        self.restored = True

    def start_at_iteration(self, iteration: int) -> None:
        """For a checkpoint without a loader state (saved by an older seg2 or detectron2): every
        batch before ``iteration`` took ``batch_size`` positions; exact without aspect-ratio
        grouping."""
        self.position = iteration * self.batch_size
        self.buckets = [[], []]

    def _index_at(self, position: int) -> int:
        return next(itertools.islice(iter(self.sampler), position, None))

    def __iter__(self):
        # Buckets restored from a checkpoint hold positions only: map them again (same result).
        self.buckets = [
            [(p, d if d is not None else self.map_sample(p, self._index_at(p))) for p, d in b]
            for b in self.buckets
        ]
        generator = torch.Generator()
        generator.manual_seed(
            _sample_seed(self.seed, self.rank, 2**40)
        )  # worker seeds, not from the global RNG
        chunks = DataLoader(
            _Stream(self, self.position),
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_no_collate,
            generator=generator,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )
        for chunk in chunks:
            if not self.aspect_ratio_grouping:
                self.position = chunk[-1][0] + 1
                yield [d for _, d in chunk]
                continue
            for p, d in chunk:
                self.position = p + 1
                bucket = self.buckets[0 if d["width"] > d["height"] else 1]
                bucket.append((p, d))
                if len(bucket) == self.batch_size:
                    batch = [x for _, x in bucket]
                    del bucket[:]
                    yield batch
