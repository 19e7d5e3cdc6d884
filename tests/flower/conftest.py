"""Tiny Flower runs for the tests: few nodes, few local steps, small held-out sets."""

from __future__ import annotations

import os
from pathlib import Path

from fedlora_lite.experiments.copy_task import ExperimentConfig
from fedlora_lite.flower import FlowerRunConfig
from fedlora_lite.flower.equivalence import compare_round_one, read_round_updates

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

# the copy-task experiment's hand-set CLAIR options: tests pin them so they do not move with the library defaults
CLAIR = ExperimentConfig().clair


def tiny_config(output_dir: Path | str | None, *, nodes: int = 6, contamination: float = 0.34, rounds: int = 2,
                **changes) -> FlowerRunConfig:
    """K nodes (the last round(contamination K) contaminated), 8 local steps, 16 held-out pairs per node."""
    base = FlowerRunConfig()
    task = base.task.__class__(**{**base.task.to_dict(), "num_clients": nodes, "contamination": contamination,
                                  "eval_size": 16, "kinds": ("corrupted", "conflicting"), "train_size": (2, 5),
                                  "length": (8, 16), "word_length": (2, 6)})
    local = base.local.__class__(steps=8)
    kw = {"task": task, "local": local, "num_rounds": rounds, "clair": CLAIR, "resume": False,
          "output_dir": None if output_dir is None else str(output_dir), **changes}
    return FlowerRunConfig(**kw)


def checkpoint_dir(cfg: FlowerRunConfig, method: str) -> Path:
    return Path(cfg.output_dir) / "checkpoints" / cfg.fingerprint() / method


def saved_round(directory: Path, server_round: int = 1):
    """(partitions, refined ΔW per module) written by a strategy with save_updates=True."""
    parts, t = read_round_updates(directory / f"round_{server_round:03d}_updates.safetensors")
    kind = "model/" if any(k.startswith("model/") for k in t) else "estimate/"  # CLAIR on models or on updates
    return parts, {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith(kind)}


def assert_round_one_equivalent(cfg: FlowerRunConfig, result, method: str = "clair", atol: float = 1e-6):
    """Round 1 of a Flower run = the in-process computation: same uploads, same flags, refined updates to ``atol``."""
    cmp = compare_round_one(cfg, result, method)
    assert cmp.partitions == result.history(method)[1]["participants"]
    assert cmp.same_flags, (cmp.flags_flower, cmp.flags_in_process)
    assert cmp.equal(atol), (cmp.upload_max_abs_diff, cmp.refined_max_abs_diff)
    return cmp
