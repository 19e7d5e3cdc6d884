"""Parameter sweeps over one notebook: a grid from a TOML file, run with papermill, resumable.

A sweep file (``fedlora-lite sweep run sweep.toml``)::

    notebook = "02"                 # number or name of a notebook of the sequence
    profile = "smoke"               # smoke | default | full
    out = "../outputs/sweep_02"     # relative to this file; one folder per run inside
    workers = 2                     # parallel worker processes (each runs its own kernel)
    # notebooks = "../notebooks"    # optional: another folder of NN_topic notebooks
    # timeout = 600                 # optional: per-cell timeout in seconds

    [grid]                          # the cartesian product of these lists
    seed = [0, 1, 2]
    contamination = [0.1, 0.3, 0.5]

    [parameters]                    # the same for every run
    device = "cpu"

    [collect]                       # optional; see fedlora_lite.course.sweep_collect
    x = "contamination"             # x axis of the plots (default: the largest non-seed grid axis)
    over = "seed"                   # repeats the confidence band is taken over (default "seed")
    metrics = ["f1", "benign_gain"] # dotted keys of results.json (default: every number)

Every run executes through the course runner (:func:`fedlora_lite.course.runner.run_notebooks`)
into ``<out>/runs/<run_id>/``; when it succeeds, its ``results.json`` is rewritten
atomically with a ``"sweep"`` section holding the run's parameters. That section is the
completion marker: a rerun skips every run whose marker matches its parameters and redoes
the rest (never started, failed, or interrupted before the marker), so an interrupted
sweep resumes where it stopped. ``<out>/sweep.json`` lists the runs of the current file;
``fedlora-lite sweep collect <out>`` aggregates them (:mod:`.sweep_collect`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import re
import time
import tomllib
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from ..core.validation import check_choice
from .notebooks import _RESERVED_PARAMETERS, default_notebooks_dir, discover_notebooks, parameters_cell
from .reporting import PROFILES, RESULTS_FILENAME

__all__ = ["MANIFEST", "SweepSpec", "SweepRun", "SweepReport", "load_sweep", "sweep_runs", "run_sweep",
           "completed_results"]

MANIFEST = "sweep.json"
_TOP_KEYS = {"notebook", "profile", "out", "workers", "notebooks", "timeout", "grid", "parameters", "collect"}
_COLLECT_KEYS = {"x", "over", "metrics"}
_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: which notebook, the grid, fixed parameters, where runs go."""

    notebook: str
    notebooks_dir: Path
    profile: str
    out: Path
    grid: dict[str, list[Any]]
    parameters: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    timeout: float | None = None
    collect: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid: its id (folder name) and the parameters injected into the notebook."""

    run_id: str
    parameters: dict[str, Any]


@dataclass
class SweepReport:
    """Outcome of :func:`run_sweep`: which runs ran, were skipped (already done) or failed."""

    out: Path
    total: int
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and len(self.ran) + len(self.skipped) == self.total

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def load_sweep(path: str | Path, *, out: str | Path | None = None, workers: int | None = None) -> SweepSpec:
    """Read and validate a sweep TOML file (see the module docstring for the format).

    Args:
        path: the ``.toml`` file; relative paths inside it are relative to its folder.
        out, workers: override the file's ``out`` / ``workers``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid TOML, unknown keys, an empty or non-list grid axis, a
            parameter the notebook's ``parameters`` cell does not have, a reserved name
            (``profile``, ``output_dir``), a name both in ``grid`` and ``parameters``,
            bad ``profile``/``workers``/``timeout``, or a notebook that does not exist.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    base = path.resolve().parent
    unknown = sorted(set(raw) - _TOP_KEYS)
    _require(not unknown, f"{path}: unknown keys {unknown}; known: {sorted(_TOP_KEYS)}")
    for key in ("notebook", "out"):
        _require(key in raw or (key == "out" and out is not None), f"{path}: '{key}' is required")
    notebook = raw["notebook"]
    _require(isinstance(notebook, (str, int)), f"{path}: notebook must be a number or name, got {notebook!r}")
    nb_dir = (base / raw["notebooks"]).resolve() if "notebooks" in raw else default_notebooks_dir()
    infos = discover_notebooks(nb_dir, [notebook])
    profile = check_choice(raw.get("profile", "smoke"), "profile", PROFILES)
    grid, fixed = raw.get("grid"), raw.get("parameters", {})
    _require(isinstance(grid, dict) and grid, f"{path}: [grid] must be a table with at least one parameter")
    _require(isinstance(fixed, dict), f"{path}: [parameters] must be a table")
    for name, values in grid.items():
        _require(isinstance(values, list) and values, f"{path}: grid.{name} must be a non-empty list, got {values!r}")
        _require(len({json.dumps(v) for v in values}) == len(values), f"{path}: grid.{name} repeats a value")
    known = set(parameters_cell(nbformat.read(infos[0].path, as_version=4), infos[0].name))
    for name in [*grid, *fixed]:
        _require(name not in _RESERVED_PARAMETERS,
                 f"{path}: '{name}' is set by the sweep (use the top-level 'profile'; runs get their own output_dir)")
        _require(name in known, f"{path}: '{name}' is not a parameter of {infos[0].name}; its parameters: "
                 f"{sorted(known - set(_RESERVED_PARAMETERS))}")
    both = sorted(set(grid) & set(fixed))
    _require(not both, f"{path}: {both} appear in both [grid] and [parameters]")
    workers = raw.get("workers", 1) if workers is None else workers
    _require(isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1,
             f"workers must be a positive integer, got {workers!r}")
    timeout = raw.get("timeout")
    _require(timeout is None or (isinstance(timeout, (int, float)) and timeout > 0),
             f"{path}: timeout must be a positive number of seconds, got {timeout!r}")
    collect = raw.get("collect", {})
    _require(isinstance(collect, dict) and set(collect) <= _COLLECT_KEYS,
             f"{path}: [collect] may only set {sorted(_COLLECT_KEYS)}")
    out_dir = Path(out).resolve() if out is not None else (base / raw["out"]).resolve()
    return SweepSpec(notebook=infos[0].name, notebooks_dir=nb_dir, profile=profile, out=out_dir, grid=dict(grid),
                     parameters=dict(fixed), workers=workers, timeout=timeout, collect=dict(collect))


