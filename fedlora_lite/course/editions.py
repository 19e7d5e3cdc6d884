"""Student and instructor editions of the notebooks: exercises with hidden solutions.

Tag convention (cell metadata ``tags``, set in JupyterLab's property inspector or by
editing the notebook JSON):

* ``solution``: a worked solution (code or Markdown). It is part of the committed notebook,
  so ``fedlora-lite refresh`` executes it, nbval re-runs it and the instructor sees its
  output; the **student edition removes it** (nbconvert's ``TagRemovePreprocessor``).
* ``hint``: a Markdown hint. Both editions keep it; the student edition collapses it
  (``metadata.jupyter.source_hidden``), so a student opens it on purpose.

Rules that keep the student edition runnable, checked by :func:`check_editions_source`:
no later, non-solution code cell may use a name that only a solution cell defines, the
``parameters`` cell is never a solution, and near-miss tags (``Solution``, ``solutions``,
``answer``) are refused rather than silently leaking a solution to students.

:func:`build_editions` writes ``<out>/student/NN_topic.ipynb`` and
``<out>/instructor/NN_topic.ipynb`` for the sequence (``fedlora-lite editions --out DIR``).
"""

from __future__ import annotations

import ast
import builtins
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .notebooks import default_notebooks_dir, discover_notebooks, strip_notebook_metadata

__all__ = ["SOLUTION_TAG", "HINT_TAG", "EditionsReport", "student_edition", "instructor_edition",
           "check_editions_source", "build_editions"]

SOLUTION_TAG = "solution"
HINT_TAG = "hint"
_NEAR_MISSES = {"solutions", "answer", "answers", "hints"}


@dataclass
class EditionsReport:
    """What :func:`build_editions` wrote: the two folders and each notebook's solution count."""

    out_dir: Path
    student: list[Path] = field(default_factory=list)
    instructor: list[Path] = field(default_factory=list)
    solutions: dict[str, int] = field(default_factory=dict)
    hints: dict[str, int] = field(default_factory=dict)


