"""
What resuming a run needs beyond detectron2's own: ``metrics.json`` keeps one record per iteration
(:func:`trim_metrics_json`). (A checkpoint that cannot be read is named in one line by
:class:`seg2.checkpoint.Seg2Checkpointer`.)

detectron2's ``JSONWriter`` appends to ``metrics.json``. A run killed after its last checkpoint has
already written records for iterations the resumed run trains (and writes) again, so without a
trim the file holds two records for those iterations (e.g. 19, 39, 39, 59 after a kill at 45 and a
resume from the checkpoint of iteration 29).
"""

import json
import logging
import os
from typing import Tuple

__all__ = ["trim_metrics_json"]

logger = logging.getLogger(__name__)


def trim_metrics_json(path: str, start_iter: int) -> Tuple[int, int]:
    """
    Drop the records of ``path`` (detectron2's ``metrics.json``) at iterations ``>= start_iter``,
    which the run starting at ``start_iter`` writes again, and lines that are not JSON (a write cut
    short by a kill); the kept records stay in their order. The file is rewritten in place: the
    ``JSONWriter`` of the trainer holds it open for appending (``O_APPEND``), so its next record
    goes after the kept ones. The dropped lines are appended to ``<path>.dropped`` (nothing is
    lost) and a warning counts them.

    Returns:
        (kept, dropped): numbers of lines.
    """
    if not os.path.isfile(path):
        return 0, 0
    with open(path, "r+") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
        kept, dropped, late, broken = [], [], 0, 0
        for line in lines:
            try:
                iteration = json.loads(line)["iteration"]
            except (ValueError, KeyError, TypeError):
                broken += 1
                dropped.append(line)
                continue
            if iteration >= start_iter:
                late += 1
                dropped.append(line)
            else:
                kept.append(line)
        if dropped:
            with open(path + ".dropped", "a") as d:
                d.write("".join(line + "\n" for line in dropped))
        if dropped or len(kept) != len(lines):
            f.seek(0)
            f.write("".join(line + "\n" for line in kept))
            f.truncate()
    if late or broken:
        logger.warning(
            f"{path}: dropped {late} record(s) at iterations >= {start_iter}, which this run "
            "(starting at "
            f"iteration {start_iter}) writes again"
            + (
                f", and {broken} line(s) that are not JSON records (a write cut short)"
                if broken
                else ""
            )
            + f"; {len(kept)} kept. The dropped lines are in {path}.dropped"
        )
    return len(kept), late + broken
