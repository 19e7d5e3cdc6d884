"""Executing one notebook with papermill: the pinned kernel, failures as data, atomic copies.

:func:`execute_notebook` runs one notebook on the ``python3`` kernel pinned to this
interpreter (:func:`pinned_python_kernel`), turns a failing cell, a dead kernel or a
timeout into a :class:`CellError` (a failure is data for the run summary, not an
exception), and writes the executed copy through a hidden partial file that replaces the
final name only when execution ends. :func:`prepare_outputs` removes a notebook's previous
outputs before it runs. The sequence around it lives in :mod:`fedlora_lite.course.runner`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .notebooks import KERNELSPEC, NotebookInfo
from .reporting import RESULTS_FILENAME, TIMINGS_FILENAME
from .run_control import RunInterrupted
from .widgets import WIDGETS_ENV

__all__ = ["CellError", "pinned_python_kernel", "execute_notebook", "prepare_outputs"]


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


def _kernel_manager_logging_to(log):
    """An AsyncKernelManager class whose kernel process writes its stdout/stderr to ``log``.

    The kernel's own log lines (e.g. the traceback ipykernel prints when it is shut down
    in the middle of a cell, after Ctrl-C) would otherwise interleave with this process's
    output; when a kernel dies, the tail of the log is shown with the failure instead.
    """
    from jupyter_client.manager import AsyncKernelManager

    class KernelManagerWithLog(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            await AsyncKernelManager.start_kernel(self, **kw)

    return KernelManagerWithLog


def _log_tail(log, max_lines: int = 8) -> str:
    """The last lines of the kernel's log (empty if it is closed or empty)."""
    try:
        log.seek(0)
        lines = log.read().decode("utf-8", "replace").strip().splitlines()
    except (OSError, ValueError):
        return ""
    return "\n".join(lines[-max_lines:])


def execute_notebook(
    info: NotebookInfo,
    output: Path,
    *,
    parameters: Mapping[str, Any] | None,
    cwd: Path,
    kernel_name: str,
    progress: bool,
    execution_timeout: int | None,
) -> tuple[float, CellError | None]:
    """Run one notebook with papermill; return (wall seconds, error or None).

    papermill saves the executed copy as it goes; it writes to a hidden ``.NN_topic.partial.ipynb``
    that replaces ``output`` only when execution ends (with or without a failing cell),
    so an interrupted run never leaves a half-executed copy under the final name.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    partial = output.with_name(f".{output.stem}.partial.ipynb")
    t0 = time.perf_counter()
    error = None
    config = _kernel_manager_config()
    kernel_log = tempfile.TemporaryFile()  # the kernel process's own output (cells' outputs travel over ZMQ)
    config.NotebookClient.kernel_manager_class = _kernel_manager_logging_to(kernel_log)
    try:
        with pinned_python_kernel(kernel_name):
            pm.execute_notebook(
                str(info.path),
                str(partial),
                parameters=dict(parameters) if parameters else None,
                kernel_name=kernel_name,
                cwd=str(cwd),
                progress_bar=progress,
                log_output=False,
                execution_timeout=execution_timeout,
                config=config,
            )
    except PapermillExecutionError as exc:
        if exc.ename == "KeyboardInterrupt":  # the kernel itself was interrupted: stop the run, not just this notebook
            partial.unlink(missing_ok=True)
            raise RunInterrupted(signal.SIGINT) from None
        error = CellError(
            ename=exc.ename,
            evalue=str(exc.evalue),
            cell_index=exc.cell_index,
            execution_count=exc.exec_count,
            source=_excerpt(exc.source or ""),
        )
    except Exception as exc:  # kernel death, cell timeout, unreadable notebook: still a reportable failure
        error = CellError(ename=type(exc).__name__, evalue=str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                          source=_log_tail(kernel_log))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        kernel_log.close()
    wall = time.perf_counter() - t0
    if partial.exists():
        try:
            os.replace(partial, output)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            error = error or CellError(ename="OutputError", evalue=f"cannot write the executed copy {output}: {exc.strerror}")
    return wall, error


def prepare_outputs(output: Path, nb_out: Path | None) -> CellError | None:
    """Remove this notebook's previous executed copy, results and timings (never report stale files)."""
    try:
        if output.is_dir():
            raise IsADirectoryError(f"{output} is a folder, where the executed copy goes")
        output.unlink(missing_ok=True)
        if nb_out is not None:
            if nb_out.exists() and not nb_out.is_dir():
                raise NotADirectoryError(f"{nb_out} is a file, where the notebook's output folder goes")
            for fname in (RESULTS_FILENAME, TIMINGS_FILENAME):
                (nb_out / fname).unlink(missing_ok=True)
    except OSError as exc:
        return CellError(ename="OutputError", evalue=str(exc) if exc.strerror is None else f"{exc.strerror}: {exc.filename}")
    return None
