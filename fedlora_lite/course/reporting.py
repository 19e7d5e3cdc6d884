"""Profiles, results files and summary tables: the glue between notebooks and the runner.

Every notebook picks its sizes with :func:`select_profile` (``smoke`` for seconds-long
checks, ``default`` for the CPU run whose outputs are committed, ``full`` for a GPU) and
ends by writing its key numbers with :func:`save_results` to ``<output_dir>/results.json``.
The runner (:mod:`fedlora_lite.course.runner`) collects those files with :func:`load_results` and
renders them with :func:`summary_table`, :func:`write_summary_markdown` and
:func:`write_summary_csv`.

Results files are strict JSON. Non-finite numbers (NaN, Inf) are refused by default,
because a NaN in a summary almost always means a diverged run that should fail loudly;
pass ``allow_nonfinite=True`` to store them as ``null`` instead.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

__all__ = [
    "PROFILES",
    "RESULTS_FILENAME",
    "ProfileConfig",
    "SummaryRow",
    "select_profile",
    "save_results",
    "load_results",
    "to_jsonable",
    "summary_table",
    "write_summary_markdown",
    "write_summary_csv",
]

PROFILES: tuple[str, ...] = ("smoke", "default", "full")
"""The profile names every notebook understands, from cheapest to most expensive."""

RESULTS_FILENAME = "results.json"
_FORMAT_VERSION = 1
_MAX_TENSOR_ELEMENTS = 10_000  # results files hold key numbers, not weights
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class ProfileConfig(SimpleNamespace):
    """Read-only attribute-access view of one profile's settings.

    ``cfg.profile`` is the profile name; every other attribute is a size/setting from
    the notebook's profile table (after overrides). ``cfg.as_dict()`` returns a plain
    dict, e.g. to record the configuration in ``results.json``.
    """

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"ProfileConfig is read-only; pass {name}=... to select_profile instead")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError("ProfileConfig is read-only")

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (including ``profile``)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"ProfileConfig({items})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProfileConfig) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]


def select_profile(profile: str, table: Mapping[str, Mapping[str, Any]], **overrides: Any) -> ProfileConfig:
    """Pick one profile's settings from a notebook's profile table, applying overrides.

    Args:
        profile: profile name, a key of ``table`` (normally one of :data:`PROFILES`).
        table: ``{profile_name: {setting: value}}``; every profile must define the same
            settings so that a notebook behaves the same way under each profile.
        **overrides: settings to replace; ``None`` means "use the profile's value", so a
            notebook can pass its ``parameters`` cell straight through
            (``select_profile(profile, table, n_clients=n_clients)``).

    Returns:
        A read-only :class:`ProfileConfig` with ``profile`` plus every setting.

    Raises:
        TypeError: ``profile`` is not a string or ``table`` is not a mapping of mappings.
        ValueError: unknown ``profile``, inconsistent table, or an override that names a
            setting the table does not have.
    """
    if not isinstance(profile, str):
        raise TypeError(f"profile must be a string, got {type(profile).__name__}")
    if not isinstance(table, Mapping) or not table:
        raise TypeError("table must be a non-empty mapping {profile_name: {setting: value}}")
    for name, settings in table.items():
        if not isinstance(settings, Mapping):
            raise TypeError(f"table[{name!r}] must be a mapping of settings, got {type(settings).__name__}")
    if profile not in table:
        raise ValueError(f"profile must be one of {sorted(table)}, got {profile!r}")
    keys = set(table[profile])
    for name, settings in table.items():
        if set(settings) != keys:
            diff = sorted(set(settings) ^ keys)
            raise ValueError(f"table: profiles {profile!r} and {name!r} define different settings: {diff}")
    reserved = {"profile", "as_dict"} | {k for k in keys if k.startswith("_")}
    bad = sorted(keys & reserved)
    if bad:
        raise ValueError(f"table: setting names {bad} are reserved")
    unknown = sorted(k for k in overrides if k not in keys)
    if unknown:
        raise ValueError(f"overrides {unknown} are not settings of the profile table; known settings: {sorted(keys)}")
    values = dict(table[profile])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ProfileConfig(profile=profile, **values)


def to_jsonable(value: Any, *, allow_nonfinite: bool = False, _path: str = "results") -> Any:
    """Convert nested results (dicts, lists, torch/numpy scalars and small arrays) to JSON types.

    Tensors and arrays become (nested) lists; dataclasses become dicts; paths become
    strings; tuples and sets become lists. Mapping keys must be strings.

    Raises:
        TypeError: a value of an unsupported type, or a non-string key.
        ValueError: NaN/Inf without ``allow_nonfinite``, or a tensor too large to be a
            "key number" (more than 10,000 elements).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if math.isfinite(x):
            return x
        if allow_nonfinite:
            return None
        raise ValueError(f"{_path} is {x}; results must be finite (pass allow_nonfinite=True to store null)")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.numel() > _MAX_TENSOR_ELEMENTS:
            raise ValueError(f"{_path} is a tensor with {value.numel()} elements; save summaries, not weights")
        return to_jsonable(value.tolist(), allow_nonfinite=allow_nonfinite, _path=_path)
    if isinstance(value, np.ndarray):
        if value.size > _MAX_TENSOR_ELEMENTS:
            raise ValueError(f"{_path} is an array with {value.size} elements; save summaries, not weights")
        return to_jsonable(value.tolist(), allow_nonfinite=allow_nonfinite, _path=_path)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, ProfileConfig):
        value = value.as_dict()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{_path} has a non-string key {k!r}; use string keys")
            out[k] = to_jsonable(v, allow_nonfinite=allow_nonfinite, _path=f"{_path}.{k}")
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v, allow_nonfinite=allow_nonfinite, _path=f"{_path}[{i}]") for i, v in enumerate(items)]
    raise TypeError(f"{_path} has unsupported type {type(value).__name__}; convert it to numbers, strings or lists")


