"""The installed package works outside the repository: a wheel built from the tree, installed into a fresh
folder, runs `msclip demo` from an empty working directory with its packaged recipes and configs.

The wheel is installed with `pip install --no-deps --target`, and the interpreter is the project's venv
(torch and the other dependencies are already there), but the repository's own `src/` is removed from
`sys.path` at start-up (a sitecustomize), so every msclip module must come from the wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from msclip.data.fashion_mnist import fashion_mnist_available
from proc_utils import run_logged

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
_SITECUSTOMIZE = f"""import sys
sys.path[:] = [p for p in sys.path if p.rstrip('/') != {str(SRC)!r}]
"""


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = run_logged(cmd, cwd=cwd, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(empty working folder, environment, console script) with msclip importable only from a freshly installed wheel."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # Build from a copy: an in-tree build would leave build/ behind, and a stale build/ can hide missing data.
    tree = root / "tree"
    shutil.copytree(SRC, tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
          str(tree)], cwd=root, env=env, timeout=300)
    (wheel,) = (root / "dist").glob("msclip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("msclip/__main__.py", "msclip/model_configs/msclip-s-b32-tiny.json",
                   "msclip/recipes/demo-fmnist-msclip-s.yaml", "msclip/recipes/demo-fmnist-clip.yaml"):
        assert needed in names, f"{needed} is missing from the wheel"
    target, shim = root / "site", root / "shim"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
         cwd=root, env=env, timeout=300)
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env["PYTHONPATH"] = f"{shim}{os.pathsep}{target}"
    work = root / "empty"
    work.mkdir()
    where = _run([sys.executable, "-c", "import msclip, sys; print(msclip.__file__); print(sys.path)"],
                 cwd=work, env=env, timeout=120).stdout.splitlines()
    assert where[0].startswith(str(target)), f"msclip imported from {where[0]}, not from the wheel"
    assert str(SRC) not in where[1]
    script = target / "bin" / "msclip"
    assert script.is_file(), "the wheel installs no `msclip` console script"
    return work, env, script


@pytest.mark.slow
def test_wheel_console_script_and_module(installed):
    work, env, _ = installed  # the packaged configs and recipes: the demo test below uses them
    help_text = _run([sys.executable, "-m", "msclip", "--help"], cwd=work, env=env, timeout=120).stdout
    for command in ("train", "demo", "zeroshot", "info"):
        assert command in help_text


@pytest.mark.slow
@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_wheel_runs_the_demo_from_an_empty_folder(installed):
    work, env, script = installed
    proc = _run([str(script), "demo", "--steps", "2", "--test-images", "200"], cwd=work, env=env, timeout=600)
    reports = list((work / "reports").rglob("*"))
    assert reports, f"the demo wrote no report under {work / 'reports'}\n{proc.stdout[-2000:]}"
    per_class = next(p for p in reports if p.name == "zeroshot.md").read_text()
    assert "(200 test images)" in per_class
