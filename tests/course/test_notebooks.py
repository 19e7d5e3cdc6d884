"""Execute every notebook of the sequence on the ``smoke`` profile through the runner, twice.

nbval (configured in pyproject.toml) separately re-executes the committed notebooks on
their default profile and compares the ``# NBVAL_CHECK_OUTPUT`` summary cells; these tests
check that each notebook also runs end to end on the cheap profile the CLI offers, that it
writes a ``results.json`` of finite key numbers, and that a second run with the same seed
(in another folder, so nothing is cached) writes the same ``results.json`` byte for byte.
Wall-clock measurements live in ``timings.json`` and are not compared. The second run is
the price of the determinism check: one more smoke run of the sequence (about 50 s on the
project's 2-core machine).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import pytest

from fedlora_lite.course.notebooks import discover_notebooks
from fedlora_lite.course.reporting import load_timings
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


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run of the whole sequence (a failing notebook does not stop the others)."""
    out = tmp_path_factory.mktemp("smoke")
    report = run_notebooks("smoke", out=out, progress=False, notebooks_dir=NOTEBOOKS_DIR)
    return out, {r.name: r for r in report.runs}, report


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_notebook_runs_on_smoke_profile(notebook, smoke_run):
    out, runs, report = smoke_run
    run = runs[notebook.name]
    assert run.ok, report.format_failures()
    assert (out / f"{notebook.name}.ipynb").is_file()
    assert (out / notebook.name / "results.json").is_file()
    numbers = list(_numbers(run.results))
    assert numbers, "results.json should hold at least one key number"
    assert all(math.isfinite(x) for x in numbers)
    record = json.loads((out / notebook.name / "results.json").read_text())["run"]
    assert record["parameters"]["profile"] == "smoke" and "seed" in record["parameters"]


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two results payloads."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix or "<root>"]
    keys = list(a) + [k for k in b if k not in a]
    return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_same_seed_gives_byte_identical_results(notebook, smoke_run, tmp_path):
    """A second smoke run in a fresh folder writes the same results.json (timings.json is not compared)."""
    out, runs, _ = smoke_run
    assert runs[notebook.name].ok, "the first smoke run failed (see test_notebook_runs_on_smoke_profile)"
    report = run_notebooks("smoke", only=[notebook.name], out=tmp_path, progress=False, notebooks_dir=NOTEBOOKS_DIR)
    assert report.ok, report.format_failures()
    first = (out / notebook.name / "results.json").read_bytes()
    second = (tmp_path / notebook.name / "results.json").read_bytes()
    assert first == second, f"results differ between same-seed runs at {_differences(json.loads(first), json.loads(second))}"
    timings = tmp_path / notebook.name / "timings.json"
    if timings.exists():
        assert load_timings(timings)
