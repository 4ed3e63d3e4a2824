import logging
import os
import tempfile

import pytest

# Keep the built-in seg2_shapes cache out of the checkout: one folder per test session.
_SESSION_DATA = tempfile.mkdtemp(prefix="seg2-tests-")
os.environ.setdefault("SEG2_SHAPES_ROOT", os.path.join(_SESSION_DATA, "seg2_shapes"))

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FIXTURES = os.path.join(REPO_ROOT, "..", "shared", "fixtures")


@pytest.fixture(scope="session")
def tiny_shapes_root(tmp_path_factory):
    """A small shapes dataset (8 train, 4 val images of 64x64), generated once per session."""
    from seg2.data import generate_shapes

    root = str(tmp_path_factory.mktemp("tiny") / "shapes")
    return generate_shapes(root, splits={"train": 8, "val": 4}, image_size=64, seed=3)


@pytest.fixture(scope="session")
def shared_fixtures():
    """The team's real fixtures in ../shared/fixtures; absent for users outside the team."""
    if not os.path.isdir(SHARED_FIXTURES):
        pytest.skip(
            f"{SHARED_FIXTURES} is absent: the shared fixtures are only in the seg2 team's checkout"
        )
    return SHARED_FIXTURES


@pytest.fixture(autouse=True)
def _restore_loggers():
    """Tools run in-process (tools/demo.py, train_net) call detectron2's setup_logger, which adds
    handlers bound to pytest's captured streams and stops propagation: undo that after each test."""
    loggers = [logging.getLogger(n) for n in ("seg2", "detectron2", "fvcore", "d2")]
    saved = [(lg, list(lg.handlers), lg.propagate, lg.level) for lg in loggers]
    yield
    for lg, handlers, propagate, level in saved:
        lg.handlers[:] = handlers
        lg.propagate = propagate
        lg.setLevel(level)
