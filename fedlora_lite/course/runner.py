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

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from ..core.validation import check_choice
from .notebooks import (
    _RESERVED_PARAMETERS,
    KERNELSPEC,
    NotebookInfo,
    default_notebooks_dir,
    discover_notebooks,
    parameters_cell,
    strip_notebook_metadata,
)
from .reporting import (
    PROFILES,
    RESULTS_FILENAME,
    load_results,
    summary_table,
    write_summary_csv,
    write_summary_markdown,
)
from .widgets import WIDGETS_ENV

__all__ = ["CellError", "NotebookRun", "RunReport", "run_notebooks", "refresh_notebooks", "pinned_python_kernel"]


@dataclass(frozen=True)
class CellError:
    """Where and how a notebook failed (``cell_index`` counts cells of the executed copy)."""

    ename: str
    evalue: str
    cell_index: int | None = None
    execution_count: int | None = None
    source: str = ""

    def describe(self) -> str:
        """Human-readable multi-line description for the console."""
        where = "notebook" if self.cell_index is None else f"cell {self.cell_index} (In [{self.execution_count}])"
        text = f"{where}: {self.ename}: {self.evalue}"
        if self.source:
            text += "\n" + "\n".join("    | " + line for line in self.source.splitlines())
        return text


@dataclass
class NotebookRun:
    """Outcome of executing one notebook."""

    name: str
    source: Path
    output: Path
    output_dir: Path | None
    status: str  # "ok" | "failed" | "skipped"
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

    @property
    def ok(self) -> bool:
        """True when every selected notebook ran and wrote its results."""
        return all(r.ok for r in self.runs)

    @property
    def failed(self) -> list[NotebookRun]:
        return [r for r in self.runs if r.status == "failed"]

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


