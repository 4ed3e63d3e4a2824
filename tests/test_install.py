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


def test_pip_installs_nothing_but_seg2_on_the_installed_environment(tmp_path):
    # pip's own resolver, offline: on top of the installed torch + detectron2 (+ the test extra),
    # `pip install -e ".[test]"` must want seg2 alone, never a torch or torchvision wheel.
    import json
    import subprocess
    import sys

    report = tmp_path / "report.json"
    env = dict(
        os.environ, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="", PIP_DISABLE_PIP_VERSION_CHECK="1"
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--no-index",
        "--no-build-isolation",
    ]
    cmd += ["-q", "--report", str(report), "-e", ".[test]"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    wanted = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert wanted == ["seg2"], wanted
