"""Execute the notebook sequence headlessly with papermill, and regenerate committed outputs.

The course is a numbered sequence ``notebooks/NN_topic.ipynb``. :func:`run_notebooks`
executes (a subset of) it on one profile, injecting ``profile`` and ``output_dir`` into
each notebook's ``parameters`` cell, writes the executed copies plus each notebook's
``results.json`` under one output folder, and renders a summary table of the key numbers.
A failing notebook is recorded with the failing cell and the run carries on (unless
``fail_fast``). :func:`refresh_notebooks` re-executes the *source* notebooks in place on
the default profile and strips metadata noise, so committed outputs come from one
command and are never hand-edited.

Kernel: notebooks run on the ``python3`` kernel, pinned to this interpreter
(``sys.executable``) for the duration of the run, so ``/path/to/.venv/bin/fedlora-lite``
works without activating the virtual environment and a ``python3`` kernelspec installed
elsewhere (e.g. ``~/.local/share/jupyter``) cannot hijack the run.
"""


from __future__ import annotations

import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from ..core.validation import check_choice
from .execution import CellError, execute_notebook, pinned_python_kernel, prepare_outputs
from .notebooks import (
    _RESERVED_PARAMETERS,
    NotebookInfo,
    default_notebooks_dir,
    discover_notebooks,
    parameters_cell,
    strip_notebook_metadata,
)
from .reporting import (
    PROFILES,
    RESULTS_FILENAME,
    atomic_write_text,
    load_results,
    load_run_record,
    record_run,
)
from .run_control import RunInterrupted, check_out_dir, check_timeout, notebook_parameters, run_record, signals_raise
from .summary import earlier_runs, summary_table, write_summary_csv, write_summary_markdown

__all__ = ["CellError", "NotebookRun", "RunReport", "RunInterrupted", "run_notebooks", "refresh_notebooks",
           "pinned_python_kernel"]


@dataclass
class NotebookRun:
    """Outcome of executing one notebook."""

    name: str
    source: Path
    output: Path
    output_dir: Path | None
    status: str  # "ok" | "failed" | "skipped" | "interrupted" ("running" only inside the summary)
    wall_time_s: float
    results: dict[str, Any] | None = None
    error: CellError | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class RunReport:
    """Outcome of a run over the sequence, plus where its summary files are."""

    profile: str
    out_dir: Path
    runs: list[NotebookRun] = field(default_factory=list)
    summary_md: Path | None = None
    summary_csv: Path | None = None
    earlier: list[str] = field(default_factory=list)  # notebooks the summary lists from earlier runs
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """True when every selected notebook ran and wrote its results."""
        return all(r.ok for r in self.runs)

    @property
    def failed(self) -> list[NotebookRun]:
        return [r for r in self.runs if r.status in ("failed", "interrupted")]

    @property
    def exit_code(self) -> int:
        """Process exit status: 0 when :attr:`ok`, else 1."""
        return 0 if self.ok else 1

    def format_failures(self) -> str:
        """One block per failed notebook: name, executed copy, failing cell."""
        blocks = []
        for r in self.failed:
            assert r.error is not None
            blocks.append(f"FAILED {r.name} (executed copy: {r.output})\n  {r.error.describe()}")
        return "\n".join(blocks)


def _collect(
    info: NotebookInfo, output: Path, output_dir: Path | None, wall: float, error: CellError | None,
    record: Mapping[str, Any] | None = None,
) -> NotebookRun:
    results = None
    if error is None:
        path = None if output_dir is None else output_dir / RESULTS_FILENAME
        if path is None or not path.is_file():
            error = CellError(
                ename="MissingResults",
                evalue=f"the notebook finished but wrote no {RESULTS_FILENAME} to output_dir={output_dir} "
                "(call save_results)",
            )
        else:
            try:
                results = load_results(path)
                if record is not None:
                    record_run(path, record)  # seed and overrides travel with the numbers
            except (ValueError, TypeError, OSError) as exc:
                error = CellError(ename=type(exc).__name__, evalue=str(exc))
                results = None
    status = "ok" if error is None else "failed"
    return NotebookRun(info.name, info.path, output, output_dir, status, wall, results, error)


