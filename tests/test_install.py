"""setup.py declares torch/torchvision ranges that keep the user's own (CUDA) build: pip installs
nothing of torch on top of an existing torch + detectron2."""

import ast
import os
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO_ROOT


def _install_requires():
    """setup.py's install_requires, read from its source (the installed metadata may be stale)."""
    with open(os.path.join(REPO_ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return {r.name: r for r in map(Requirement, ast.literal_eval(node.value))}
    raise AssertionError("setup.py has no install_requires")


@pytest.mark.parametrize("name", ["torch", "torchvision"])
def test_installed_build_satisfies_the_range(name):
    req = _install_requires()[name]
    # A local build label (+cu130, +cpu) must not matter: it is the user's CUDA build.
    installed = Version(version(name))
    assert req.specifier.contains(installed, prereleases=True), (req, installed)
    assert req.specifier.contains(Version(f"{installed.public}+cu999"), prereleases=True)


@pytest.mark.parametrize(
    "name, oldest, too_old",
    [("torch", "2.0.0", "1.13.1"), ("torchvision", "0.15.0", "0.14.1")],
)
def test_range_is_a_range_not_a_pin(name, oldest, too_old):
    # torch.func.functional_call (seg2.modeling) needs torch 2.0; torchvision 0.15 is its pair.
    spec = _install_requires()[name].specifier
    assert all(s.operator not in ("==", "===", "~=") for s in spec), spec
    assert spec.contains(oldest) and not spec.contains(too_old)
    # No upper bound: pip must never downgrade a user's newer torch.
    assert spec.contains("99.0")
