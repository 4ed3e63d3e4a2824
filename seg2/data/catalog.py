"""Dataset names: registering one (again), and checking the names a config asks for before
anything is built from them."""

import difflib
from typing import Callable, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..utils import Seg2Error


def check_dataset_names(cfg):
    """
    Raise :class:`Seg2Error` naming the config key if ``DATASETS.TRAIN``, ``DATASETS.TEST`` or
    ``SEG2.BEST_CHECKPOINT.TEST_DATASETS`` holds a name that is not registered (detectron2 would
    fail only later, inside the loader; the best model's test only after training).
    """
    registered = DatasetCatalog.list()
    keys = {"DATASETS.TRAIN": cfg.DATASETS.TRAIN, "DATASETS.TEST": cfg.DATASETS.TEST}
    if "SEG2" in cfg:
        keys["SEG2.BEST_CHECKPOINT.TEST_DATASETS"] = cfg.SEG2.BEST_CHECKPOINT.TEST_DATASETS
    for key, names in keys.items():
        for name in names:
            if name not in registered:
                close = difflib.get_close_matches(name, registered, n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise Seg2Error(
                    f"{key} names {name!r}, which is not a registered dataset.{hint} "
                    'Registered names: `python -c "import seg2; from detectron2.data import '
                    'DatasetCatalog; print(DatasetCatalog.list())"`.'
                )


def check_test_datasets(cfg):
    """
    Load every dataset of ``DATASETS.TEST`` (and ``SEG2.BEST_CHECKPOINT.TEST_DATASETS``) once,
    before training: a test split without records is a :class:`Seg2Error` naming the key and the
    dataset, and a test split whose files fail the loaders' checks (a COCO JSON without
    ``area``, images of another size ...) fails now, not after training, where detectron2's
    loader would first read it. A test dataset is loaded again when it is evaluated (loaders
    are cheap next to training; a COCO semantic-map cache is generated on this first load).
    """
    keys = {"DATASETS.TEST": cfg.DATASETS.TEST}
    if "SEG2" in cfg:
        keys["SEG2.BEST_CHECKPOINT.TEST_DATASETS"] = cfg.SEG2.BEST_CHECKPOINT.TEST_DATASETS
    for key, names in keys.items():
        for name in names:
            if len(DatasetCatalog.get(name)) == 0:
                raise Seg2Error(
                    f"{key} names {name!r}, which has no records (an empty test split): it would "
                    "fail after training; point it at a split with images or remove it"
                )


def register_dataset(
    name: str, loader: Callable[[], List[dict]], metadata: Optional[dict] = None
) -> str:
    """
    Register ``loader`` in detectron2's ``DatasetCatalog`` under ``name`` and set ``metadata``
    on its ``MetadataCatalog`` entry, replacing an earlier registration of that name with both
    its records and its metadata (detectron2's catalogs refuse a name twice, and an old
    ``thing_classes`` would clash with a new one). seg2's ``register_*`` functions use it; so can
    yours, e.g. to point a built-in name at another folder or to register records made in code::

        register_dataset("my_val", lambda: records, {"stuff_classes": ["bg", "road"],
        "ignore_label": 255})

    Args:
        name (str): the dataset name, as ``DATASETS.TRAIN`` / ``DATASETS.TEST`` give it.
        loader (callable): returns the list of detectron2 dataset dicts; called on first use,
            not here.
        metadata (dict or None): metadata keys (``thing_classes``, ``stuff_classes``,
            ``ignore_label``, ``evaluator_type``, ``json_file`` ...).

    Returns:
        str: ``name``.
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**(metadata or {}))
    return name
