"""Run a snippet of Python in a child process under a memory cap and a timeout.

Hostile-input tests whose *regression* would exhaust memory or hang (a config that is a
link to ``/dev/zero``, a FIFO, a rank of 2**40) run here, so that a regression fails that
one test instead of taking the whole suite down. The cap is on the address space
(``RLIMIT_AS``): importing torch and the LoRA stack needs about 1 GiB of it, so the
default 3 GiB leaves room for the work and none for a multi-GB allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

DEFAULT_MEMORY = 3 << 30
ROOT = Path(__file__).resolve().parents[1]


def _preexec(memory_bytes: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return apply


def run_limited(code: str, *, memory_bytes: int = DEFAULT_MEMORY, timeout_s: float = 120.0,
                cwd: str | Path | None = None) -> dict:
    """Run ``code`` in a fresh interpreter under the limits; return the JSON it prints last.

    The snippet reports by printing one JSON object as its last line of stdout.

    Raises:
        AssertionError: the child ran out of time, died, or printed no JSON (with its stderr).
    """
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True, text=True, timeout=timeout_s, cwd=cwd, env=env,
            preexec_fn=_preexec(memory_bytes),
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"child process exceeded {timeout_s} s (a hang?)\nstderr: {exc.stderr}") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"child process failed (exit {proc.returncode}; memory cap {memory_bytes >> 20} MiB)\n"
                             f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}")
    return json.loads(lines[-1])
