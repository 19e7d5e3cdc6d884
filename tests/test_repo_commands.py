"""The README's commands and the repository's test configuration, checked on a fresh-clone layout.

Each test builds the layout it needs in ``tmp_path`` (no ``outputs/`` folder, as in a fresh
clone) and runs the command as a user would type it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # the .venv running the tests


def _readme_block(containing: str) -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"expected one README bash block containing {containing!r}"
    return found[0]


def test_readme_papermill_sweep_loop_runs_on_a_fresh_clone(tmp_path):
    block = _readme_block("papermill 02_linear_regression.ipynb")
    assert "mkdir -p ../outputs/sweep" in block
    (tmp_path / "notebooks").mkdir()
    shutil.copy(ROOT / "notebooks" / "02_linear_regression.ipynb", tmp_path / "notebooks")
    (tmp_path / ".venv").symlink_to(VENV)
    one_seed = block.replace("for s in 0 1 2; do", "for s in 0; do")  # the loop as written, one pass
    assert one_seed != block
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", one_seed], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "outputs" / "sweep" / "02_seed0" / "results.json").read_text())
    assert results["notebook"] == "02_linear_regression" and results["results"]
    assert (tmp_path / "outputs" / "sweep" / "02_seed0.ipynb").is_file()


def test_nbconvert_copies_are_not_collected_by_nbval(tmp_path):
    for name in ("pyproject.toml", "conftest.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "sanitize.cfg", tmp_path / "tests" / "sanitize.cfg")
    (tmp_path / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(1)")]
    nbformat.write(nb, tmp_path / "notebooks" / "00_probe.ipynb")
    nbformat.write(nb, tmp_path / "notebooks" / "00_probe.nbconvert.ipynb")  # what jupyter nbconvert --execute writes
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "notebooks"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "00_probe.ipynb::" in done.stdout and "nbconvert" not in done.stdout, done.stdout
