"""The capstone's evidence reader and ledger: values from summary cells, missing keys reported, sides computed."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from fedlora_lite.course.evidence import (
    LIVE,
    ClaimLedger,
    Comparison,
    MissingEvidence,
    parse_summary_value,
    read_course_record,
    relation,
)

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def _executed(path, summary_lines, other_lines=(), title="# Notebook"):
    """An executed notebook: a title, a cell printing ``other_lines``, a summary cell printing ``summary_lines``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    other = nbformat.v4.new_code_cell("print('table')", execution_count=1)
    other.outputs = [nbformat.v4.new_output("stream", name="stdout", text="".join(f"{x}\n" for x in other_lines))]
    summary = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(summary)", execution_count=2)
    if summary_lines is not None:
        summary.outputs = [nbformat.v4.new_output("stream", name="stdout", text="".join(f"{x}\n" for x in summary_lines))]
    nb.cells = [nbformat.v4.new_markdown_cell(title), other, summary]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def course(tmp_path):
    root = tmp_path / "notebooks"
    root.mkdir()
    _executed(root / "01_theory.ipynb", ["profile: default", "slope: 1.02", "flags_exact: True",
                                         "errors: {'clair': 0.13, 'local': 0.24}", "corner (r0<=2): 1.0"])
    _executed(root / "05_copy.ipynb", ["homogeneous_clair: 0.973", "homogeneous_local: 0.913", "mild_clair: 0.859",
                                       "mild_local: 0.839", "label: 0.2 (scaled)"],
              other_lines=["method   homogeneous   mild", "fedavg   0.815 ± 0.049   0.683 ± 0.047",
                           "fedavg_x 1 2", "method   0.0   0.3", "fedavg   0.984   0.815"])
    _executed(root / "06_unrun.ipynb", None)
    (root / "07_broken.ipynb").write_text("{not json")
    _executed(root / "09_capstone.ipynb", ["claims: 7"])
    return root


def test_parse_summary_value():
    assert parse_summary_value("0.5") == 0.5 and parse_summary_value(" 3 ") == 3
    assert parse_summary_value("{'a': [1, 2.5]}") == {"a": [1, 2.5]}
    assert parse_summary_value("True") is True
    assert parse_summary_value("default") == "default"
    assert parse_summary_value("0.2 (scaled)") == "0.2 (scaled)"
    with pytest.raises(TypeError, match="text"):
        parse_summary_value(0.5)


def test_record_reads_summaries_and_reports_problems(course):
    record = read_course_record(course, exclude=["09"])
    assert sorted(record.summaries) == ["01", "05"]
    assert "09" not in record.names and sorted(record.problems) == ["06", "07"]
    assert "no executed summary cell" in record.problems["06"] and "cannot be read" in record.problems["07"]
    assert record.value("01", "errors", "clair") == 0.13
    assert record.value("01_theory", "flags_exact") is True
    assert record.number("05", "homogeneous_clair") == 0.973
    assert record.find_key("01", "corner") == "corner (r0<=2)"
    assert record.keys("05")[0] == "homogeneous_clair"
    assert read_course_record(course, only=["01"]).names == {"01": "01_theory"}
    assert "09" in read_course_record(course).summaries


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: r.value("01", "nope"), "notebook 01 prints no summary key 'nope'"),
        (lambda r: r.value("01", "errors", "median"), "'errors' has no entry 'median'"),
        (lambda r: r.value("06", "x"), "notebook 06: .*no executed summary cell"),
        (lambda r: r.value("03", "x"), "notebook 03 is not in"),
        (lambda r: r.number("01", "flags_exact"), "not a number"),
        (lambda r: r.number("01", "profile"), "not a number"),
        (lambda r: r.find_key("01", "zzz"), "no summary key starting with 'zzz'"),
        (lambda r: r.numbers_in_line("05", "median "), "no line starting with 'median '"),
    ],
)
def test_missing_values_raise_missing_evidence_naming_notebook_and_key(course, call, match):
    with pytest.raises(MissingEvidence, match=match):
        call(read_course_record(course))


def test_numbers_in_line_skips_lines_without_numbers(course):
    record = read_course_record(course)
    assert record.numbers_in_line("05", "fedavg ") == [0.815, 0.049, 0.683, 0.047]   # not "fedavg_x"
    assert record.numbers_in_line("05", "method ") == [0.0, 0.3]                     # the header with numbers
    with pytest.raises(ValueError, match="notebook must be a number"):
        record.value("copy", "x")


