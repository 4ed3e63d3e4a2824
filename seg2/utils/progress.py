"""Progress with an ETA for seg2's long one-off passes (dataset caches), through the logger, so it
lands in detectron2's log file as ``inference_on_dataset``'s progress does."""

import datetime
import logging
import time
from typing import Iterable, Iterator, TypeVar

__all__ = ["log_progress"]

T = TypeVar("T")


def log_progress(
    items: Iterable[T], total: int, what: str, logger: logging.Logger, period: float = 10.0
) -> Iterator[T]:
    """
    Yield ``items``; every ``period`` seconds log ``"<what>: <done>/<total>, ETA h:mm:ss"``
    (``done`` counts the items whose processing has finished), and a summary at the end.
    """
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= period and done < total:
            eta = (now - start) / done * (total - done)
            logger.info(f"{what}: {done}/{total}, ETA {datetime.timedelta(seconds=round(eta))}")
            last = now
    if done:
        logger.info(f"{what}: {done}/{total} done in {time.perf_counter() - start:.1f} s")
