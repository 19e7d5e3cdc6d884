"""The static HTML course (fedlora_lite.course.site): pages in order, navigation, figures, summary table."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from fedlora_lite.course import cli
from fedlora_lite.course.editions import SOLUTION_TAG
from fedlora_lite.course.notebooks import discover_notebooks
from fedlora_lite.course.site import build_site, summary_rows

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def _executed(make_notebook, name, *, title=None, figure=True, solution=False, link=None):
    path = make_notebook(name, ["print('hello')", "# NBVAL_CHECK_OUTPUT\nprint('answer: 42')"], title=title)
    nb = nbformat.read(path, as_version=4)
    for k, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = k + 1
    nb.cells[-1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="answer: 42\nnot a pair\n")]
    if figure:
        nb.cells[2].outputs = [nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "fig"})]
    if solution:
        sol = nbformat.v4.new_code_cell("print('secret solution')", execution_count=9)
        sol.metadata["tags"] = [SOLUTION_TAG]
        nb.cells.append(sol)
    if link:
        nb.cells.append(nbformat.v4.new_markdown_cell(f"See [the next one]({link}.ipynb#top)."))
    nbformat.write(nb, path)
    return path


def test_site_pages_navigation_figures_and_summary(make_notebook, tmp_path):
    _executed(make_notebook, "00_first", title="00 · First steps", link="01_second")
    _executed(make_notebook, "01_second", title="Second", solution=True)
    report = build_site(tmp_path / "site", notebooks_dir=tmp_path / "notebooks")
    assert [p.name for p in report.pages] == ["00_first.html", "01_second.html"]
    assert report.figures == {"00_first": 1, "01_second": 1}
    assert report.summary["00_first"] == [("answer", "42")]

    first = (tmp_path / "site" / "00_first.html").read_text()
    second = (tmp_path / "site" / "01_second.html").read_text()
    assert 'href="01_second.html" rel="next"' in first and 'rel="prev"' not in first
    assert 'href="00_first.html" rel="prev"' in second and 'rel="next"' not in second
    assert "00 · First steps →" not in first and "01 · Second →" in first  # labels without a doubled number
    assert 'href="01_second.html#top"' in first  # links between notebooks point at the pages
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', first)) == 1
    assert 'details class="course-solution"' in second and "secret solution" in second
    index = report.index.read_text()
    assert index.index("00_first.html") < index.index("01_second.html")
    assert '<td class="value">42</td>' in index and (tmp_path / "site" / "course.css").is_file()

    student = build_site(tmp_path / "student", notebooks_dir=tmp_path / "notebooks", student=True)
    assert "secret solution" not in student.pages[1].read_text()


def test_site_refuses_unexecuted_notebooks(make_notebook, tmp_path):
    make_notebook("00_raw")
    with pytest.raises(ValueError, match="no executed cells"):
        build_site(tmp_path / "site", notebooks_dir=tmp_path / "notebooks")
    assert cli.main(["site", "--out", str(tmp_path / "s"), "--notebooks", str(tmp_path / "notebooks")]) == 2


def test_site_of_the_committed_course(tmp_path):
    """Every committed notebook becomes a page with all its figures and its summary rows."""
    report = build_site(tmp_path / "site")
    infos = discover_notebooks(NOTEBOOKS_DIR)
    assert [p.stem for p in report.pages] == [nb.name for nb in infos]
    for info, page in zip(infos, report.pages):
        nb = nbformat.read(info.path, as_version=4)
        text = page.read_text()
        assert report.figures[info.name] >= 1, info.name
        assert len(re.findall(r'<img[^>]+src="data:image/', text)) == report.figures[info.name], info.name
        assert report.summary[info.name] == summary_rows(nb) and report.summary[info.name], info.name
