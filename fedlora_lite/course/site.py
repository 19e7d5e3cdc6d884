"""The published course: a static HTML site built from the executed notebooks.

``fedlora-lite site --out DIR`` renders every notebook of the sequence with nbconvert's
``HTMLExporter`` (the JupyterLab template, figures embedded as PNG data) and adds

* a navigation bar on every page: the course home, the previous and next notebook
  (``rel="prev"`` / ``rel="next"``), and a contents list in notebook order;
* ``index.html``: the notebooks in order with their titles and number of figures, then the
  **summary table**, the key numbers each notebook prints in its summary cell (the cell
  starting with ``# NBVAL_CHECK_OUTPUT``, lines ``key: value``);
* solutions (cells tagged ``solution``) and hints (``hint``) folded into
  ``<details>`` blocks, so a reader opens them on purpose; ``student=True`` removes the
  solutions altogether (:func:`fedlora_lite.course.editions.student_edition`).

Links between notebooks (``02_linear_regression.ipynb``) point at the pages. The source is
the checkout's committed notebooks (executed on the default profile) or any folder of
executed ``NN_topic.ipynb`` files, e.g. ``outputs/default`` after ``fedlora-lite run``.
The pages load MathJax from its CDN for the formulas; everything else is in the files.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .editions import HINT_TAG, SOLUTION_TAG, student_edition
from .notebooks import NotebookInfo, default_notebooks_dir, discover_notebooks, strip_notebook_metadata

__all__ = ["SiteReport", "build_site", "summary_rows"]

_SUMMARY_MARK = "# NBVAL_CHECK_OUTPUT"
_SUMMARY_LINE = re.compile(r"^\s*([^:\n]{1,80}?):\s+(\S.*)$")

_TEMPLATE = r"""{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block extra_css %}<link rel="stylesheet" href="course.css">{% endblock extra_css %}
{%- block body_header -%}{{ super() }}{{ resources.course_nav }}{%- endblock body_header -%}
{% block body_footer %}{{ resources.course_footer }}{{ super() }}{% endblock body_footer %}
{% block any_cell %}
{%- set tags = cell.metadata.get('tags', []) -%}
{%- if 'solution' in tags -%}
<details class="course-solution"><summary>Solution (click to show)</summary>{{ super() }}</details>
{%- elif 'hint' in tags -%}
<details class="course-hint"><summary>Hint (click to show)</summary>{{ super() }}</details>
{%- else -%}{{ super() }}{%- endif -%}
{% endblock any_cell %}
"""

_CSS = """
.course-nav { position: sticky; top: 0; z-index: 10; background: #f6f8fa; border-bottom: 1px solid #d0d7de;
  padding: 0.5rem 1rem; font-family: system-ui, sans-serif; font-size: 0.9rem; display: flex; gap: 1.2rem;
  flex-wrap: wrap; align-items: center; }
.course-nav a { color: #0969da; text-decoration: none; }
.course-nav a:hover { text-decoration: underline; }
.course-nav details { margin-left: auto; }
.course-nav ol { margin: 0.3rem 0 0 0; padding-left: 1.5rem; background: #fff; }
.course-footer { font-family: system-ui, sans-serif; padding: 1rem; display: flex; justify-content: space-between; }
details.course-solution, details.course-hint { border-left: 3px solid #d4a72c; margin: 0.5rem 0;
  padding-left: 0.5rem; }
details.course-solution > summary, details.course-hint > summary { cursor: pointer; font-family: system-ui,
  sans-serif; color: #7d4e00; }
body.course-index { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
  line-height: 1.5; }
.course-index table { border-collapse: collapse; margin: 1rem 0; }
.course-index th, .course-index td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: left;
  vertical-align: top; }
.course-index td.value { font-family: ui-monospace, monospace; }
"""


@dataclass
class SiteReport:
    """What :func:`build_site` wrote: the index, one page per notebook, their figure counts."""

    out_dir: Path
    index: Path
    pages: list[Path] = field(default_factory=list)
    figures: dict[str, int] = field(default_factory=dict)
    summary: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    wall_time_s: float = 0.0


def summary_rows(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """``(key, value)`` pairs printed by the notebook's summary cell(s), in order."""
    rows = []
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.source.startswith(_SUMMARY_MARK):
            continue
        text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                       if o.get("output_type") == "stream" and o.get("name") == "stdout")
        rows += [(m.group(1).strip(), m.group(2).strip()) for m in map(_SUMMARY_LINE.match, text.splitlines()) if m]
    return rows


def _count_figures(nb: nbformat.NotebookNode) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if any(k.startswith("image/") for k in o.get("data", {})))


def _topic(info: NotebookInfo) -> str:
    """The title without its leading number ("01 · CLAIR theory" -> "CLAIR theory")."""
    return re.sub(rf"^{info.number}\s*[·:.-]?\s*", "", info.title) or info.name


def _link(info: NotebookInfo, rel: str = "", text: str | None = None) -> str:
    rel_attr = f' rel="{rel}"' if rel else ""
    label = html.escape(text if text is not None else f"{info.number} · {_topic(info)}")
    return f'<a href="{info.name}.html"{rel_attr}>{label}</a>'