def test_relation_rounds_before_comparing():
    assert relation(0.886, 0.891, 0.005) == "level with"     # 0.886 - 0.891 is -0.0050000000000000044
    assert relation(0.9, 0.8) == "above" and relation(0.8, 0.9) == "below"
    assert relation(1, 1, words=("a", "b", "c")) == "c"


def test_ledger_computes_sides_records_sources_and_missing_items(course):
    record = read_course_record(course)
    ledger = ClaimLedger(record, {"gain": "refinement beats Local", "copy": "copy task"})

    @ledger.evidence("gain")
    def regression(v):
        c, loc = v("01", "errors", "clair"), v("01", "errors", "local")
        return c < loc, f"CLAIR {c} vs Local {loc}"

    @ledger.evidence("gain", name="copy_mild")
    def _(v):
        return v("05", "mild_clair") > v("05", "homogeneous_clair"), "mild above homogeneous"

    @ledger.evidence("copy", live=True)
    def live_check(v):
        return True, "computed here"

    @ledger.evidence("copy")
    def renamed_key(v):
        return True, f"{v('05', 'renamed')}"

    assert regression.supports is True and regression.sources == ("01",) and regression.text == "CLAIR 0.13 vs Local 0.24"
    assert _.name == "copy_mild" and _.supports is False and _.sources == ("05",)
    assert live_check.sources == (LIVE,)
    assert renamed_key.supports is None and not renamed_key.found and "'renamed'" in renamed_key.missing
    assert ledger.counts() == {"gain": {"for": 1, "against": 1, "missing": 0}, "copy": {"for": 1, "against": 0, "missing": 1}}
    assert ledger.label("gain") == "supported, with limits" and ledger.label("copy") == "supported"
    assert [i.name for i in ledger.select("gain", False)] == ["copy_mild"] and ledger.missing() == [renamed_key]
    pro, con = ledger.matrix(["01", "05", LIVE])
    assert pro == [[1, 0, 0], [0, 0, 1]] and con == [[0, 1, 0], [0, 0, 0]]
    text = ledger.markdown("copy", "read it")
    assert "**Evidence for**\n- [live] computed here" in text and "`renamed_key`" in text
    assert "**Verdict: supported** (1 for, 0 against). read it" in text
    json.dumps(ledger.to_dict())  # plain data, for save_results


def test_ledger_rejects_bad_registrations(course):
    record = read_course_record(course)
    with pytest.raises(TypeError, match="CourseRecord"):
        ClaimLedger({"01": {}}, {"a": "b"})
    with pytest.raises(ValueError, match="at least one claim"):
        ClaimLedger(record, {})
    ledger = ClaimLedger(record, {"a": "claim a"})
    with pytest.raises(ValueError, match="claim must be one of"):
        ledger.evidence("b")
    with pytest.raises(TypeError, match="must return"):
        ledger.evidence("a")(lambda v: (True, 0.5))
    with pytest.raises(AttributeError, match="offers"):
        ledger.evidence("a")(lambda v: v.summaries)
    assert ledger.label("a") == "not assessable (its evidence is missing)"


def test_comparisons_margin_outcome_and_missing(course):
    ledger = ClaimLedger(read_course_record(course), {"a": "claim a"})
    acc = Comparison("copy", 0.973, {"multi_krum": 0.968, "local": 0.913})
    err = Comparison("regression", 0.403, {"local": 0.267, "median": 0.38}, higher_is_better=False)
    assert acc.best_other == ("multi_krum", 0.968) and acc.margin == pytest.approx(0.005) and acc.outcome(0.005) == "ties"
    assert acc.outcome(0.001) == "wins" and err.best_other == ("local", 0.267) and err.outcome(0.005) == "loses"
    with pytest.raises(ValueError, match="at least one method"):
        Comparison("x", 1.0, {})

    @ledger.comparison
    def found(v):
        return Comparison("nb 05", v("05", "mild_clair"), {"local": v("05", "mild_local")})

    @ledger.comparison
    def absent(v):
        return Comparison("nb 05", v("05", "nope"), {"local": 0.0})

    assert found.sources == ("05",) and absent is None
    assert [c.label for c in ledger.comparisons] == ["nb 05"] and "'nope'" in ledger.missing_comparisons["absent"]


def test_committed_notebooks_all_give_evidence():
    """Every committed notebook before the capstone prints a summary the capstone can read."""
    record = read_course_record(NOTEBOOKS_DIR, exclude=["09"])
    assert not record.problems, record.problems
    assert len(record.summaries) >= 9
    for number, summary in record.summaries.items():
        assert any(not isinstance(v, str) for v in summary.values()), f"notebook {number}: no parsed value"
