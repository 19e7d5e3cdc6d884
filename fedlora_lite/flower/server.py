"""The ServerApp: runs every method of a :class:`~fedlora_lite.flower.config.FlowerRunConfig` on one federation.

For each method in turn, the ServerApp builds its strategy
(:func:`~fedlora_lite.flower.strategies.build_strategy`) and calls its ``start`` on the
Grid: R rounds of local training -> aggregation -> per-node evaluation, checkpointed after
every round under ``<output_dir>/checkpoints/<fingerprint>/<method>/`` (resumed when the
run is started again). Nodes are stateless, so methods run back to back on the same
nodes without interfering. After every method ``<output_dir>/flower_results.json`` is
rewritten (:func:`fedlora_lite.flower.results.FlowerResult` reads it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .client import reference_adapter
from .config import FlowerRunConfig
from .strategies import build_strategy

__all__ = ["RESULTS_FILE", "run_server", "make_server_app", "server_app"]

RESULTS_FILE = "flower_results.json"


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def run_server(grid: Grid, cfg: FlowerRunConfig, *, engine: str = "flower") -> dict[str, Any]:
    """Run ``cfg.methods`` one after the other on ``grid`` and return (and write) the results.

    Args:
        grid: Flower's Grid (simulation or deployment).
        cfg: the run.
        engine: recorded in the results (``"simulation"``, ``"deployment"``, ...).

    Returns:
        ``{"config": run config, "engine", "methods": {method: {"history": [...], "seconds"}}, ...}``.
    """
    reference = reference_adapter(cfg)
    out = Path(cfg.output_dir) if cfg.output_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "format": 1, "engine": engine, "config": cfg.to_run_config(), "fingerprint": cfg.fingerprint(),
        "reference": {"modules": list(reference.names), "rank": reference.rank, "alpha": reference.alpha,
                      "shapes": {n: list(s) for n, s in reference.shapes.items()},
                      "uplink_floats": reference.uplink_floats()},
        "methods": {},
    }
    t_run = time.perf_counter()
    for method in cfg.methods:
        ckpt = None if out is None else out / "checkpoints" / cfg.fingerprint() / method
        strategy = build_strategy(method, cfg, reference, checkpoint_dir=ckpt, save_updates=cfg.save_updates)
        t0 = time.perf_counter()
        strategy.start(grid, num_rounds=cfg.num_rounds, timeout=cfg.round_timeout)
        results["methods"][method] = {"history": strategy.history, "seconds": time.perf_counter() - t0,
                                      "personalised": strategy.personalised}
        results["seconds"] = time.perf_counter() - t_run
        if out is not None:
            _write_json(out / RESULTS_FILE, results)
    return results


def make_server_app(config: FlowerRunConfig | None = None, *, engine: str = "deployment") -> ServerApp:
    """A ServerApp running :func:`run_server`.

    Args:
        config: the run's settings when the app object is handed to the simulation engine
            directly; keys of the run config (``context.run_config``) override it.
        engine: label recorded in the results.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, FlowerRunConfig.from_run_config(context.run_config, base=config), engine=engine)

    return app


server_app = make_server_app()
"""The ServerApp a deployment runs (``fedlora_lite.flower.server:server_app``), configured by the run config."""