def _run_id(point: Mapping[str, Any], identity: Mapping[str, Any]) -> str:
    readable = _SAFE.sub("_", "_".join(f"{k}={v}" for k, v in point.items()))[:80]
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def sweep_runs(spec: SweepSpec) -> list[SweepRun]:
    """The grid's runs in a fixed order (the last grid axis varies fastest).

    A run's id depends on every parameter, the profile and the notebook, so changing the
    fixed parameters or the profile gives new runs rather than reusing stale ones.
    """
    names = list(spec.grid)
    runs = []
    for values in itertools.product(*(spec.grid[n] for n in names)):
        point = dict(zip(names, values))
        params = {**spec.parameters, **point}
        identity = {"notebook": spec.notebook, "profile": spec.profile, "parameters": params}
        runs.append(SweepRun(run_id=_run_id(point, identity), parameters=params))
    return runs


def _results_path(spec_dict: Mapping[str, Any], run_id: str) -> Path:
    return Path(spec_dict["out"]) / "runs" / run_id / spec_dict["notebook"] / RESULTS_FILENAME


def _marker(spec_dict: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, Any]:
    return {"run_id": run["run_id"], "notebook": spec_dict["notebook"], "profile": spec_dict["profile"],
            "parameters": run["parameters"]}


def _is_complete(spec_dict: Mapping[str, Any], run: Mapping[str, Any]) -> bool:
    path = _results_path(spec_dict, run["run_id"])
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    marker = payload.get("sweep") if isinstance(payload, dict) else None
    return isinstance(marker, dict) and {k: marker.get(k) for k in ("run_id", "notebook", "profile", "parameters")} \
        == json.loads(json.dumps(_marker(spec_dict, run)))


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a run killed here leaves either the old file or the new one, never half