def save_results(
    results: Mapping[str, Any],
    output_dir: str | Path,
    notebook: str,
    *,
    allow_nonfinite: bool = False,
) -> Path:
    """Write a notebook's key numbers to ``<output_dir>/results.json``.

    The file is ``{"notebook": ..., "format_version": 1, "results": {...}}`` with keys in
    insertion order; no timestamps, so the same run gives the same bytes.

    Args:
        results: mapping of string keys to numbers, strings, bools, lists, nested
            mappings, torch/numpy scalars or small tensors/arrays.
        output_dir: directory (created if missing), normally the notebook's
            ``output_dir`` parameter.
        notebook: the notebook's name, e.g. ``"02_linear_regression"``.
        allow_nonfinite: store NaN/Inf as ``null`` instead of raising.

    Returns:
        Path of the written file.

    Raises:
        TypeError: ``results`` is not a mapping or holds unsupported values.
        ValueError: bad ``notebook`` name or non-finite values (see ``allow_nonfinite``).
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a mapping, got {type(results).__name__}")
    if not isinstance(notebook, str) or not _NAME_RE.match(notebook):
        raise ValueError(f"notebook must be a name like '02_linear_regression', got {notebook!r}")
    if not isinstance(output_dir, (str, Path)):
        raise TypeError(f"output_dir must be a str or Path, got {type(output_dir).__name__}")
    payload = {
        "notebook": notebook,
        "format_version": _FORMAT_VERSION,
        "results": to_jsonable(results, allow_nonfinite=allow_nonfinite),
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILENAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a crashed run never leaves half a file
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read the ``results`` mapping written by :func:`save_results`.

    Args:
        path: the ``results.json`` file or the directory containing it.

    Raises:
        FileNotFoundError: no results file there.
        ValueError: the file is not a results file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILENAME
    payload = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(payload, dict) or not isinstance(payload.get("results"), dict):
        raise ValueError(f"{p} is not a fedlora_lite results file (no 'results' mapping)")
    return payload["results"]


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One line of the run summary: a key number of one notebook (or its status only)."""

    notebook: str
    key: str
    value: Any
    status: str = "ok"
    wall_time_s: float | None = None


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
    wall_times: Mapping[str, float] | None = None,
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
    """
    if not isinstance(results_by_notebook, Mapping):
        raise TypeError(f"results_by_notebook must be a mapping, got {type(results_by_notebook).__name__}")
    status = status or {}
    wall_times = wall_times or {}
    rows: list[SummaryRow] = []
    for nb, results in results_by_notebook.items():
        st = status.get(nb, "ok")
        wt = wall_times.get(nb)
        flat = _flatten("", results) if results else []
        if not flat:
            rows.append(SummaryRow(nb, "", "", st, wt))
        for key, value in flat:
            rows.append(SummaryRow(nb, key, value, st, wt))
    return rows


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_summary_markdown(rows: Sequence[SummaryRow], path: str | Path, *, title: str = "Run summary") -> Path:
    """Write the rows as Markdown: a per-notebook status table, then the key numbers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| notebook | status | wall time (s) |", "|---|---|---:|"]
    seen: dict[str, SummaryRow] = {}
    for r in rows:
        seen.setdefault(r.notebook, r)
    for nb, r in seen.items():
        wt = "" if r.wall_time_s is None else f"{r.wall_time_s:.1f}"
        lines.append(f"| {_md_escape(nb)} | {_md_escape(r.status)} | {wt} |")
    lines += ["", "| notebook | key | value |", "|---|---|---:|"]
    for r in rows:
        if r.key:
            lines.append(f"| {_md_escape(r.notebook)} | {_md_escape(r.key)} | {_md_escape(_format_value(r.value))} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_summary_csv(rows: Sequence[SummaryRow], path: str | Path) -> Path:
    """Write the rows as CSV with columns notebook, key, value, status, wall_time_s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["notebook", "key", "value", "status", "wall_time_s"])
        for r in rows:
            wt = "" if r.wall_time_s is None else f"{r.wall_time_s:.2f}"
            value = r.value if isinstance(r.value, str) else json.dumps(r.value)  # full precision
            writer.writerow([r.notebook, r.key, value, r.status, wt])
    return path
