"""Tiny Flower runs for the tests: few nodes, few local steps, small held-out sets."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedlora_lite.clair import ClairConfig, clair_modules
from fedlora_lite.experiments.copy_task import ExperimentConfig, load_base, train_local_adapters
from fedlora_lite.flower import FlowerRunConfig
from fedlora_lite.flower.client import node_pool

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


def in_process_round_one(cfg: FlowerRunConfig, clair_config: ClairConfig, partitions: list[int] | None = None):
    """The in-process computation of round 1 (one torch thread, like a node).

    ``train_local_adapters`` on the run's client pool, then ``clair_modules`` on the adapters
    of ``partitions`` (default: all; pass the round's participants when some were excluded).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(cfg.threads, 1))
    try:
        base, tok, _ = load_base(cfg.base_dir, "cpu")
        local = train_local_adapters(base, tok, node_pool(cfg).clients, cfg.local, seed=cfg.seed)
    finally:
        torch.set_num_threads(before)
    adapters = [local.adapters[p] for p in (partitions if partitions is not None else range(cfg.num_nodes))]
    res = clair_modules({n: [a.factors[n] for a in adapters] for n in adapters[0].module_names}, clair_config)
    return adapters, res


def saved_round(checkpoint_dir: Path, server_round: int = 1):
    """(partitions, uploaded adapters, estimates) written by a strategy with save_updates=True."""
    from safetensors import safe_open

    path = checkpoint_dir / f"round_{server_round:03d}_updates.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        parts = [int(p) for p in fh.metadata()["partitions"].split(",")]
    t = load_file(str(path))
    adapters = []
    for p in parts:
        names = sorted({k.split("/", 2)[2].removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                        for k in t if k.startswith(f"upload/{p}/")})
        adapters.append({n: (t[f"upload/{p}/base_model.model.{n}.lora_A.weight"],
                             t[f"upload/{p}/base_model.model.{n}.lora_B.weight"]) for n in names})
    kind = "model/" if any(k.startswith("model/") for k in t) else "estimate/"  # CLAIR on models or on updates
    estimates = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith(kind)}
    return parts, adapters, estimates


def checkpoint_dir(cfg: FlowerRunConfig, method: str) -> Path:
    return Path(cfg.output_dir) / "checkpoints" / cfg.fingerprint() / method


def assert_round_one_equivalent(cfg: FlowerRunConfig, result, method: str = "clair", atol: float = 1e-6) -> dict:
    """Round 1 of a Flower run = the in-process computation: same uploads, same flags, refined updates to ``atol``."""
    parts, uploads, estimates = saved_round(checkpoint_dir(cfg, method))
    assert parts == result.history(method)[1]["participants"]
    ref_adapters, ref = in_process_round_one(cfg, cfg.clair, parts)
    up_err = max(float((uploads[k][n][i] - getattr(ref_adapters[k].factors[n], ab).float()).abs().max())
                 for k in range(len(parts)) for n in uploads[k] for i, ab in ((0, "A"), (1, "B")))
    hist = result.history(method)[1]
    flags = [p in hist["flagged"] for p in parts]
    assert flags == ref.flags.tolist(), (flags, ref.flags.tolist())
    est_err = max(float((estimates[n].double() - r.dense_refined().double()).abs().max()) for n, r in ref.iter_refined())
    assert up_err <= atol and est_err <= atol, (up_err, est_err)
    return {"upload_max_abs_diff": up_err, "refined_max_abs_diff": est_err, "flags": flags}


__all__ = ["tiny_config", "in_process_round_one", "saved_round", "checkpoint_dir", "assert_round_one_equivalent"]
