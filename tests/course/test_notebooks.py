"""Execute every notebook of the sequence once on the ``smoke`` profile through the runner.

nbval (configured in pyproject.toml) separately re-executes the committed notebooks on
their default profile and compares the ``# NBVAL_CHECK_OUTPUT`` summary cells; this test
checks that each notebook also runs end to end on the cheap profile the CLI offers, and
that it writes a ``results.json`` of finite key numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import nbformat
import pytest

from fedlora_lite.course.notebooks import discover_notebooks
from fedlora_lite.course.runner import run_notebooks

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = discover_notebooks(NOTEBOOKS_DIR) if NOTEBOOKS_DIR.is_dir() else []


def _numbers(value):
    """Every int/float leaf of a nested results mapping (bools excluded)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_notebook_anatomy(notebook):
    """One parameters cell with seed/device/profile/output_dir; a checked summary cell."""
    nb = nbformat.read(notebook.path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell must be tagged 'parameters'"
    for name in ("seed", "device", "profile", "output_dir"):
        assert any(line.startswith(f"{name} = ") for line in params[0].source.splitlines()), name
    assert 'profile = "default"' in params[0].source, "committed notebooks show the default profile"
    assert nb.cells[0].cell_type == "markdown" and notebook.title, "first cell: markdown title"
    checked = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# NBVAL_CHECK_OUTPUT")]
    assert checked, "the summary cell starts with '# NBVAL_CHECK_OUTPUT'"
    assert all(c.outputs for c in checked), "commit the default-profile outputs (fedlora-lite refresh)"
    assert nb.metadata.kernelspec.name == "python3"
    assert "papermill" not in nb.metadata, "strip metadata noise (fedlora-lite refresh does it)"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_notebook_runs_on_smoke_profile(notebook, tmp_path):
    report = run_notebooks("smoke", only=[notebook.name], out=tmp_path, progress=False, notebooks_dir=NOTEBOOKS_DIR)
    assert report.ok, report.format_failures()
    run = report.runs[0]
    assert (tmp_path / f"{notebook.name}.ipynb").is_file()
    assert (tmp_path / notebook.name / "results.json").is_file()
    numbers = list(_numbers(run.results))
    assert numbers, "results.json should hold at least one key number"
    assert all(math.isfinite(x) for x in numbers)
