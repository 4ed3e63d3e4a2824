"""Long one-off passes log progress with an ETA, and an interrupted seg2_shapes generation resumes
where it stopped, giving the same bytes as an uninterrupted one."""

import glob
import logging
import multiprocessing as mp
import os
import time

from seg2.data import generate_shapes
from seg2.data.shapes import shapes_digest
from seg2.utils.progress import log_progress

SPLITS = {"train": 400, "val": 8}


def test_log_progress_counts_and_estimates(caplog):
    log = logging.getLogger("seg2.test_progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        assert list(log_progress(iter(range(4)), 4, "widgets", log, period=0)) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == [f"widgets: {i}/4, ETA 0:00:00" for i in (1, 2, 3)]
    assert lines[3].startswith("widgets: 4/4 done in ") and len(lines) == 4


def _generate(root):
    generate_shapes(root, splits=SPLITS, image_size=48, seed=5)


def test_interrupted_shapes_generation_resumes(tmp_path, caplog):
    root = str(tmp_path / "shapes")
    child = mp.get_context("spawn").Process(target=_generate, args=(root,))
    child.start()
    parts = os.path.join(str(tmp_path), ".partial-shapes-*", ".parts", "*.json")
    deadline = time.time() + 120
    while len(glob.glob(parts)) < 5 and child.is_alive() and time.time() < deadline:
        time.sleep(0.005)
    child.kill()  # SIGKILL: no cleanup of any kind
    child.join()
    done = len(glob.glob(parts))
    assert 5 <= done < sum(SPLITS.values()) and not os.path.exists(root), done

    with caplog.at_level(logging.INFO, logger="seg2.data.shapes"):
        _generate(root)
    resumed = [r.getMessage() for r in caplog.records if "Resuming" in r.getMessage()]
    assert len(resumed) == 1
    kept = int(resumed[0].split(": ")[1].split(" of ")[0])
    assert kept == done

    reference = generate_shapes(str(tmp_path / "ref"), splits=SPLITS, image_size=48, seed=5)
    assert shapes_digest(root) == shapes_digest(reference)
    # The partial folder became the cache; only the (empty) lock file stays beside it.
    assert [
        os.path.basename(p)[-5:] for p in glob.glob(os.path.join(str(tmp_path), ".partial-*"))
    ] == [".lock"] * 2
