#!/usr/bin/env python3
"""
The cost of the COCO loaders' image check (``check_images``: each image exists and PIL reads its
header), measured side by side in one run on ``--images`` generated JPEGs: loading the JSON with
:func:`seg2.data.load_coco_with_sem_seg` with and without the check, best of ``--repeats``
(taking turns), reported per image and as a ratio. The page cache is warm (the files were just
written); on a cold cache or a network file system the check costs one small read per image.

    python3 tools/benchmarks/benchmark_image_check.py [--images 10000] [--size 128x128] [--repeats
    3]
"""

import argparse
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
from timing import best_of_rounds

from seg2.data import load_coco_with_sem_seg


def _write_dataset(root: str, n: int, width: int, height: int) -> str:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    # One encoded JPEG of noise, written n times: the check reads headers, whatever the pixels.
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
        os.path.join(root, "a.jpg"), quality=90
    )
    with open(os.path.join(root, "a.jpg"), "rb") as f:
        data = f.read()
    images, annotations = [], []
    for i in range(n):
        name = f"{i:06d}.jpg"
        with open(os.path.join(root, "images", name), "wb") as f:
            f.write(data)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        annotations.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": 100.0,
                "bbox": [10, 10, 10, 10],
                "segmentation": [[10, 10, 20, 10, 20, 20, 10, 20]],
            }
        )
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "thing"}],
            },
            f,
        )
    return path, len(data)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--size", default="128x128", help="WxH of the JPEGs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--tmp", default=None, help="folder for the generated images (default: a temporary one)"
    )
    args = p.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    root = tempfile.mkdtemp(prefix="seg2-bench-imgcheck-", dir=args.tmp)
    try:
        json_file, nbytes = _write_dataset(root, args.images, width, height)
        image_root = os.path.join(root, "images")
        for check in (False, True):
            assert (
                len(load_coco_with_sem_seg(json_file, image_root, check_images=check))
                == args.images
            )
        best = best_of_rounds(
            {
                c: lambda c=c: load_coco_with_sem_seg(json_file, image_root, check_images=c)
                for c in (False, True)
            },
            args.repeats,
            warmup=0,
        )
        n = args.images
        print(
            f"{n} JPEGs of {width}x{height} ({nbytes} bytes each), warm page cache, best of "
            f"{args.repeats}"
        )
        print(f"{'load_coco_with_sem_seg':28s} {'total s':>8s} {'us/image':>9s} {'ratio':>6s}")
        for check, name in ((False, "check_images=False"), (True, "check_images=True")):
            print(
                f"{name:28s} {best[check]:8.3f} {1e6 * best[check] / n:9.1f} "
                f"{best[check] / best[False]:6.2f}"
            )
        print(f"the check itself: {1e6 * (best[True] - best[False]) / n:.1f} us/image")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