def _nav(infos: list[NotebookInfo], i: int) -> tuple[str, str]:
    prev_link = _link(infos[i - 1], "prev", f"← {infos[i - 1].number} · {_topic(infos[i - 1])}") if i > 0 else ""
    next_link = (_link(infos[i + 1], "next", f"{infos[i + 1].number} · {_topic(infos[i + 1])} →")
                 if i + 1 < len(infos) else "")
    items = "".join(f"<li>{'<b>' if j == i else ''}{_link(nb)}{'</b>' if j == i else ''}</li>"
                    for j, nb in enumerate(infos))
    nav = (f'<nav class="course-nav" aria-label="course"><a href="index.html" rel="home">Course home</a>'
           f'<span class="course-prev">{prev_link}</span><span class="course-next">{next_link}</span>'
           f"<details><summary>Contents</summary><ol>{items}</ol></details></nav>")
    footer = f'<nav class="course-footer"><span>{prev_link}</span><span>{next_link}</span></nav>'
    return nav, footer


def _index_page(title: str, infos: list[NotebookInfo], report: SiteReport, student: bool) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{nb.number}</td><td>{_link(nb, text=nb.name)}</td><td>{esc(_topic(nb))}</td>"
        f"<td>{report.figures[nb.name]}</td></tr>" for nb in infos)
    summary = []
    for nb in infos:
        pairs = report.summary[nb.name]
        for k, (key, value) in enumerate(pairs):
            head = f'<td rowspan="{len(pairs)}">{_link(nb, text=nb.name)}</td>' if k == 0 else ""
            summary.append(f'<tr>{head}<td>{esc(key)}</td><td class="value">{esc(value)}</td></tr>')
    edition = "student edition (solutions removed)" if student else "solutions folded under each exercise"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1.0">'
        f'<link rel="stylesheet" href="course.css"></head>\n<body class="course-index"><main>'
        f"<h1>{esc(title)}</h1><p>The notebooks of the course in order, executed ({edition}). Start with "
        f"{_link(infos[0], 'next')}.</p>"
        f'<h2>Notebooks</h2><table id="notebooks"><thead><tr><th>#</th><th>notebook</th><th>topic</th>'
        f"<th>figures</th></tr></thead><tbody>{rows}</tbody></table>"
        f'<h2>Summary table</h2><p>The key numbers each notebook prints in its summary cell.</p>'
        f'<table id="summary"><thead><tr><th>notebook</th><th>key</th><th>value</th></tr></thead>'
        f"<tbody>{''.join(summary)}</tbody></table></main></body></html>\n"
    )


def build_site(
    out: str | Path,
    *,
    notebooks_dir: str | Path | None = None,
    only: list[str | int] | None = None,
    student: bool = False,
    title: str = "fedlora_lite: contamination-aware federated LoRA (CLAIR), the course",
) -> SiteReport:
    """Render the executed notebooks as a static HTML course in ``out``.

    Args:
        out: output folder (created; existing pages of the site are replaced).
        notebooks_dir: executed notebooks; default the checkout's ``notebooks/``.
        only: subset of notebooks (numbers or names).
        student: remove solution cells instead of folding them.
        title: the course title on the index page.

    Returns:
        A :class:`SiteReport`; open ``report.index`` in a browser.

    Raises:
        ValueError: no notebooks, or a notebook without executed outputs (the site would
            show empty cells: run ``fedlora-lite refresh`` or point at a run folder).
    """
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    t0 = time.perf_counter()
    nb_dir = default_notebooks_dir() if notebooks_dir is None else Path(notebooks_dir)
    infos = discover_notebooks(nb_dir, only)
    if not infos:
        raise ValueError(f"no NN_topic.ipynb notebooks found in {nb_dir}")
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = SiteReport(out_dir=out_dir, index=out_dir / "index.html")
    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({"course.html.j2": _TEMPLATE})],
                            template_file="course.html.j2")
    names = "|".join(re.escape(nb.name) for nb in infos)
    notebook_href = re.compile(rf'href="(?:\./)?({names})\.ipynb(#[^"]*)?"')
    for stale in out_dir.glob("[0-9][0-9]_*.html"):
        stale.unlink()
    for i, info in enumerate(infos):
        nb = strip_notebook_metadata(nbformat.read(info.path, as_version=4))
        if not any(c.get("execution_count") for c in nb.cells if c.cell_type == "code"):
            raise ValueError(f"{info.path} has no executed cells; the site is built from executed notebooks")
        if student:
            nb = student_edition(nb)
        for cell in nb.cells:  # keep the site's folding even for cells JupyterLab shows collapsed
            if HINT_TAG in cell.metadata.get("tags", []) or SOLUTION_TAG in cell.metadata.get("tags", []):
                cell.metadata.get("jupyter", {}).pop("source_hidden", None)
        nav, footer = _nav(infos, i)
        body, _ = exporter.from_notebook_node(
            nb, resources={"metadata": {"name": f"{info.number} · {_topic(info)}"}, "course_nav": nav,
                           "course_footer": footer})
        body = notebook_href.sub(lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"', body)
        page = out_dir / f"{info.name}.html"
        page.write_text(body, encoding="utf-8")
        report.pages.append(page)
        report.figures[info.name] = _count_figures(nb)
        report.summary[info.name] = summary_rows(nb)
    (out_dir / "course.css").write_text(_CSS.lstrip(), encoding="utf-8")
    report.index.write_text(_index_page(title, infos, report, student), encoding="utf-8")
    report.wall_time_s = time.perf_counter() - t0
    return report
