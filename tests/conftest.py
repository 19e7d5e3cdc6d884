"""Shared fixtures: tiny throwaway notebooks for the runner tests.

The notebooks are written with nbformat into ``tmp_path``; they follow the project's
anatomy (title cell, one ``parameters`` cell, code) but run in about a second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import nbformat
import pytest

PARAMETERS_CELL = '''seed = 0                        # RNG seed
device = "auto"                 # "auto" | "cpu" | "cuda"
profile = "{profile}"           # "smoke" | "default" | "full"
output_dir = "{output_dir}"     # results.json goes here
scale = 1                       # a size parameter'''


def build_notebook(title: str, body: Sequence[str], *, profile: str = "default", output_dir: str = "../outputs/tiny"):
    """A notebook: markdown title, the tagged parameters cell, then one code cell per ``body`` entry."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    params = nbformat.v4.new_code_cell(PARAMETERS_CELL.format(profile=profile, output_dir=output_dir))
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}\n\nA tiny test notebook."), params]
    nb.cells += [nbformat.v4.new_code_cell(src) for src in body]
    return nb


SAVE_CELL = '''import sys
from fedlora_lite.course.reporting import save_results
value = {{"smoke": 1.0, "default": 2.0, "full": 3.0}}[profile] * scale
print("value", value)
results = {{"value": value, "nested": {{"seed": seed}}, "executable": sys.executable}}
save_results(results, output_dir, notebook="{name}")'''


@pytest.fixture
def make_notebook(tmp_path: Path) -> Callable[..., Path]:
    """Factory ``make_notebook(name, body=None, **kw) -> path`` writing into ``tmp_path/notebooks``.

    ``body=None`` gives a notebook that saves ``value = profile_factor * scale``.
    """
    root = tmp_path / "notebooks"
    root.mkdir(exist_ok=True)

    def factory(name: str, body: Sequence[str] | None = None, *, title: str | None = None, **kwargs) -> Path:
        if body is None:
            body = [SAVE_CELL.format(name=name)]
        nb = build_notebook(title or f"Notebook {name}", body, **kwargs)
        path = root / f"{name}.ipynb"
        nbformat.write(nb, path)
        return path

    return factory


@pytest.fixture
def notebook_builder() -> Callable[..., nbformat.NotebookNode]:
    """:func:`build_notebook` as a fixture (for tests that need an in-memory notebook)."""
    return build_notebook


@pytest.fixture
def one_thread():
    """Run a test with one torch intra-op thread (small models: faster and bit-reproducible), then restore."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
