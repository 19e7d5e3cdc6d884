"""The notebook sequence as files: discovery (``NN_topic.ipynb``), titles, the parameters cell,
and the metadata stripping that keeps committed notebooks free of run noise.
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

__all__ = ["NOTEBOOK_RE", "KERNELSPEC", "NotebookInfo", "default_notebooks_dir", "discover_notebooks",
           "parameters_cell", "strip_notebook_metadata"]

NOTEBOOK_RE = re.compile(r"^(\d{2})_([A-Za-z0-9_]+)\.ipynb$")
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
_DROP_CELL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}
_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
_RESERVED_PARAMETERS = ("profile", "output_dir")


@dataclass(frozen=True)
class NotebookInfo:
    """One notebook of the sequence: ``number`` "02", ``name`` "02_linear_regression"."""

    number: str
    name: str
    path: Path
    title: str



def default_notebooks_dir() -> Path:
    """The ``notebooks/`` folder of the source checkout (editable install) or of the cwd.

    Raises:
        FileNotFoundError: neither exists.
    """
    for cand in (Path(__file__).resolve().parents[2] / "notebooks", Path.cwd() / "notebooks"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("no notebooks/ folder next to the package or in the current directory; pass notebooks_dir")


def _title(path: Path) -> str:
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # noqa: BLE001 - an unreadable notebook is listed untitled and fails when it runs
        return ""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.strip().startswith("#"):
                    return line.strip().lstrip("#").strip()
            break
    return ""


def discover_notebooks(root: str | Path | None = None, only: Sequence[str | int] | None = None) -> list[NotebookInfo]:
    """List ``NN_topic.ipynb`` notebooks of ``root`` in sequence order.

    Args:
        root: folder holding the sequence; default :func:`default_notebooks_dir`.
        only: restrict to these notebooks, each given as a number (``"02"``, ``"2"``, ``2``)
            or a name (``"02_linear_regression"``, with or without ``.ipynb``).

    Raises:
        ValueError: an entry of ``only`` matches no notebook.
    """
    root = default_notebooks_dir() if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"root must be a folder of notebooks, got {str(root)!r}")
    found = []
    for path in sorted(root.iterdir()):
        m = NOTEBOOK_RE.match(path.name)
        if m and path.is_file():
            found.append(NotebookInfo(m.group(1), path.stem, path, _title(path)))
    if only is None:
        return found
    if isinstance(only, (str, int)):
        only = [only]
    selected: list[NotebookInfo] = []
    for item in only:
        key = str(item).removesuffix(".ipynb")
        if key.isdigit():
            match = [nb for nb in found if int(nb.number) == int(key)]
        else:
            match = [nb for nb in found if nb.name == key]
        if not match:
            raise ValueError(f"only: {item!r} matches no notebook in {root}; available: {[nb.name for nb in found]}")
        selected.extend(nb for nb in match if nb not in selected)
    return sorted(selected, key=lambda nb: nb.name)


def parameters_cell(nb: nbformat.NotebookNode, name: str) -> dict[str, Any]:
    """Literal assignments of the single cell tagged ``parameters``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{name}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    values: dict[str, Any] = {}
    for stmt in ast.parse(cells[0].source).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                values[stmt.targets[0].id] = ast.literal_eval(stmt.value)
            except ValueError:
                values[stmt.targets[0].id] = None
    return values


def strip_notebook_metadata(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Return a copy of an executed notebook without run-specific noise.

    Removes top-level ``papermill`` and ``widgets`` metadata, per-cell ``papermill`` and
    ``execution`` metadata, empty ``tags`` lists, papermill's injected-parameters and
    error-marker cells, and widget views from outputs that also have a plain-text form
    (their state is not kept); merges consecutive stream outputs of the same stream (the
    split depends on kernel flush timing); sets the kernelspec to ``python3``. Outputs,
    execution counts and tags are kept.
    """
    if not isinstance(nb, nbformat.NotebookNode):
        raise TypeError(f"nb must be an nbformat.NotebookNode, got {type(nb).__name__}")
    nb = copy.deepcopy(nb)
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = nbformat.from_dict(dict(KERNELSPEC))
    cells = []
    for cell in nb.cells:
        tags = cell.metadata.get("tags")
        if tags is not None and _DROP_CELL_TAGS.intersection(tags):
            continue
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if tags == []:
            cell.metadata.pop("tags")
        outputs = []
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data is not None and _WIDGET_MIME in data and "text/plain" in data:
                data.pop(_WIDGET_MIME)
            prev = outputs[-1] if outputs else None
            if (
                output.get("output_type") == "stream"
                and prev is not None
                and prev.get("output_type") == "stream"
                and prev.get("name") == output.get("name")
            ):
                prev["text"] += output["text"]  # how the kernel chunked a print loop is noise
                continue
            outputs.append(output)
        if cell.cell_type == "code":
            cell.outputs = outputs
        cells.append(cell)
    nb.cells = cells
    return nb


