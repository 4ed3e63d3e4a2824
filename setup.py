#!/usr/bin/env python3
"""seg2: semantic segmentation next to Mask R-CNN, as a Detectron2 plugin.

detectron2 itself is not on PyPI: install it from source first (see README.md).
"""

from setuptools import find_packages, setup

setup(
    name="seg2",
    version="0.1.0",
    description="Detectron2 plugin: semantic heads, multi-task Mask R-CNN, COCO/VOC registry, evaluators",
    packages=find_packages(include=("seg2", "seg2.*")),
    python_requires=">=3.9",
    install_requires=[
        # Ranges, not pins: detectron2 users already have a (CUDA) torch that their detectron2 was
        # compiled against, and pip must keep it. Lower bounds: torch.func.functional_call (torch
        # 2.0) and the torchvision release made for it (0.15). No upper bound, so pip never
        # downgrades a newer torch. Tested pair: torch 2.13.0 + torchvision 0.28.0 (what .ci/run
        # installs). torch and torchvision must still be a matching pair (torchvision's compiled
        # ops fail to load against another torch build); each torchvision wheel pins its torch.
        "torch>=2.0",
        "torchvision>=0.15",
        "numpy",
        "Pillow",
        "opencv-python-headless",
        "pycocotools>=2.0.2",
        "fvcore>=0.1.5,<0.1.6",
        "scipy",
        "matplotlib",
        "tqdm",
        # detectron2.model_zoo imports pkg_resources, which setuptools 81 removed.
        "setuptools<81",
    ],
    extras_require={
        # ONNX export (tools/export_model.py --format onnx) and its check with onnxruntime.
        "export": ["onnx>=1.14", "onnxruntime>=1.16"],
        "test": ["pytest", "onnx>=1.14", "onnxruntime>=1.16"],
        # The formatter / linter and the layer contracts that .ci/run checks (ruff.toml,
        # .importlinter); ruff pinned, so that its formatting does not change under a release.
        "dev": ["ruff==0.17.6", "import-linter>=2.1"],
    },
)
