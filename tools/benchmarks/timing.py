"""
Timing and peak memory, shared by the scripts of ``tools/benchmarks/`` (``from timing import ...``:
a script's folder is first on ``sys.path``) and by ``tools/ablation/`` and ``tools/export_model.py``
(``from benchmarks.timing import ...``).

* :func:`sync` / :func:`timed`: one call, between CUDA synchronisations.
* :func:`time_iterations`: ``warmup`` untimed then ``iters`` timed calls of one step, with peak
memory.
* :func:`time_round_robin`: several steps taking turns, repeat by repeat, so that load from other
  jobs on a shared machine hits all of them alike; the caller compares the timings as ratios.
  :func:`best_of_rounds`: the best time of each, numpy seeded alike per round.
* :func:`train_step` / :func:`inference_step`: the step functions of a detectron2 model (training:
  forward, summed losses, backward, optimizer step; inference: forward under ``no_grad``), in
  float32
  or under ``torch.autocast`` (float16 on a GPU with a ``GradScaler``, as detectron2's AMP trainer).
* :class:`PeakMemory`: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the process's peak
  resident set size (``VmHWM``), reset before each measurement through ``/proc/self/clear_refs``
  (Linux >= 4.0), else the lifetime peak ``ru_maxrss``.

``torch.utils.benchmark.Timer`` times one statement in blocks; these helpers are written here
because the benchmarks need what it does not give: the index of each call (to cycle through
prepared inputs), per-call times, variants interleaved call by call, and peak memory.
"""

import resource
import time
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "PeakMemory",
    "best_of_rounds",
    "inference_step",
    "rss_mb",
    "sync",
    "timed",
    "time_iterations",
    "time_round_robin",
    "train_step",
]


def sync(device="cpu"):
    """Wait for the work queued on ``device`` (a CUDA device); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device="cpu") -> Tuple[Any, float]:
    """``(fn(), seconds)``: the wall time of one call, ``device`` synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def _status_kb(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """The process's resident set size now, in MiB (NaN where ``/proc`` is not available)."""
    kb = _status_kb("VmRSS")
    return float("nan") if kb is None else kb / 1024.0


class PeakMemory:
    """
    Context manager measuring the peak memory of what runs inside it.

    Attributes after exit: ``peak_bytes`` (absolute peak: RSS on CPU, allocated on GPU),
    ``start_bytes`` (at entry), ``method`` (how it was measured).
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.method = "VmHWM (reset via /proc/self/clear_refs)"
            except OSError:
                self.method = "ru_maxrss (process lifetime peak)"
            self.start_bytes = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            self.peak_bytes = _status_kb("VmHWM") * 1024
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


def time_iterations(
    step: Callable[[int], None], warmup: int, iters: int, device="cpu"
) -> Dict[str, float]:
    """
    Run ``step(i)`` ``warmup`` times untimed, then ``iters`` times timed (CUDA synchronised),
    inside a :class:`PeakMemory`.

    Returns:
        dict: "iters", "seconds" (total of the timed ones), "per_second", "seconds_per_iter"
        (median), "peak_mb", "start_mb", "memory".
    """
    with PeakMemory(device) as mem:
        for i in range(warmup):
            step(i)
        times = [timed(lambda i=i: step(warmup + i), device)[1] for i in range(iters)]
    total = float(sum(times))
    return {
        "iters": iters,
        "seconds": total,
        "per_second": iters / total if total > 0 else float("inf"),
        "seconds_per_iter": float(np.median(times)) if times else float("nan"),
        "peak_mb": mem.peak_bytes / 2**20,
        "start_mb": mem.start_bytes / 2**20,
        "memory": mem.method,
    }


def time_round_robin(
    steps: Mapping[Hashable, Callable[[int], Any]], warmup: int, repeats: int, device="cpu"
) -> Dict[Hashable, List[float]]:
    """
    Time several steps side by side: each of ``warmup + repeats`` rounds calls every step once,
    in the mapping's order, as ``step(round)``; the first ``warmup`` rounds are not kept.

    Returns:
        dict: step key -> the seconds of its ``repeats`` timed calls, in order.
    """
    times = {key: [] for key in steps}
    for rnd in range(warmup + repeats):
        for key, step in steps.items():
            _, seconds = timed(lambda: step(rnd), device)
            if rnd >= warmup:
                times[key].append(seconds)
    return times


def best_of_rounds(
    fns: Mapping[Hashable, Callable[[], Any]], repeats: int, warmup: int = 1, device="cpu"
) -> Dict[Hashable, float]:
    """The best seconds of each ``fn()`` over ``repeats`` rounds of :func:`time_round_robin`
    (after ``warmup`` rounds: caches, allocator), numpy's global seed set to the round before each
    call, so that the variants of a round draw the same random augmentations."""

    def seeded(fn):
        def step(rnd):
            np.random.seed(rnd)
            return fn()

        return step

    times = time_round_robin({k: seeded(fn) for k, fn in fns.items()}, warmup, repeats, device)
    return {k: min(v) for k, v in times.items()}


def _autocast(device, dtype: Optional[torch.dtype]):
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def train_step(
    model, batches: Sequence, optimizer=None, amp_dtype: Optional[torch.dtype] = None, device="cpu"
) -> Callable[[int], None]:
    """
    The training step ``step(i)`` of a detectron2 model on ``batches[i % len(batches)]``: forward
    (under ``torch.autocast(amp_dtype)`` when given), the sum of the loss dict, backward and
    ``optimizer.step()``. float16 on a GPU scales the loss with a ``GradScaler``, as detectron2's
    ``AMPTrainer``. The default optimizer is SGD at learning rate 0 (every step does the
    optimizer's work and the weights stay as they are, so that repeated steps time the same model).
    Call it inside detectron2's ``EventStorage`` for R-CNN models.
    """
    model.train()
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    scaler = None
    if amp_dtype == torch.float16 and torch.device(device).type == "cuda":
        scaler = torch.amp.GradScaler("cuda")

    def step(i):
        with _autocast(device, amp_dtype):
            loss = sum(model(batches[i % len(batches)]).values())
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def inference_step(
    model, batches: Sequence, amp_dtype: Optional[torch.dtype] = None, device="cpu"
) -> Callable[[int], Any]:
    """The inference step ``step(i)``: ``model(batches[i % len(batches)])`` in eval mode under
    ``torch.no_grad()`` (and ``torch.autocast(amp_dtype)`` when given)."""
    model.eval()

    def step(i):
        with torch.no_grad(), _autocast(device, amp_dtype):
            return model(batches[i % len(batches)])

    return step