@contextlib.contextmanager
def pinned_python_kernel(kernel_name: str = "python3") -> Iterator[None]:
    """Within the block, kernel ``kernel_name`` launches this interpreter (``sys.executable``).

    A temporary kernelspec is put first on ``JUPYTER_PATH``, which jupyter_client searches
    before the user and environment data folders. Non-``python3`` kernel names are left
    alone (the caller asked for a specific kernel). Unless ``OMP_WAIT_POLICY`` is already
    set, the kernel gets ``OMP_WAIT_POLICY=PASSIVE`` (see the comment in the code).
    """
    if kernel_name != "python3":
        yield
        return
    with tempfile.TemporaryDirectory(prefix="fedlora-kernel-") as tmp:
        kdir = Path(tmp) / "kernels" / kernel_name
        kdir.mkdir(parents=True)
        try:  # ipykernel's own spec, so capabilities (debugger, CurveZMQ encryption) match
            from ipykernel.kernelspec import get_kernel_dict

            spec = get_kernel_dict()
        except ImportError:  # pragma: no cover - ipykernel is a dependency
            spec = {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"], "language": "python"}
        spec["argv"] = [sys.executable, *spec["argv"][1:]]
        spec["display_name"] = KERNELSPEC["display_name"]
        if "OMP_WAIT_POLICY" not in os.environ:
            # Spinning OpenMP workers make small torch ops (the solver's SVDs) 10x slower as
            # soon as another process competes for the cores; sleeping workers cost ~nothing.
            spec["env"] = {"OMP_WAIT_POLICY": "PASSIVE"}
        spec.setdefault("env", {})[WIDGETS_ENV] = "static"  # no widget front end here: one static figure per cell
        (kdir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = tmp if not old else tmp + os.pathsep + old
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def _kernel_manager_config():
    """Traitlets config for the kernel manager: CurveZMQ-encrypt kernel traffic when possible.

    Recent ipykernel warns on every start when its TCP sockets are unencrypted; asking
    jupyter_client to provision keys ("auto" honours the kernelspec's declared support)
    both removes the warning and encrypts the loopback traffic.
    """
    from traitlets.config import Config

    try:
        import zmq
        from jupyter_client.manager import KernelManager

        # older jupyter_client has no such trait and would warn about unknown config
        curve = bool(zmq.has("curve")) and KernelManager.class_traits().get("transport_encryption") is not None
    except ImportError:  # pragma: no cover - pyzmq comes with jupyter_client
        curve = False
    config = Config()
    if curve:
        config.KernelManager.transport_encryption = "auto"
    return config


def _excerpt(source: str, max_lines: int = 8) -> str:
    lines = source.splitlines()
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"... ({len(source.splitlines()) - max_lines} more lines)"]
    return "\n".join(lines)


def _execute(
    info: NotebookInfo,
    output: Path,
    *,
    parameters: Mapping[str, Any] | None,
    cwd: Path,
    kernel_name: str,
    progress: bool,
    execution_timeout: float | None,
) -> tuple[float, CellError | None]:
    """Run one notebook with papermill; return (wall seconds, error or None)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    error = None
    try:
        with pinned_python_kernel(kernel_name):
            pm.execute_notebook(
                str(info.path),
                str(output),
                parameters=dict(parameters) if parameters else None,
                kernel_name=kernel_name,
                cwd=str(cwd),
                progress_bar=progress,
                log_output=False,
                execution_timeout=execution_timeout,
                config=_kernel_manager_config(),
            )
    except PapermillExecutionError as exc:
        error = CellError(
            ename=exc.ename,
            evalue=str(exc.evalue),
            cell_index=exc.cell_index,
            execution_count=exc.exec_count,
            source=_excerpt(exc.source or ""),
        )
    except Exception as exc:  # kernel death, cell timeout, unreadable notebook: still a reportable failure
        error = CellError(ename=type(exc).__name__, evalue=str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return time.perf_counter() - t0, error


def _collect(
    info: NotebookInfo, output: Path, output_dir: Path | None, wall: float, error: CellError | None
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
            except (ValueError, OSError) as exc:
                error = CellError(ename=type(exc).__name__, evalue=str(exc))
    status = "ok" if error is None else "failed"
    return NotebookRun(info.name, info.path, output, output_dir, status, wall, results, error)


def _finish(report: RunReport, title: str) -> RunReport:
    rows = summary_table(
        {r.name: r.results for r in report.runs},
        status={r.name: r.status for r in report.runs},
        wall_times={r.name: r.wall_time_s for r in report.runs},
    )
    report.summary_md = write_summary_markdown(rows, report.out_dir / "summary.md", title=title)
    report.summary_csv = write_summary_csv(rows, report.out_dir / "summary.csv")
    return report


def _progress_bar(items: list[NotebookInfo], desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="nb", disable=not enabled, dynamic_ncols=True)


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
    ``save_results`` call writes ``<out>/NN_topic/results.json``. Finally
    ``<out>/summary.md`` and ``<out>/summary.csv`` list every notebook's status, wall
    time and key numbers.

    Args:
        profile: one of ``"smoke"``, ``"default"``, ``"full"``.
        only: subset of notebooks (numbers or names, see :func:`discover_notebooks`).
        out: output folder; default ``outputs/<profile>`` next to the notebooks folder.
        parameters: extra papermill parameters for every notebook (e.g. ``{"seed": 1}``);
            ``profile`` and ``output_dir`` are set by the runner and may not appear here.
        fail_fast: stop at the first failing notebook (the rest are marked "skipped").
        progress: show a tqdm bar over notebooks and papermill's per-cell bar.
        notebooks_dir: folder of the sequence; default :func:`default_notebooks_dir`.
        kernel_name: Jupyter kernel; ``"python3"`` is pinned to ``sys.executable``.
        execution_timeout: per-cell timeout in seconds (None: no limit).

    Returns:
        A :class:`RunReport`; ``report.exit_code`` is nonzero when any notebook failed.

    Raises:
        ValueError: unknown ``profile``, bad ``only``, reserved ``parameters`` names, or no
            notebooks found.
    """
    check_choice(profile, "profile", PROFILES)
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
    notebooks = discover_notebooks(nb_dir, only)
    if not notebooks:
        raise ValueError(f"no NN_topic.ipynb notebooks found in {nb_dir}")
    out_dir = (nb_dir.parent / "outputs" / profile) if out is None else Path(out)
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RunReport(profile=profile, out_dir=out_dir)
    stop = False
    bar = _progress_bar(notebooks, f"notebooks [{profile}]", progress)
    for info in bar:
        output, nb_out = out_dir / f"{info.name}.ipynb", out_dir / info.name
        if stop:
            report.runs.append(NotebookRun(info.name, info.path, output, nb_out, "skipped", 0.0))
            continue
        bar.set_postfix_str(info.name)
        (nb_out / RESULTS_FILENAME).unlink(missing_ok=True)  # never report a stale file
        wall, error = _execute(
            info,
            output,
            parameters={"profile": profile, "output_dir": str(nb_out), **parameters},
            cwd=nb_dir,
            kernel_name=kernel_name,
            progress=progress,
            execution_timeout=execution_timeout,
        )
        run = _collect(info, output, nb_out, wall, error)
        report.runs.append(run)
        stop = fail_fast and not run.ok
    return _finish(report, f"fedlora-lite run, profile {profile}")


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
    (:func:`strip_notebook_metadata`) written back over the source. A failing notebook
    leaves its source untouched and is reported like in :func:`run_notebooks`.

    Args:
        only: subset of notebooks (numbers or names).
        notebooks_dir: folder of the sequence; default :func:`default_notebooks_dir`.
        out: folder for executed copies and the summary; default ``outputs/refresh``.
        fail_fast, progress, kernel_name, execution_timeout: as in :func:`run_notebooks`.

    Raises:
        ValueError: a selected notebook's parameters cell is missing, duplicated or does
            not say ``profile = "default"`` (committed outputs must show the default run).
    """
    nb_dir = default_notebooks_dir() if notebooks_dir is None else Path(notebooks_dir).resolve()
    notebooks = discover_notebooks(nb_dir, only)
    if not notebooks:
        raise ValueError(f"no NN_topic.ipynb notebooks found in {nb_dir}")
    params = {}
    for info in notebooks:
        params[info.name] = parameters_cell(nbformat.read(info.path, as_version=4), info.name)
        if params[info.name].get("profile") != "default":
            raise ValueError(f"{info.name}: the parameters cell must say profile = \"default\" before a refresh")
    out_dir = ((nb_dir.parent / "outputs" / "refresh") if out is None else Path(out)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RunReport(profile="default", out_dir=out_dir)
    stop = False
    for info in _progress_bar(notebooks, "refresh", progress):
        output = out_dir / f"{info.name}.ipynb"
        od = params[info.name].get("output_dir")
        nb_out = (nb_dir / od).resolve() if isinstance(od, str) else None
        if stop:
            report.runs.append(NotebookRun(info.name, info.path, output, nb_out, "skipped", 0.0))
            continue
        if nb_out is not None:
            (nb_out / RESULTS_FILENAME).unlink(missing_ok=True)
        wall, error = _execute(
            info,
            output,
            parameters=None,
            cwd=nb_dir,
            kernel_name=kernel_name,
            progress=progress,
            execution_timeout=execution_timeout,
        )
        run = _collect(info, output, nb_out, wall, error)
        if run.ok:
            stripped = strip_notebook_metadata(nbformat.read(output, as_version=4))
            nbformat.write(stripped, info.path)
        report.runs.append(run)
        stop = fail_fast and not run.ok
    return _finish(report, "fedlora-lite refresh (default profile)")
