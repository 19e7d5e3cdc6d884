"""Student / instructor editions: solutions removed for students, and the solutions run."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from fedlora_lite.course import cli
from fedlora_lite.course.editions import (
    HINT_TAG,
    SOLUTION_TAG,
    build_editions,
    check_editions_source,
    student_edition,
)
from fedlora_lite.course.runner import run_notebooks
from tests.conftest import SAVE_CELL

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
SOLUTION_SOURCE = "answer = sum(k * k for k in range(1, 4))\nassert answer == 14, answer\nprint('solution ran', answer)"


def _tagged(nb, tag):
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def _exercise_notebook(make_notebook, name="00_exercise"):
    """A tiny notebook: exercise text, a hint, a solution (markdown + code), then the results cell."""
    path = make_notebook(name, ["x = 3", SOLUTION_SOURCE, SAVE_CELL.format(name=name)])
    nb = nbformat.read(path, as_version=4)
    nb.cells[3].metadata["tags"] = [SOLUTION_TAG]
    hint = nbformat.v4.new_markdown_cell("*Hint*: 1 + 4 + 9.")
    hint.metadata["tags"] = [HINT_TAG]
    sol_md = nbformat.v4.new_markdown_cell("**Solution.** Add the three squares.")
    sol_md.metadata["tags"] = [SOLUTION_TAG]
    nb.cells[3:3] = [nbformat.v4.new_markdown_cell("**Exercise.** Sum the squares of 1..3."), hint, sol_md]
    nbformat.write(nb, path)
    return path


def test_student_edition_has_no_solutions_and_both_editions_run(make_notebook, tmp_path):
    src = _exercise_notebook(make_notebook)
    report = build_editions(tmp_path / "ed", notebooks_dir=tmp_path / "notebooks")
    assert report.solutions == {"00_exercise": 2} and report.hints == {"00_exercise": 1}
    student = nbformat.read(report.student[0], as_version=4)
    instructor = nbformat.read(report.instructor[0], as_version=4)
    source = nbformat.read(src, as_version=4)

    assert not _tagged(student, SOLUTION_TAG)
    assert all("answer" not in c.source and "Add the three squares" not in c.source for c in student.cells)
    assert len(student.cells) == len(source.cells) - 2
    hint = _tagged(student, HINT_TAG)[0]
    assert hint.metadata["jupyter"]["source_hidden"] is True  # collapsed for students
    assert [c.source for c in instructor.cells] == [c.source for c in source.cells]
    assert "source_hidden" not in _tagged(instructor, HINT_TAG)[0].metadata.get("jupyter", {})

    # the solutions run (instructor edition) and the student edition runs without them
    for kind in ("instructor", "student"):
        run = run_notebooks("smoke", out=tmp_path / f"run_{kind}", progress=False, notebooks_dir=tmp_path / "ed" / kind)
        assert run.ok, run.format_failures()
    executed = nbformat.read(tmp_path / "run_instructor" / "00_exercise.ipynb", as_version=4)
    solution_cell = next(c for c in executed.cells if c.source == SOLUTION_SOURCE)
    assert "solution ran 14" in "".join(o.get("text", "") for o in solution_cell.outputs)


def test_clear_outputs_and_rebuild_replaces_stale_files(make_notebook, tmp_path):
    path = _exercise_notebook(make_notebook)
    nb = nbformat.read(path, as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="old output\n")]
    nb.cells[2].execution_count = 1
    nbformat.write(nb, path)
    out = tmp_path / "ed"
    (out / "student").mkdir(parents=True)
    (out / "student" / "99_stale.ipynb").write_text("{}")
    report = build_editions(out, notebooks_dir=tmp_path / "notebooks", clear_outputs=True)
    assert sorted(p.name for p in (out / "student").iterdir()) == ["00_exercise.ipynb"]
    student = nbformat.read(report.student[0], as_version=4)
    assert all(not c.get("outputs") for c in student.cells if c.cell_type == "code")
    instructor = nbformat.read(report.instructor[0], as_version=4)
    assert instructor.cells[2].outputs[0]["text"] == "old output\n"  # the instructor keeps outputs


@pytest.mark.parametrize(
    ("cells", "match"),
    [
        ([("code", "y = 1", ["Solution"]), ("code", "print(2)", [])], "tag"),
        ([("code", "y = 1", ["solutions"])], "tag"),
        ([("code", "print(1)", [HINT_TAG])], "Markdown"),
        ([("code", "def helper(v):\n    return v", [SOLUTION_TAG]), ("code", "print(helper(3))", [])], "helper"),
    ],
)
def test_bad_tagging_is_refused(cells, match):
    nb = nbformat.v4.new_notebook()
    for kind, source, tags in cells:
        cell = nbformat.v4.new_code_cell(source) if kind == "code" else nbformat.v4.new_markdown_cell(source)
        cell.metadata["tags"] = tags
        nb.cells.append(cell)
    with pytest.raises(ValueError, match=match):
        check_editions_source(nb)


def test_names_a_later_cell_defines_itself_are_fine():
    nb = nbformat.v4.new_notebook()
    sol = nbformat.v4.new_code_cell("tmp = [k for k in range(3)]")
    sol.metadata["tags"] = [SOLUTION_TAG]
    nb.cells = [sol, nbformat.v4.new_code_cell("tmp = 5\nprint(tmp)"), nbformat.v4.new_code_cell("def f(tmp):\n    return tmp")]
    assert check_editions_source(nb) == (1, 0)
    assert len(student_edition(nb).cells) == 2


def test_real_notebooks_editions_and_their_solutions(tmp_path):
    """Every committed notebook passes the tag rules; 01 has an exercise solution, which ran at refresh.

    (nbval re-runs the committed notebooks, solution cells included, in the same test session.)
    """
    report = build_editions(tmp_path / "ed", notebooks_dir=NOTEBOOKS_DIR)
    assert report.solutions.get("01_clair_theory", 0) >= 1 and report.hints.get("01_clair_theory", 0) >= 1
    for student_path, instructor_path in zip(report.student, report.instructor):
        student = nbformat.read(student_path, as_version=4)
        instructor = nbformat.read(instructor_path, as_version=4)
        assert not _tagged(student, SOLUTION_TAG), student_path.name
        assert len(instructor.cells) - len(student.cells) == report.solutions[student_path.stem]
        for cell in _tagged(instructor, SOLUTION_TAG):
            if cell.cell_type == "code":
                assert cell.outputs, f"{student_path.stem}: solution cell not executed (fedlora-lite refresh)"
                assert all(o["output_type"] != "error" for o in cell.outputs)


def test_cli_editions(tmp_path, make_notebook, capsys):
    _exercise_notebook(make_notebook)
    code = cli.main(["editions", "--out", str(tmp_path / "ed"), "--notebooks", str(tmp_path / "notebooks")])
    assert code == 0
    assert (tmp_path / "ed" / "student" / "00_exercise.ipynb").is_file()
    assert "2 solution cell(s)" in capsys.readouterr().out
    bad = cli.main(["editions", "--out", str(tmp_path / "notebooks" / "x"), "--notebooks", str(tmp_path / "notebooks")])
    assert bad == 2