def _tags(cell: nbformat.NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _bound_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _loaded_names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _parse(source: str) -> ast.AST | None:
    # IPython magics (%matplotlib, !pip) are not Python; such a cell is skipped by the check
    try:
        return ast.parse(source)
    except SyntaxError:
        return None


def check_editions_source(nb: nbformat.NotebookNode, name: str = "notebook") -> tuple[int, int]:
    """Check a notebook's solution/hint tags; return ``(number of solution cells, number of hints)``.

    Raises:
        TypeError: ``nb`` is not an nbformat notebook.
        ValueError: a near-miss tag, a solution-tagged ``parameters`` cell, a hint that is
            not Markdown, or a later non-solution code cell that uses a name only a
            solution cell defines (the student edition would fail there).
    """
    if not isinstance(nb, nbformat.NotebookNode):
        raise TypeError(f"nb must be an nbformat.NotebookNode, got {type(nb).__name__}")
    n_solutions = n_hints = 0
    defined: set[str] = set(dir(builtins))
    solution_only: dict[str, int] = {}
    for i, cell in enumerate(nb.cells):
        tags = _tags(cell)
        wrong = [t for t in tags if t != t.lower() and t.lower() in {SOLUTION_TAG, HINT_TAG}]
        wrong += [t for t in tags if t.lower() in _NEAR_MISSES]
        if wrong:
            raise ValueError(f"{name}: cell {i} has tag(s) {wrong}; the tags are exactly {SOLUTION_TAG!r} and "
                             f"{HINT_TAG!r} (a misspelt tag would leak a solution into the student edition)")
        is_solution = SOLUTION_TAG in tags
        if is_solution and "parameters" in tags:
            raise ValueError(f"{name}: cell {i} is the parameters cell and cannot be a solution")
        if HINT_TAG in tags:
            if cell.cell_type != "markdown":
                raise ValueError(f"{name}: cell {i} is tagged {HINT_TAG!r} but is a {cell.cell_type} cell; "
                                 "hints are Markdown (put code in a solution cell)")
            n_hints += 1
        n_solutions += is_solution
        if cell.cell_type != "code":
            continue
        tree = _parse(cell.source)
        if tree is None:
            continue
        if is_solution:
            for n in _bound_names(tree) - defined:
                solution_only.setdefault(n, i)
            continue
        own = _bound_names(tree)
        used = sorted(n for n in (_loaded_names(tree) - own) & set(solution_only) if n not in defined)
        if used:
            where = ", ".join(f"{n!r} (cell {solution_only[n]})" for n in used)
            raise ValueError(f"{name}: cell {i} uses {where} defined only in a {SOLUTION_TAG!r} cell; the student "
                             "edition (solutions removed) would fail there")
        defined |= own
    return n_solutions, n_hints


def student_edition(nb: nbformat.NotebookNode, *, clear_outputs: bool = False) -> nbformat.NotebookNode:
    """A copy without ``solution`` cells, hints collapsed (and optionally outputs cleared)."""
    from nbconvert.preprocessors import ClearOutputPreprocessor, TagRemovePreprocessor

    nb = copy.deepcopy(nb)
    remover = TagRemovePreprocessor(remove_cell_tags={SOLUTION_TAG}, enabled=True)
    nb, _ = remover.preprocess(nb, {})
    if clear_outputs:
        nb, _ = ClearOutputPreprocessor(enabled=True).preprocess(nb, {})
    for cell in nb.cells:
        if HINT_TAG in _tags(cell):
            cell.metadata.setdefault("jupyter", {})["source_hidden"] = True
    left = [i for i, c in enumerate(nb.cells) if SOLUTION_TAG in _tags(c)]
    if left:  # pragma: no cover - guards against a change in nbconvert's behaviour
        raise RuntimeError(f"solution cells {left} survived the tag removal")
    return nb


def instructor_edition(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy with everything (solutions and hints shown, outputs kept)."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if HINT_TAG in _tags(cell):
            cell.metadata.get("jupyter", {}).pop("source_hidden", None)
    return nb


def build_editions(
    out: str | Path,
    *,
    notebooks_dir: str | Path | None = None,
    only: Sequence[str | int] | None = None,
    clear_outputs: bool = False,
) -> EditionsReport:
    """Write the student and instructor editions of the sequence under ``out``.

    Args:
        out: output folder; ``out/student`` and ``out/instructor`` are (re)written.
        notebooks_dir: the sequence; default the checkout's ``notebooks/`` (committed,
            executed notebooks, so both editions show the default-profile outputs).
        only: subset of notebooks (numbers or names).
        clear_outputs: student edition without outputs (a blank worksheet).

    Returns:
        An :class:`EditionsReport`.

    Raises:
        ValueError: no notebooks, or a notebook breaks the tag rules
            (:func:`check_editions_source`); nothing is written then.
    """
    nb_dir = default_notebooks_dir() if notebooks_dir is None else Path(notebooks_dir)
    infos = discover_notebooks(nb_dir, only)
    if not infos:
        raise ValueError(f"no NN_topic.ipynb notebooks found in {nb_dir}")
    out_dir = Path(out).resolve()
    if out_dir == nb_dir.resolve() or nb_dir.resolve() in out_dir.parents:
        # editions inside notebooks/ would be collected by nbval as extra notebooks
        raise ValueError(f"out must be a folder outside the notebooks folder {nb_dir}, got {out_dir}")
    report = EditionsReport(out_dir=out_dir)
    sources = {}
    for info in infos:  # check everything first: a bad notebook must not leave half an edition
        nb = strip_notebook_metadata(nbformat.read(info.path, as_version=4))
        report.solutions[info.name], report.hints[info.name] = check_editions_source(nb, info.name)
        sources[info.name] = nb
    for kind, make, paths in (
        ("student", lambda nb: student_edition(nb, clear_outputs=clear_outputs), report.student),
        ("instructor", instructor_edition, report.instructor),
    ):
        folder = out_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.ipynb"):
            stale.unlink()
        for name, nb in sources.items():
            path = folder / f"{name}.ipynb"
            nbformat.write(make(nb), path)
            paths.append(path)
    return report
