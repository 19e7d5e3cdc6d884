""".ci/setup's torch choice and .ci/constraints.txt, checked without installing anything.

``SETUP_PLAN=1`` makes the script print its decisions (which torch build, from which source,
whether the torch in .venv is kept or replaced, which constraints) and exit. Both sources of
the CPU build are exercised by controlling what pip can see: a folder holding a (fake)
``torch-2.13.0+cpu`` wheel, or nothing at all; a GPU request is checked against the CPU torch
of this .venv, and a failing GPU install must stop setup instead of keeping the CPU build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / ".ci" / "setup"


def _setup(tmp_path, **env) -> subprocess.CompletedProcess:
    """Run .ci/setup on the virtual environment running these tests (wherever it lives)."""
    full = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "SETUP_VENV": sys.prefix, **env}
    return subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=300, env=full, cwd=tmp_path)


def _plan(tmp_path, **env) -> str:
    done = _setup(tmp_path, SETUP_PLAN="1", **env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _fake_wheel(folder: Path, ver: str) -> None:
    """A minimal wheel named like PyTorch's, enough for pip to resolve it (never installed)."""
    info = f"torch-{ver}.dist-info"
    with zipfile.ZipFile(folder / f"torch-{ver}-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {ver}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS uses plain torch==2.13.0 (no +cpu wheels exist there)")
def test_cpu_build_comes_from_local_wheels_when_pip_finds_them_else_from_the_cpu_index(tmp_path):
    wheels, empty = tmp_path / "wheels", tmp_path / "empty"
    wheels.mkdir()
    empty.mkdir()
    _fake_wheel(wheels, "2.13.0+cpu")
    local = _plan(tmp_path, PIP_FIND_LINKS=str(wheels), PIP_NO_INDEX="1")
    assert "torch requirement torch==2.13.0+cpu" in local
    assert "torch from pip's configured indexes and wheel folders" in local
    remote = _plan(tmp_path, PIP_FIND_LINKS=str(empty), PIP_NO_INDEX="1")
    assert "torch requirement torch==2.13.0+cpu" in remote
    assert "torch from https://download.pytorch.org/whl/cpu (pip does not find torch==2.13.0+cpu without it)" in remote
    assert "constraints" in remote and "pins" in remote


def test_gpu_request_replaces_the_cpu_build_and_fails_loudly_when_it_cannot(tmp_path):
    import torch

    assert torch.version.cuda is None, "test premise: this .venv holds the CPU build"
    empty = tmp_path / "empty"
    empty.mkdir()
    plan = _plan(tmp_path, TORCH_BUILD="cu126", PIP_FIND_LINKS=str(empty), PIP_NO_INDEX="1")
    assert "torch requirement torch==2.13.0+cu126" in plan
    assert "torch from https://download.pytorch.org/whl/cu126" in plan
    assert f"will be installed or replaced: installed torch {torch.__version__} does not satisfy torch==2.13.0+cu126" in plan
    # the real run: pip cannot find the CUDA wheel (no index here); setup must stop, not keep the CPU build
    done = _setup(tmp_path, TORCH_BUILD="cu126", PIP_FIND_LINKS=str(empty), PIP_NO_INDEX="1")
    assert done.returncode != 0
    assert "installing torch==2.13.0+cu126 failed" in done.stderr
    assert torch.__version__ == version("torch")  # nothing was changed


def test_bad_build_and_custom_spec(tmp_path):
    done = _setup(tmp_path, TORCH_BUILD="gpu", SETUP_PLAN="1")
    assert done.returncode == 1 and "TORCH_BUILD must be 'cpu', a CUDA tag" in done.stderr
    custom = _plan(tmp_path, TORCH_SPEC="torch==2.13.0", TORCH_INDEX="https://example.invalid/simple",
                   PIP_FIND_LINKS=str(tmp_path), PIP_NO_INDEX="1")
    assert "torch requirement torch==2.13.0 (TORCH_BUILD=cpu, TORCH_SPEC given)" in custom
    assert "torch from https://example.invalid/simple" in custom


def test_constraints_pin_exactly_what_this_environment_tested():
    text = (ROOT / ".ci" / "constraints.txt").read_text()
    pins = dict(line.split("==") for line in text.splitlines() if line and not line.startswith("#"))
    assert "torch" not in pins  # .ci/setup chooses torch's build
    assert pins["transformers"] == "5.24.0" and pins["peft"] == "0.21.2"
    done = subprocess.run([sys.executable, str(ROOT / ".ci" / "make-constraints"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr  # regenerate with .venv/bin/python .ci/make-constraints