def _finish(report: RunReport, title: str, outputs: Mapping[str, tuple[Path, Path | None]]) -> RunReport:
    """Write the summary: this run's notebooks, plus what earlier runs left in the folder.

    ``outputs`` maps every notebook of the sequence, in order, to (executed copy, results
    folder); notebooks not run now (or skipped) appear when their files are there.
    """
    current = {r.name: r for r in report.runs if r.status != "skipped"}
    earlier = earlier_runs({n: o for n, o in outputs.items() if n not in current}, report.out_dir / "summary.csv")
    skipped = {r.name: r for r in report.runs if r.status == "skipped" and r.name not in earlier}
    results, status, wall, runs, records = {}, {}, {}, {}, {}
    for name in outputs:
        if name in current:
            r = current[name]
            results[name], status[name], wall[name], runs[name] = r.results, r.status, r.wall_time_s, "this run"
            records[name] = _record_of(r)
        elif name in earlier:
            e = earlier[name]
            results[name], status[name], wall[name], runs[name], records[name] = (
                e.results, e.status, e.wall_time_s, "earlier run", e.record)
        elif name in skipped:
            results[name], status[name], wall[name], runs[name] = None, "skipped", 0.0, "this run"
    report.earlier = list(earlier)
    rows = summary_table(results, status=status, wall_times=wall, runs=runs, parameters=records)
    report.summary_md = write_summary_markdown(rows, report.out_dir / "summary.md", title=title)
    report.summary_csv = write_summary_csv(rows, report.out_dir / "summary.csv")
    return report


def _record_of(run: NotebookRun) -> dict[str, Any] | None:
    if run.output_dir is None or not run.ok:
        return None
    try:
        return load_run_record(run.output_dir / RESULTS_FILENAME)
    except (OSError, ValueError):
        return None


def _progress_bar(items: list[NotebookInfo], desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="nb", disable=not enabled, dynamic_ncols=True)


def _run_sequence(
    report: RunReport,
    notebooks: list[NotebookInfo],
    plan: Mapping[str, tuple[Path, Path | None, dict[str, Any] | None, dict[str, Any]]],
    desc: str,
    title: str,
    outputs: Mapping[str, tuple[Path, Path | None]],
    *,
    nb_dir: Path,
    fail_fast: bool,
    progress: bool,
    kernel_name: str,
    execution_timeout: int | None,
    on_success=None,
) -> RunReport:
    """Execute ``notebooks`` in order per ``plan`` (name -> output, results folder, injected
    parameters, run record), keeping the summary current after every notebook.

    On SIGINT/SIGTERM the notebook in progress is recorded as "interrupted", the summary is
    written, and :class:`RunInterrupted` propagates.
    """
    stop = False
    current: tuple[NotebookInfo, float] | None = None
    with signals_raise() as rearm:
        try:
            for info in _progress_bar(notebooks, desc, progress):
                rearm()  # the previous notebook's event loop may have reset the handlers
                output, nb_out, injected, record = plan[info.name]
                if stop:
                    report.runs.append(NotebookRun(info.name, info.path, output, nb_out, "skipped", 0.0))
                    continue
                current = (info, time.perf_counter())
                error = prepare_outputs(output, nb_out)
                if error is None:
                    report.runs.append(NotebookRun(info.name, info.path, output, nb_out, "running", 0.0))
                    _finish(report, title, outputs)  # the summary says "running", not an earlier "ok"
                    report.runs.pop()
                    wall, error = execute_notebook(info, output, parameters=injected, cwd=nb_dir,
                                                   kernel_name=kernel_name, progress=progress,
                                                   execution_timeout=execution_timeout)
                    run = _collect(info, output, nb_out, wall, error, record)
                else:
                    run = NotebookRun(info.name, info.path, output, nb_out, "failed", 0.0, error=error)
                if run.ok and on_success is not None:
                    on_success(info, run)
                report.runs.append(run)
                current = None
                _finish(report, title, outputs)
                stop = fail_fast and not run.ok
        except KeyboardInterrupt as exc:
            rearm()
            if current is not None:
                info, t0 = current
                output, nb_out = plan[info.name][:2]
                report.runs = [r for r in report.runs if r.name != info.name]
                report.runs.append(NotebookRun(info.name, info.path, output, nb_out, "interrupted",
                                               time.perf_counter() - t0,
                                               error=CellError(ename="Interrupted", evalue="the run was interrupted")))
            report.interrupted = True
            _finish(report, title, outputs)
            if isinstance(exc, RunInterrupted):
                raise
            raise RunInterrupted(signal.SIGINT) from exc
    return report


