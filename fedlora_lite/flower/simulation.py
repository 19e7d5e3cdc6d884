"""Flower's simulation engine from Python (and from a notebook): K virtual nodes on a few CPU cores.

:func:`run_flower_simulation` hands the ServerApp and ClientApp of this package, configured
by a :class:`~fedlora_lite.flower.config.FlowerRunConfig`, to
:func:`flwr.simulation.run_simulation` with the Ray backend sized for a small machine:
``num_cpus`` Ray CPUs in all (default: every core, at most 2), ``cpus_per_node`` per
virtual node (so ``num_cpus / cpus_per_node`` ClientApps run at once), a 100 MB object
store, no dashboard. Every reply wait is bounded by ``cfg.round_timeout``, so a stuck node
cannot hang the run, and Ray is shut down when the run ends (also after an error).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from typing import Any

from .client import make_client_app
from .config import FlowerRunConfig
from .results import FlowerResult
from .server import make_server_app

__all__ = ["ray_backend_config", "run_flower_simulation", "quiet_flower_environment"]


def quiet_flower_environment() -> None:
    """No telemetry, no update check, no Ray accelerator warning (set only where unset)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def ray_backend_config(num_cpus: int | None = None, cpus_per_node: float = 1.0, object_store_mb: int = 100) -> dict[str, Any]:
    """The Ray backend config of :func:`flwr.simulation.run_simulation` for a small CPU machine.

    Args:
        num_cpus: CPUs Ray may use in all (default ``min(2, os.cpu_count())``).
        cpus_per_node: CPUs reserved by one running ClientApp.
        object_store_mb: Ray's shared-memory object store (the adapters are a few kB).
    """
    n = min(2, os.cpu_count() or 1) if num_cpus is None else int(num_cpus)
    if n < 1 or cpus_per_node <= 0 or cpus_per_node > n:
        raise ValueError(f"need 0 < cpus_per_node <= num_cpus, got cpus_per_node={cpus_per_node}, num_cpus={n}")
    return {"client_resources": {"num_cpus": float(cpus_per_node), "num_gpus": 0.0},
            "init_args": {"num_cpus": n, "num_gpus": 0, "object_store_memory": int(object_store_mb) * 1024 * 1024,
                          "include_dashboard": False, "logging_level": "warning"}}


def run_flower_simulation(cfg: FlowerRunConfig, *, num_cpus: int | None = None, cpus_per_node: float = 1.0,
                          quiet: bool = True) -> FlowerResult:
    """Run ``cfg`` on Flower's simulation engine (Ray backend) with ``cfg.num_nodes`` virtual nodes.

    Args:
        cfg: the run; its ``output_dir`` receives ``flower_results.json`` and the checkpoints
            (a temporary folder when None).
        num_cpus, cpus_per_node: Ray resources (:func:`ray_backend_config`).
        quiet: show only Flower's errors (not its per-round log, nor the deprecation notice of
            ``run_simulation``; exclusions and flags are in the results either way).

    Returns:
        The run's :class:`~fedlora_lite.flower.results.FlowerResult` (``data["wall_seconds"]``
        is the whole simulation including Ray's start).
    """
    from flwr.simulation import run_simulation

    if not isinstance(cfg, FlowerRunConfig):
        raise TypeError(f"cfg must be a FlowerRunConfig, got {type(cfg).__name__}")
    if cfg.output_dir is None:
        cfg = cfg.replace(output_dir=tempfile.mkdtemp(prefix="fedlora_flower_"))
    quiet_flower_environment()
    backend = ray_backend_config(num_cpus, cpus_per_node)
    logger = logging.getLogger("flwr")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
            run_simulation(make_server_app(cfg, engine="simulation"), make_client_app(cfg), num_supernodes=cfg.num_nodes,
                           backend_config=backend)
    finally:
        logger.setLevel(level)
    result = FlowerResult.load(cfg.output_dir)
    result.data["wall_seconds"] = time.perf_counter() - t0
    return result
