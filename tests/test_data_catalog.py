"""register_dataset (seg2.data.catalog), and the names seg2.data.coco had before it was split by job."""

import importlib

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import seg2.data
from seg2.data import register_dataset


def test_register_dataset_replaces_records_and_metadata():
    calls = []

    def loader(records):
        calls.append(len(records))
        return records

    name = register_dataset(
        "seg2_test_catalog", lambda: loader([{"file_name": "a.jpg"}]), {"thing_classes": ["a"]}
    )
    assert name == "seg2_test_catalog" and calls == []  # nothing is loaded at registration
    assert DatasetCatalog.get(name) == [{"file_name": "a.jpg"}] and calls == [1]
    # detectron2 alone refuses the name twice, and a different thing_classes on the same metadata
    with pytest.raises(AssertionError):
        DatasetCatalog.register(name, list)
    register_dataset(
        name, lambda: loader([{"file_name": "b.jpg"}] * 2), {"thing_classes": ["b", "c"]}
    )
    assert DatasetCatalog.get(name) == [{"file_name": "b.jpg"}] * 2
    assert MetadataCatalog.get(name).thing_classes == ["b", "c"]
    register_dataset(name, list)  # no metadata: an empty entry, the old one gone
    assert "thing_classes" not in MetadataCatalog.get(name).as_dict()


@pytest.mark.parametrize(
    "name, module",
    [
        ("check_coco_json", "coco_json"),
        ("BOX_TOLERANCE", "coco_json"),
        ("coco_sem_seg_map", "sem_seg_cache"),
        ("generate_coco_sem_seg", "sem_seg_cache"),
        ("SEM_SEG_RULE_VERSION", "sem_seg_cache"),
    ],
)
def test_moved_coco_names_still_import_from_the_old_module_with_a_warning(name, module):
    coco = importlib.import_module("seg2.data.coco")
    with pytest.warns(
        DeprecationWarning, match=rf"seg2\.data\.coco\.{name} moved to seg2\.data\.{module}\.{name}"
    ):
        old = getattr(coco, name)
    assert old is getattr(importlib.import_module(f"seg2.data.{module}"), name)
    if hasattr(seg2.data, name):
        assert getattr(seg2.data, name) is old
    with pytest.raises(AttributeError, match="no_such_name"):
        coco.no_such_name