def run_notebooks(
    profile: str = "default",
    only: Sequence[str | int] | None = None,
    out: str | Path | None = None,
    parameters: Mapping[str, Any] | None = None,
    fail_fast: bool = False,
    progress: bool = True,
    *,
    notebooks_dir: str | Path | None = None,
    kernel_name: str = "python3",
    execution_timeout: float | None = None,
) -> RunReport:
    """Execute the notebook sequence on one profile and summarise the key numbers.

    For each notebook ``NN_topic`` (in order) papermill runs it with cwd = the notebooks
    folder, injecting ``profile``, ``output_dir = <out>/NN_topic`` and ``parameters``;
    the executed copy goes to ``<out>/NN_topic.ipynb`` and the notebook's own
    ``save_results`` call writes ``<out>/NN_topic/results.json``, to which the runner adds
    a ``"run"`` record (every parameter's value, with the seed, and which were
    overridden). ``<out>/summary.md`` and ``<out>/summary.csv`` list every notebook's
    status, wall time, parameters and key numbers; they are rewritten after every notebook.
    A notebook's previous executed copy and results are removed when it starts.

    Running a subset (``only``) into a folder that holds other notebooks' outputs keeps
    them in the summary, marked ``run = "earlier run"`` with their own recorded parameters.

    Args:
        profile: one of ``"smoke"``, ``"default"``, ``"full"``.
        only: subset of notebooks (numbers or names, see :func:`discover_notebooks`).
        out: output folder; default ``outputs/<profile>`` next to the notebooks folder.
        parameters: extra papermill parameters for every notebook (e.g. ``{"seed": 1}``);
            each name must be a parameter of every selected notebook; ``profile`` and
            ``output_dir`` are set by the runner and may not appear here.
        fail_fast: stop at the first failing notebook (the rest are marked "skipped").
        progress: show a tqdm bar over notebooks and papermill's per-cell bar.
        notebooks_dir: folder of the sequence; default :func:`default_notebooks_dir`.
        kernel_name: Jupyter kernel; ``"python3"`` is pinned to ``sys.executable``.
        execution_timeout: per-cell timeout in seconds (None: no limit); fractions are
            rounded up to whole seconds.

    Returns:
        A :class:`RunReport`; ``report.exit_code`` is nonzero when any notebook failed.

    Raises:
        ValueError: unknown ``profile``, bad ``only``, reserved or unknown ``parameters``
            names, a bad ``execution_timeout``, an output folder that cannot be written,
            or no notebooks found.
        RunInterrupted: SIGINT/SIGTERM; the summary was written first (the notebook in
            progress is "interrupted").
    """
    check_choice(profile, "profile", PROFILES)
    execution_timeout = check_timeout(execution_timeout)
    if parameters is not None and not isinstance(parameters, Mapping):
        raise TypeError(f"parameters must be a mapping of name to value, got {type(parameters).__name__}")
    parameters = dict(parameters or {})
    clash = [k for k in _RESERVED_PARAMETERS if k in parameters]
    if clash:
        raise ValueError(f"parameters may not set {clash}: the runner sets them (use profile= and out=)")
    bad = [k for k in parameters if not (isinstance(k, str) and k.isidentifier())]
    if bad:
        raise ValueError(f"parameters names must be Python identifiers, got {bad}")
    nb_dir = default_notebooks_dir() if notebooks_dir is None else Path(notebooks_dir).resolve()
    sequence = discover_notebooks(nb_dir)
    notebooks = discover_notebooks(nb_dir, only)
    if not notebooks:
        raise ValueError(f"no NN_topic.ipynb notebooks found in {nb_dir}")
    defaults = notebook_parameters(notebooks, parameters)
    out_dir = (nb_dir.parent / "outputs" / profile) if out is None else Path(out)
    out_dir = check_out_dir(out_dir.resolve())
    outputs = {nb.name: (out_dir / f"{nb.name}.ipynb", out_dir / nb.name) for nb in sequence}
    plan = {}
    for info in notebooks:
        injected = {"profile": profile, "output_dir": str(out_dir / info.name), **parameters}
        plan[info.name] = (*outputs[info.name], injected, run_record(defaults[info.name], injected, list(parameters)))
    report = RunReport(profile=profile, out_dir=out_dir)
    return _run_sequence(report, notebooks, plan, f"notebooks [{profile}]", f"fedlora-lite run, profile {profile}",
                         outputs, nb_dir=nb_dir, fail_fast=fail_fast, progress=progress, kernel_name=kernel_name,
                         execution_timeout=execution_timeout)