def _execute_run(spec_dict: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Run one grid point through the course runner and mark its results.json (in a worker process)."""
    from .runner import run_notebooks

    run_dir = Path(spec_dict["out"]) / "runs" / run["run_id"]
    (run_dir / "failed.json").unlink(missing_ok=True)
    try:
        report = run_notebooks(spec_dict["profile"], only=[spec_dict["notebook"]], out=run_dir,
                               parameters=run["parameters"], progress=False,
                               notebooks_dir=spec_dict["notebooks_dir"], execution_timeout=spec_dict["timeout"])
    except Exception as exc:  # a bad parameter value, a vanished notebook: this run fails, the sweep goes on
        report, error = None, f"{type(exc).__name__}: {exc}"
    result = None if report is None else report.runs[0]
    if result is None or not result.ok:
        error = error if report is None else report.format_failures()
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(run_dir / "failed.json", {"run_id": run["run_id"], "error": error})
        return {"run_id": run["run_id"], "ok": False, "error": error,
                "wall_time_s": 0.0 if result is None else result.wall_time_s}
    path = _results_path(spec_dict, run["run_id"])
    payload = json.loads(path.read_text(encoding="utf-8"))
    payload["sweep"] = {**_marker(spec_dict, run), "wall_time_s": round(result.wall_time_s, 3)}
    _write_json_atomic(path, payload)
    return {"run_id": run["run_id"], "ok": True, "error": "", "wall_time_s": result.wall_time_s}


def _spec_dict(spec: SweepSpec) -> dict[str, Any]:
    d = asdict(spec)
    d["out"], d["notebooks_dir"] = str(spec.out), str(spec.notebooks_dir)
    return d


def completed_results(out: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a sweep folder: its manifest and the marked ``results.json`` payload of each finished run.

    Raises:
        FileNotFoundError: no ``sweep.json`` in ``out`` (not a sweep folder).
    """
    out = Path(out)
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{out} has no {MANIFEST}; run 'fedlora-lite sweep run FILE' first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    spec_dict = {**manifest, "out": str(out)}
    done = []
    for run in manifest["runs"]:
        if _is_complete(spec_dict, run):
            done.append(json.loads(_results_path(spec_dict, run["run_id"]).read_text(encoding="utf-8")))
    return manifest, done


def run_sweep(
    spec: SweepSpec,
    *,
    workers: int | None = None,
    progress: bool = True,
    on_run_done: Callable[[str, bool], None] | None = None,
) -> SweepReport:
    """Execute every run of the sweep that is not finished yet; resumable.

    Args:
        spec: from :func:`load_sweep`.
        workers: override ``spec.workers``; with 1 the runs execute in this process,
            otherwise in that many spawned worker processes (one kernel each).
        progress: show a progress bar over runs.
        on_run_done: called as ``on_run_done(run_id, ok)`` after each executed run (in this
            process), e.g. to log progress.

    Returns:
        A :class:`SweepReport`; ``exit_code`` is 1 when a run failed.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    workers = spec.workers if workers is None else workers
    _require(isinstance(workers, int) and workers >= 1, f"workers must be a positive integer, got {workers!r}")
    runs = sweep_runs(spec)
    spec_dict = _spec_dict(spec)
    spec.out.mkdir(parents=True, exist_ok=True)
    manifest = {k: spec_dict[k] for k in ("notebook", "notebooks_dir", "profile", "grid", "parameters", "collect")}
    manifest["runs"] = [asdict(r) for r in runs]
    _write_json_atomic(spec.out / MANIFEST, manifest)
    report = SweepReport(out=spec.out, total=len(runs))
    todo = []
    for run in runs:
        if _is_complete(spec_dict, asdict(run)):
            report.skipped.append(run.run_id)
        else:
            todo.append(run)
    bar = tqdm(total=len(todo), desc=f"sweep {spec.notebook}", unit="run", disable=not progress, dynamic_ncols=True)

    def record(outcome: dict[str, Any]) -> None:
        bar.update(1)
        if outcome["ok"]:
            report.ran.append(outcome["run_id"])
        else:
            report.failed[outcome["run_id"]] = outcome["error"]
        if on_run_done is not None:
            on_run_done(outcome["run_id"], outcome["ok"])

    try:
        if workers == 1 or len(todo) <= 1:
            for run in todo:
                record(_execute_run(spec_dict, asdict(run)))
        else:
            # spawn, not fork: each worker starts clean (no inherited ZMQ sockets or torch threads)
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
                futures = [pool.submit(_execute_run, spec_dict, asdict(run)) for run in todo]
                try:
                    for fut in as_completed(futures):
                        record(fut.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # finish the runs in flight, start no more
                    raise
    finally:
        bar.close()
        report.wall_time_s = time.perf_counter() - t0
    return report
