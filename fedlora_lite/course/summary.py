"""The run summary: every notebook's status, wall time, parameters and key numbers, as Markdown and CSV.

:func:`summary_table` flattens each notebook's ``results.json`` into rows;
:func:`write_summary_markdown` and :func:`write_summary_csv` write them atomically. A run over
a subset of the sequence (``--only``) into a folder that already holds other notebooks'
outputs does not hide them: :func:`earlier_runs` finds those outputs and the runner lists
them as ``run = "earlier run"`` beside this run's notebooks, with the parameters they
were run with. The summary is built from the files on disk, so it never describes a
notebook whose files are not there.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .reporting import RESULTS_FILENAME, atomic_write_text, load_results, load_run_record

__all__ = ["SummaryRow", "SUMMARY_CSV_COLUMNS", "summary_table", "write_summary_markdown", "write_summary_csv",
           "EarlierRun", "earlier_runs"]


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One line of the run summary: a key number of one notebook (or its status only)."""

    notebook: str
    key: str
    value: Any
    status: str = "ok"
    wall_time_s: float | None = None
    run: str = "this run"  # or "earlier run": the notebook was not part of this invocation
    parameters: Mapping[str, Any] | None = None  # the run record's parameters and overrides


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        rows: list[tuple[str, Any]] = []
        for k, v in value.items():
            rows.extend(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return rows
    if isinstance(value, list):
        if len(value) <= 8 and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
            return [(prefix, "[" + ", ".join(_format_value(v) for v in value) + "]")]
        return [(prefix, f"<list of {len(value)}>")]
    return [(prefix, value)]


def _format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def summary_table(
    results_by_notebook: Mapping[str, Mapping[str, Any] | None],
    *,
    status: Mapping[str, str] | None = None,
    wall_times: Mapping[str, float | None] | None = None,
    runs: Mapping[str, str] | None = None,
    parameters: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> list[SummaryRow]:
    """Flatten each notebook's results into (notebook, key, value) rows.

    Nested mappings become dotted keys (``"benign_error.clair"``); short lists of scalars
    are kept as a compact string, longer lists are shown as ``<list of N>``. A notebook
    without results (failed, or not run) still gets one row with an empty key, so the
    table lists every notebook with its status and wall time.

    Args:
        results_by_notebook: ``{notebook: results mapping or None}``, in display order.
        status: optional ``{notebook: "ok" | "failed" | ...}`` (default ``"ok"``).
        wall_times: optional ``{notebook: seconds}``.
        runs: optional ``{notebook: "this run" | "earlier run"}`` (default ``"this run"``).
        parameters: optional ``{notebook: run record}`` (``{"parameters": ..., "overrides": ...}``).
    """
    if not isinstance(results_by_notebook, Mapping):
        raise TypeError(f"results_by_notebook must be a mapping, got {type(results_by_notebook).__name__}")
    status, wall_times, runs, parameters = status or {}, wall_times or {}, runs or {}, parameters or {}
    rows: list[SummaryRow] = []
    for nb, results in results_by_notebook.items():
        common = dict(status=status.get(nb, "ok"), wall_time_s=wall_times.get(nb), run=runs.get(nb, "this run"),
                      parameters=parameters.get(nb))
        flat = _flatten("", results) if results else []
        if not flat:
            rows.append(SummaryRow(nb, "", "", **common))
        for key, value in flat:
            rows.append(SummaryRow(nb, key, value, **common))
    return rows


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _short_parameters(record: Mapping[str, Any] | None) -> str:
    """``seed=1, n=3 (override)``: the seed and every overridden parameter of a run record."""
    if not record:
        return ""
    params = record.get("parameters") or {}
    overrides = set(record.get("overrides") or ())
    shown = (["seed"] if "seed" in params else []) + [k for k in params if k in overrides and k != "seed"]
    return ", ".join(f"{k}={params[k]!r}" + (" (override)" if k in overrides else "") for k in shown)


def write_summary_markdown(rows: Sequence[SummaryRow], path: str | Path, *, title: str = "Run summary") -> Path:
    """Write the rows as Markdown: a per-notebook status table, then the key numbers (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| notebook | status | wall time (s) | run | parameters |", "|---|---|---:|---|---|"]
    seen: dict[str, SummaryRow] = {}
    for r in rows:
        seen.setdefault(r.notebook, r)
    for nb, r in seen.items():
        wt = "" if r.wall_time_s is None else f"{r.wall_time_s:.1f}"
        lines.append(f"| {_md_escape(nb)} | {_md_escape(r.status)} | {wt} | {r.run} | "
                     f"{_md_escape(_short_parameters(r.parameters))} |")
    lines += ["", "| notebook | key | value |", "|---|---|---:|"]
    for r in rows:
        if r.key:
            lines.append(f"| {_md_escape(r.notebook)} | {_md_escape(r.key)} | {_md_escape(_format_value(r.value))} |")
    return atomic_write_text(path, "\n".join(lines) + "\n")


SUMMARY_CSV_COLUMNS = ("notebook", "key", "value", "status", "wall_time_s", "run", "parameters")


def write_summary_csv(rows: Sequence[SummaryRow], path: str | Path) -> Path:
    """Write the rows as CSV (atomically) with columns :data:`SUMMARY_CSV_COLUMNS`.

    ``parameters`` is the notebook's run record as JSON (effective parameters and the
    names that were overridden); ``run`` says whether the row comes from this invocation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(SUMMARY_CSV_COLUMNS)
    for r in rows:
        wt = "" if r.wall_time_s is None else f"{r.wall_time_s:.2f}"
        value = r.value if isinstance(r.value, str) else json.dumps(r.value)  # full precision
        params = "" if r.parameters is None else json.dumps(r.parameters, sort_keys=True)
        writer.writerow([r.notebook, r.key, value, r.status, wt, r.run, params])
    return atomic_write_text(path, buf.getvalue())


@dataclasses.dataclass(frozen=True)
class EarlierRun:
    """A notebook's outputs left in the output folder by an earlier invocation.

    Attributes:
        name: notebook name.
        status: ``"ok"`` (its ``results.json`` is there), else the earlier summary's
            ``"failed"`` / ``"interrupted"`` (an executed copy without results).
        results: its key numbers (None unless ok).
        record: the run record of its ``results.json`` (parameters, overrides), or None.
        wall_time_s: from the earlier summary, when it lists the notebook.
    """

    name: str
    status: str
    results: dict[str, Any] | None
    record: dict[str, Any] | None
    wall_time_s: float | None


def _previous_summary(path: Path) -> dict[str, tuple[str, float | None]]:
    """notebook -> (status, wall time) from an earlier ``summary.csv`` (empty if unreadable)."""
    out: dict[str, tuple[str, float | None]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                wall = row.get("wall_time_s") or ""
                try:
                    wt = float(wall) if wall else None
                except ValueError:
                    wt = None
                out.setdefault(row.get("notebook") or "", (row.get("status") or "", wt))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    return out


def earlier_runs(outputs: Mapping[str, tuple[Path, Path | None]], previous_summary: Path) -> dict[str, EarlierRun]:
    """The notebooks of ``outputs`` whose files an earlier run left on disk.

    Args:
        outputs: notebook -> (executed copy path, folder of its ``results.json`` or None).
        previous_summary: the earlier ``summary.csv`` (its statuses and wall times are
            reused where the files agree with them).

    Returns:
        notebook -> :class:`EarlierRun`, only for notebooks with an executed copy or a
        readable ``results.json`` (a notebook with neither is not described).
    """
    prev = _previous_summary(previous_summary)
    found: dict[str, EarlierRun] = {}
    for name, (executed, results_dir) in outputs.items():
        results = record = None
        path = None if results_dir is None else results_dir / RESULTS_FILENAME
        if path is not None and path.is_file():
            try:
                results, record = load_results(path), load_run_record(path)
            except (OSError, ValueError):
                results = record = None
        if results is None and not executed.is_file():
            continue
        status, wall = prev.get(name, ("", None))
        if results is not None and status != "failed":
            status = "ok"
        elif status not in ("failed", "interrupted"):
            status = "failed"  # an executed copy without results: the earlier run did not finish it
        found[name] = EarlierRun(name, status, results if status == "ok" else None, record, wall)
    return found
