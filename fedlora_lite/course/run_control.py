"""Guards around a notebook run: argument checks before anything runs, and clean interrupts.

The runner (:mod:`fedlora_lite.course.runner`) calls these before it executes a single
cell, so that a usage error (an output folder that cannot be written, a bad timeout, a
mistyped parameter name) is one clear ``ValueError``/``TypeError`` — which the CLI turns
into exit status 2 — instead of a traceback or a run that "succeeds" with the wrong
parameters. :func:`signals_raise` makes SIGTERM behave like Ctrl-C while notebooks run:
both raise :class:`RunInterrupted` in the main thread, so every ``with`` block (the
temporary kernelspec folder, the kernel itself) is cleaned up and the summary is written.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat

from .notebooks import NotebookInfo, parameters_cell
from .reporting import to_jsonable

__all__ = ["RunInterrupted", "signals_raise", "check_out_dir", "check_timeout", "notebook_parameters",
           "run_record"]

SUMMARY_FILES = ("summary.md", "summary.csv")


class RunInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM arrived while notebooks ran; the run summary was written first.

    Attributes:
        signum: the signal number; :attr:`exit_code` is the shell's ``128 + signum``
            (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int = signal.SIGINT):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def signals_raise() -> Iterator[Callable[[], None]]:
    """Within the block, SIGINT and SIGTERM raise :class:`RunInterrupted` (main thread only).

    Handlers a caller installed itself, and ignored signals (``SIG_IGN``, e.g. SIGINT in a
    background job), are left alone; the previous handlers are restored afterwards. The
    block receives a ``rearm()`` function that puts the handlers back if a library reset
    them to the default in the meantime (asyncio does that when it removes its own).
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise RunInterrupted(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            previous[sig] = signal.signal(sig, handler)

    def rearm() -> None:
        for sig in previous:
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(sig, handler)

    try:
        yield rearm
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def check_out_dir(out_dir: Path, name: str = "out") -> Path:
    """Create ``out_dir`` if needed and check that it is a folder this process can write.

    Raises:
        ValueError: it exists as a file, lies under a file, cannot be created or written,
            or a summary file's name is taken by a folder. The message names ``name``.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{name}: {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{name}: cannot create the folder {out_dir}: {exc.strerror or exc}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".fedlora-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{name}: cannot write into {out_dir}: {exc.strerror or exc}") from None
    for fname in SUMMARY_FILES:
        if (out_dir / fname).is_dir():
            raise ValueError(f"{name}: {out_dir / fname} is a folder, but the run summary is written there")
    return out_dir


def check_timeout(value: Any, name: str = "execution_timeout") -> int | None:
    """A per-cell timeout in whole seconds (rounded up: never shorter than asked), or None.

    nbclient's timeout is an integer trait, so 30.5 becomes 31 instead of failing every
    notebook with a type error.

    Raises:
        TypeError: not a real number.
        ValueError: not finite and > 0.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return int(math.ceil(value))


def notebook_parameters(notebooks: Sequence[NotebookInfo], overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each notebook's parameters cell (name -> literal default), checking every override name.

    A notebook whose parameters cell is missing or unreadable gets ``{}`` here (papermill
    then reports it when it runs); the anatomy test requires the cell.

    Raises:
        ValueError: an override that is not a parameter of some selected notebook; the
            message lists that notebook's parameters.
    """
    found: dict[str, dict[str, Any]] = {}
    problems = []
    for info in notebooks:
        try:
            params = parameters_cell(nbformat.read(info.path, as_version=4), info.name)
        except Exception:  # noqa: BLE001 - unreadable notebooks fail when they run, with their error
            found[info.name] = {}
            continue
        found[info.name] = params
        unknown = sorted(k for k in overrides if k not in params)
        if unknown:
            problems.append(f"{info.name} has no parameter {', '.join(unknown)} (its parameters: {', '.join(params)})")
    if problems:
        raise ValueError("unknown parameter name: " + "; ".join(problems))
    return found


def _plain(value: Any) -> Any:
    try:
        return to_jsonable(value)
    except (TypeError, ValueError):
        return repr(value)


def run_record(defaults: Mapping[str, Any], injected: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The ``"run"`` record of a results file: effective parameters (sorted) and overridden names.

    ``output_dir`` is left out: where a run wrote its files is not a parameter of its numbers,
    and leaving it out keeps same-seed runs in different folders byte-identical.
    """
    params = {**defaults, **injected}
    params.pop("output_dir", None)
    return {"parameters": {k: _plain(params[k]) for k in sorted(params)}, "overrides": sorted(overrides)}
