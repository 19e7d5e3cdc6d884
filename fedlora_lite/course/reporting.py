"""Profiles, results files and summary tables: the glue between notebooks and the runner.

Every notebook picks its sizes with :func:`select_profile` (``smoke`` for seconds-long
checks, ``default`` for the CPU run whose outputs are committed, ``full`` for a GPU) and
ends by writing its key numbers with :func:`save_results` to ``<output_dir>/results.json``.
The runner (:mod:`fedlora_lite.course.runner`) collects those files with :func:`load_results` and
renders them as the run summary (:mod:`fedlora_lite.course.summary`).

Results files are strict JSON. Non-finite numbers (NaN, Inf) are refused by default,
because a NaN in a summary almost always means a diverged run that should fail loudly;
pass ``allow_nonfinite=True`` to store them as ``null`` instead.

Same seed, same profile, same bytes: ``results.json`` holds no timestamps, paths or wall
times. Wall-clock measurements go to ``timings.json`` beside it (``save_results(...,
timings=...)``), which determinism checks ignore. The runner adds a ``"run"`` record (profile
and parameters, without the output folder) with :func:`record_run`. Every file here is
written atomically (a temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

__all__ = [
    "PROFILES",
    "RESULTS_FILENAME",
    "TIMINGS_FILENAME",
    "atomic_write_text",
    "record_run",
    "load_run_record",
    "load_timings",
    "ProfileConfig",
    "select_profile",
    "save_results",
    "load_results",
    "to_jsonable",
]

PROFILES: tuple[str, ...] = ("smoke", "default", "full")
"""The profile names every notebook understands, from cheapest to most expensive."""

RESULTS_FILENAME = "results.json"
TIMINGS_FILENAME = "timings.json"
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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see the old file or the new one, never a part; the temporary file is removed
    if writing fails (or is interrupted).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _dump(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, indent=2, allow_nan=False) + "\n"


def save_results(
    results: Mapping[str, Any],
    output_dir: str | Path,
    notebook: str,
    *,
    timings: Mapping[str, Any] | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Write a notebook's key numbers to ``<output_dir>/results.json``.

    The file is ``{"notebook": ..., "format_version": 1, "results": {...}}`` with keys in
    insertion order; no timestamps, so the same run gives the same bytes. Wall-clock
    measurements belong in ``timings``: they go to ``<output_dir>/timings.json``, which is
    not part of the deterministic results.

    Args:
        results: mapping of string keys to numbers, strings, bools, lists, nested
            mappings, torch/numpy scalars or small tensors/arrays.
        output_dir: directory (created if missing), normally the notebook's
            ``output_dir`` parameter.
        notebook: the notebook's name, e.g. ``"02_linear_regression"``.
        timings: optional wall times and speed ratios (same value types as ``results``).
        allow_nonfinite: store NaN/Inf as ``null`` instead of raising.

    Returns:
        Path of the written ``results.json``.

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
    if timings is not None and not isinstance(timings, Mapping):
        raise TypeError(f"timings must be a mapping, got {type(timings).__name__}")
    payload = {
        "notebook": notebook,
        "format_version": _FORMAT_VERSION,
        "results": to_jsonable(results, allow_nonfinite=allow_nonfinite),
    }
    timing_payload = None
    if timings is not None:
        timing_payload = {"notebook": notebook, "format_version": _FORMAT_VERSION,
                          "timings": to_jsonable(timings, allow_nonfinite=allow_nonfinite, _path="timings")}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if timing_payload is not None:
        atomic_write_text(out / TIMINGS_FILENAME, _dump(timing_payload))
    return atomic_write_text(out / RESULTS_FILENAME, _dump(payload))


def _read_payload(path: str | Path, filename: str) -> tuple[Path, dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / filename
    payload = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(payload, dict):
        kind = "results" if filename == RESULTS_FILENAME else "timings"
        raise ValueError(f"{p} is not a fedlora_lite {kind} file (not a JSON object)")
    return p, payload


def record_run(path: str | Path, run: Mapping[str, Any]) -> Path:
    """Add (or replace) the ``"run"`` record of a results file: how the numbers were produced.

    The runner records ``{"profile": ..., "parameters": {...}, "overrides": [...]}`` here
    (see :func:`fedlora_lite.course.runner.run_notebooks`). Keep it free of paths and
    times so that same-seed runs stay byte-identical.
    """
    p, payload = _read_payload(path, RESULTS_FILENAME)
    payload["run"] = to_jsonable(run, _path="run")
    return atomic_write_text(p, _dump(payload))


def load_run_record(path: str | Path) -> dict[str, Any] | None:
    """The ``"run"`` record of a results file (None when it has none)."""
    _, payload = _read_payload(path, RESULTS_FILENAME)
    run = payload.get("run")
    return run if isinstance(run, dict) else None


def load_timings(path: str | Path) -> dict[str, Any]:
    """The ``timings`` mapping written by ``save_results(..., timings=...)`` (file or folder)."""
    p, payload = _read_payload(path, TIMINGS_FILENAME)
    if not isinstance(payload.get("timings"), dict):
        raise ValueError(f"{p} is not a fedlora_lite timings file (no 'timings' mapping)")
    return payload["timings"]


def load_results(path: str | Path) -> dict[str, Any]:
    """Read the ``results`` mapping written by :func:`save_results`.

    Args:
        path: the ``results.json`` file or the directory containing it.

    Raises:
        FileNotFoundError: no results file there.
        ValueError: the file is not a results file.
    """
    p, payload = _read_payload(path, RESULTS_FILENAME)
    if not isinstance(payload.get("results"), dict):
        raise ValueError(f"{p} is not a fedlora_lite results file (no 'results' mapping)")
    return payload["results"]
