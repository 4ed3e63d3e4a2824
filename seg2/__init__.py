"""seg2: semantic segmentation heads, multi-task Mask R-CNN, datasets and evaluators for Detectron2.

``import seg2`` registers every dataset and model part seg2 adds to Detectron2's registries.
"""

__version__ = "0.1.0"

# Oldest detectron2 whose APIs seg2 uses (configurable heads, DefaultTrainer hooks, LazyConfig).
_MIN_DETECTRON2 = (0, 6)
_INSTALL_HINT = (
    "seg2 is a Detectron2 plugin: install detectron2 first, from source, as its INSTALL.md says:\n"
    "    git clone https://github.com/facebookresearch/detectron2.git\n"
    "    python -m pip install --no-build-isolation ./detectron2\n"
    "then `pip install -e .` in the seg2 checkout (see README.md, 'Install')."
)


def _check_detectron2():
    try:
        import detectron2
    except ImportError as e:
        raise ImportError(
            f"seg2 needs detectron2, which is not importable ({e}).\n{_INSTALL_HINT}"
        ) from e
    version = getattr(detectron2, "__version__", "0")
    try:
        parsed = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        parsed = (0, 0)
    if parsed < _MIN_DETECTRON2:
        raise ImportError(
            f"seg2 needs detectron2 >= {'.'.join(map(str, _MIN_DETECTRON2))}, found {version} at "
            f"{detectron2.__file__}.\n{_INSTALL_HINT}"
        )


_check_detectron2()

from . import (
    data,  # noqa: E402,F401  (registers datasets)
    modeling,  # noqa: E402,F401  (registers model parts)
)
from .config import add_seg2_config, load_seg2_config  # noqa: E402
from .resolve import resolve_config  # noqa: E402
from .utils import Seg2Error  # noqa: E402

__all__ = [
    "add_seg2_config",
    "load_seg2_config",
    "resolve_config",
    "Seg2Error",
    "data",
    "__version__",
]
