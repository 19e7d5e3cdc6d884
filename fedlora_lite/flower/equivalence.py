"""Does a Flower run compute what the in-process experiment computes? Round 1, checked number by number.

In round 1 every node starts from the base, so a Flower run's first aggregation is exactly
the one-shot in-process computation: :func:`~fedlora_lite.experiments.copy_task.train_local_adapters`
on the same client pool and seeds, then :func:`~fedlora_lite.clair.clair_modules` on the
resulting adapters. :func:`compare_round_one` redoes both in this process (one torch
thread, as a node uses) and compares them with what the run's strategy received and
produced (written with ``save_updates=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..clair.api import clair_modules
from ..experiments.copy_task.checkpoint import load_base
from ..experiments.copy_task.local import train_local_adapters
from .client import node_pool
from .config import FlowerRunConfig
from .results import FlowerResult
from .strategies import method_clair_config

__all__ = ["RoundOneComparison", "compare_round_one", "read_round_updates"]


@dataclass
class RoundOneComparison:
    """Round 1 of a Flower run against the in-process computation.

    Attributes:
        partitions: the round's participants.
        upload_max_abs_diff: largest |difference| between an uploaded LoRA factor and the
            in-process adapter of the same client.
        refined_max_abs_diff: largest |difference| between the strategy's refined ΔW and
            ``clair_modules`` called directly on the in-process adapters.
        flags_flower, flags_in_process: the contamination decisions (by participant).
    """

    partitions: list[int]
    upload_max_abs_diff: float
    refined_max_abs_diff: float
    flags_flower: list[bool]
    flags_in_process: list[bool]

    @property
    def same_flags(self) -> bool:
        return self.flags_flower == self.flags_in_process

    def equal(self, atol: float = 1e-6) -> bool:
        """Same flags, and uploads and refined updates equal to ``atol``."""
        return self.same_flags and self.upload_max_abs_diff <= atol and self.refined_max_abs_diff <= atol


def read_round_updates(path: str | Path) -> tuple[list[int], dict[str, torch.Tensor]]:
    """(partitions, tensors) of a ``round_NNN_updates.safetensors`` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        parts = [int(p) for p in fh.metadata()["partitions"].split(",")]
    return parts, load_file(str(path))


def compare_round_one(cfg: FlowerRunConfig, result: FlowerResult, method: str = "clair") -> RoundOneComparison:
    """Compare round 1 of ``method`` in ``result`` with the in-process computation.

    Args:
        cfg: the run's config (``save_updates=True``, an ``output_dir``, a CLAIR method).
        result: the run's results.
        method: ``clair`` or ``clair_paper``.

    Raises:
        FileNotFoundError: the run did not save its round-1 updates.
    """
    if cfg.output_dir is None:
        raise ValueError("cfg.output_dir is None: the run wrote nothing to compare")
    path = Path(cfg.output_dir) / "checkpoints" / cfg.fingerprint() / method / "round_001_updates.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run with save_updates=True")
    parts, saved = read_round_updates(path)
    clair_config = method_clair_config(method, cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(max(cfg.threads, 1))
    try:
        base, tok, _ = load_base(cfg.base_dir, "cpu")
        local = train_local_adapters(base, tok, node_pool(cfg).clients, cfg.local, seed=cfg.seed)
    finally:
        torch.set_num_threads(before)
    adapters = [local.adapters[p] for p in parts]
    up = max(float((saved[f"upload/{p}/{k}"] - v).abs().max()) for p, a in zip(parts, adapters)
             for k, v in a.state_dict().items())
    ref = clair_modules({n: [a.factors[n] for a in adapters] for n in adapters[0].module_names}, clair_config)
    kind = "model" if any(k.startswith("model/") for k in saved) else "estimate"
    refined = max(float((saved[f"{kind}/{n}"].double() - r.dense_refined().double()).abs().max())
                  for n, r in ref.iter_refined())
    flagged = result.history(method)[1].get("flagged") or []
    return RoundOneComparison(parts, up, refined, [p in flagged for p in parts], ref.flags.tolist())