def refresh_notebooks(
    only: Sequence[str | int] | None = None,
    *,
    notebooks_dir: str | Path | None = None,
    out: str | Path | None = None,
    fail_fast: bool = False,
    progress: bool = True,
    kernel_name: str = "python3",
    execution_timeout: float | None = None,
) -> RunReport:
    """Re-execute source notebooks in place on their own (default-profile) parameters.

    Each notebook is executed without injected parameters (so no extra cell appears),
    into ``<out>/NN_topic.ipynb``; only when it succeeds is the stripped result
    (:func:`strip_notebook_metadata`) written back over the source (atomically). A failing
    notebook leaves its source untouched and is reported like in :func:`run_notebooks`.

    Args:
        only: subset of notebooks (numbers or names).
        notebooks_dir: folder of the sequence; default :func:`default_notebooks_dir`.
        out: folder for executed copies and the summary; default ``outputs/refresh``.
        fail_fast, progress, kernel_name, execution_timeout: as in :func:`run_notebooks`.

    Raises:
        ValueError: a selected notebook's parameters cell is missing, duplicated or does
            not say ``profile = "default"`` (committed outputs must show the default run),
            or a bad ``out`` / ``execution_timeout``.
        RunInterrupted: as in :func:`run_notebooks`.
    """
    execution_timeout = check_timeout(execution_timeout)
    nb_dir = default_notebooks_dir() if notebooks_dir is None else Path(notebooks_dir).resolve()
    sequence = discover_notebooks(nb_dir)
    notebooks = discover_notebooks(nb_dir, only)
    if not notebooks:
        raise ValueError(f"no NN_topic.ipynb notebooks found in {nb_dir}")
    params = {}
    for info in notebooks:
        params[info.name] = parameters_cell(nbformat.read(info.path, as_version=4), info.name)
        if params[info.name].get("profile") != "default":
            raise ValueError(f"{info.name}: the parameters cell must say profile = \"default\" before a refresh")
    out_dir = check_out_dir(((nb_dir.parent / "outputs" / "refresh") if out is None else Path(out)).resolve())
    outputs, plan = {}, {}
    for info in sequence:
        try:
            od = params[info.name].get("output_dir") if info.name in params else \
                parameters_cell(nbformat.read(info.path, as_version=4), info.name).get("output_dir")
        except Exception:  # noqa: BLE001 - a broken notebook that is not refreshed now has no outputs to list
            od = None
        outputs[info.name] = (out_dir / f"{info.name}.ipynb", (nb_dir / od).resolve() if isinstance(od, str) else None)
    for info in notebooks:
        plan[info.name] = (*outputs[info.name], None, run_record(params[info.name], {}, []))

    def write_back(info: NotebookInfo, run: NotebookRun) -> None:
        stripped = strip_notebook_metadata(nbformat.read(run.output, as_version=4))
        atomic_write_text(info.path, nbformat.writes(stripped) + "\n")

    report = RunReport(profile="default", out_dir=out_dir)
    return _run_sequence(report, notebooks, plan, "refresh", "fedlora-lite refresh (default profile)", outputs,
                         nb_dir=nb_dir, fail_fast=fail_fast, progress=progress, kernel_name=kernel_name,
                         execution_timeout=execution_timeout, on_success=write_back)
