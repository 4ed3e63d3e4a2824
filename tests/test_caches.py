"""Issue 15, cases 5 and 8: seg2's caches are keyed on content, written world-readable (the umask
decides, as for any file), and what killed runs left behind is removed on the next run, but not
what a running generation is using."""

import fcntl
import json
import os
import time

import numpy as np
import pytest
from test_data_coco import coco_dict, expected_map, write_coco

from seg2 import Seg2Error
from seg2.data import generate_shapes, load_coco_sem_seg, read_label_map
from seg2.data.shapes import check_shapes_cache, remove_stale_generations
from seg2.utils.files import atomic_write, remove_stale_tmp_files


@pytest.fixture
def umask():
    """Run with umask 022 (restored after), the default of most systems."""
    old = os.umask(0o022)
    yield 0o022
    os.umask(old)


def _mode(path):
    return os.stat(path).st_mode & 0o777


def _age(path, seconds):
    t = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (t, t))
    os.utime(path, (t, t))


def test_coco_sem_seg_cache_is_keyed_on_the_json_content(tmp_path):
    # Issue 15: category ids changed in place (same byte size) reused the stale maps.
    json_file, image_root = write_coco(str(tmp_path))
    cache = str(tmp_path / "cache")
    records = load_coco_sem_seg(json_file, image_root, cache, dataset_name="t_cache_key")
    np.testing.assert_array_equal(read_label_map(records[0]["sem_seg_file_name"]), expected_map())

    size, mtime = os.path.getsize(json_file), os.stat(json_file).st_mtime_ns
    with open(json_file, "w") as f:  # cat (id 1) and dog (id 3) swap their annotations' ids
        json.dump(coco_dict(cat=3, dog=1), f)
    os.utime(json_file, ns=(mtime, mtime))
    assert os.path.getsize(json_file) == size
    with pytest.raises(Seg2Error) as e:
        load_coco_sem_seg(json_file, image_root, cache, dataset_name="t_cache_key")
    message = str(e.value)
    assert message.startswith(
        f"{cache} holds semantic maps made from other annotations: json_sha256 "
    )
    assert message.endswith("Delete the folder (it is a cache) to regenerate it.")
    # The stale maps were not used; regenerated, they follow the new ids (dog 1, cat 2).
    for name in os.listdir(cache):
        os.remove(os.path.join(cache, name))
    records = load_coco_sem_seg(json_file, image_root, cache, dataset_name="t_cache_key")
    expected = expected_map(dog_value=1, cat_value=2)
    np.testing.assert_array_equal(read_label_map(records[0]["sem_seg_file_name"]), expected)


def test_cache_made_by_a_size_keyed_seg2_is_refused_and_explained(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "seg2_source.json").write_text(
        json.dumps(
            {
                "json_file": "instances.json",
                "json_bytes": os.path.getsize(json_file),
                "rule_version": 1,
            }
        )
    )
    with pytest.raises(
        Seg2Error, match=r"made by an earlier seg2, which keyed the cache on the file's size"
    ):
        load_coco_sem_seg(json_file, image_root, str(cache))


def test_cache_files_are_world_readable_as_the_umask_allows(tmp_path, umask):
    # Issue 15: cache PNGs were written with mkstemp's 0600, so a shared cache was unreadable to
    # others.
    json_file, image_root = write_coco(str(tmp_path))
    cache = str(tmp_path / "cache")
    records = load_coco_sem_seg(json_file, image_root, cache, dataset_name="t_cache_key")
    for r in records:
        assert _mode(r["sem_seg_file_name"]) == 0o644
    assert _mode(os.path.join(cache, "seg2_source.json")) == 0o644
    # The umask decides, as for any file the process creates.
    os.umask(0o027)
    with atomic_write(str(tmp_path / "x.png")) as f:
        f.write(b"x")
    with open(tmp_path / "y.txt", "w") as f:
        f.write("y")
    assert _mode(tmp_path / "x.png") == _mode(tmp_path / "y.txt") == 0o640


def test_stale_temporary_files_of_a_killed_generation_are_removed(tmp_path):
    json_file, image_root = write_coco(str(tmp_path))
    cache = tmp_path / "cache"
    load_coco_sem_seg(json_file, image_root, str(cache), dataset_name="t_cache_key")
    # A run killed while writing img1.png left its temporary file 20 minutes ago; another
    # process is writing one now.
    os.remove(cache / "img1.png")
    stale, live = cache / ".tmp-img1.png.123.0badf00d", cache / ".tmp-img1.png.456.c0ffee00"
    stale.write_bytes(b"\x89PNG half")
    live.write_bytes(b"\x89PNG half")
    _age(str(stale), 1200)
    records = load_coco_sem_seg(json_file, image_root, str(cache), dataset_name="t_cache_key")
    np.testing.assert_array_equal(read_label_map(records[0]["sem_seg_file_name"]), expected_map())
    assert not stale.exists() and live.exists()
    assert remove_stale_tmp_files(str(cache), max_age_s=0) == [str(live)]


def test_stale_shapes_folders_are_removed_but_not_a_running_generation(tmp_path, caplog):
    root = str(tmp_path / "shapes")
    params = dict(splits={"train": 2, "val": 1}, image_size=32, seed=0)
    generate_shapes(root, **params)

    def folder(name, age=0):
        path = tmp_path / name
        (path / "VOC2012" / "JPEGImages").mkdir(parents=True)
        (path / "VOC2012" / "JPEGImages" / "a.jpg").write_bytes(b"jpg")
        if age:
            _age(str(path), age)
        return path

    killed = folder(".partial-shapes-0123456789ab")  # a killed generation with other parameters
    (tmp_path / ".partial-shapes-0123456789ab.lock").touch()
    running = folder(".partial-shapes-ba9876543210")  # a generation in progress: it holds its lock
    legacy = folder(".tmp-shapes-k1ll3d_x", age=1200)  # seg2 before resumable generation
    legacy_young = folder(".tmp-shapes-wr1t1ng_", age=0)  # may still be written by an old seg2
    trash = folder(".trash-shapes-abcd_123", age=1200)
    other = folder(".partial-shapes2-0123456789ab")  # another dataset's
    with open(str(running) + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        # The next run, which finds its cache complete, cleans up beside it.
        assert generate_shapes(root, **params) == root
        assert not killed.exists() and not legacy.exists() and not trash.exists()
        assert running.exists() and legacy_young.exists() and other.exists()
        assert (running / "VOC2012" / "JPEGImages" / "a.jpg").read_bytes() == b"jpg"
    assert (
        check_shapes_cache(root, json.load(open(os.path.join(root, "manifest.json")))["params"])
        is None
    )
    # Once its lock is free, the left-over partial folder goes too; lock files stay.
    assert remove_stale_generations(root) == [str(running)]
    assert (tmp_path / ".partial-shapes-0123456789ab.lock").exists()
