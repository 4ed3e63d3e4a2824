"""Checks of the dataset names a config asks for, before anything is built from them."""

import difflib

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..utils import Seg2Error


def check_dataset_names(cfg):
    """
    Raise :class:`Seg2Error` naming the config key if ``DATASETS.TRAIN`` or ``DATASETS.TEST``
    holds a name that is not registered (detectron2 would fail only later, inside the loader).
    """
    registered = DatasetCatalog.list()
    for key in ("TRAIN", "TEST"):
        for name in getattr(cfg.DATASETS, key):
            if name not in registered:
                close = difflib.get_close_matches(name, registered, n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise Seg2Error(
                    f"DATASETS.{key} names {name!r}, which is not a registered dataset.{hint} "
                    "Registered names: `python -c \"import seg2; from detectron2.data import "
                    "DatasetCatalog; print(DatasetCatalog.list())\"`."
                )


def register_dataset(name: str, loader, metadata: dict):
    """
    Register ``loader`` under ``name`` with ``metadata``, replacing an earlier registration of
    that name (detectron2's catalogs refuse to register a name twice).
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
