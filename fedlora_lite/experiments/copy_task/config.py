"""Configuration of the copy-task experiment: local LoRA training, CLAIR, sizes, seeds, methods."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ...clair.config import ClairConfig
from ...core.validation import check_choice, check_fraction
from .tasks import CopyTaskConfig
from .training import TrainConfig

__all__ = ["BASELINES", "LocalTrainingConfig", "ExperimentConfig"]

BASELINES: tuple[str, ...] = ("local", "fedavg", "oracle_fedavg", "median", "trimmed_mean", "geometric_median", "krum",
                               "multi_krum", "svd_refine")
"""Baselines run on the same local adapters as CLAIR (see :mod:`~fedlora_lite.experiments.copy_task.methods`)."""


def _default_task() -> CopyTaskConfig:
    return CopyTaskConfig(num_clients=10, contamination=0.3, letters="abcdefghijklmnop", num_shared=6, focus_size=6,
                          focus_mass=0.2, train_size=(2, 5), eval_size=48, val_size=4, length=(8, 16))


@dataclass(frozen=True)
class LocalTrainingConfig:
    """How every client fine-tunes its LoRA adapter locally.

    Attributes:
        target_modules: module-name suffixes to adapt (see :func:`fedlora_lite.lora.attach_lora`).
            Default: the MLP output projections of both blocks. A letter substitution is a
            per-token lookup-table edit, the kind of map an MLP stores; on this base,
            adapters there learn it from a few examples and average cleanly across
            clients (adapting the attention projections too adds client-specific noise).
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling alpha / r).
        steps: optimiser steps (full batch when the client has <= batch_size pairs).
        batch_size: pairs per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        init_seed: seed of the common adapter initialisation (offset by the run seed).
    """

    target_modules: tuple[str, ...] = ("mlp.c_proj",)
    rank: int = 4
    alpha: float = 8.0
    steps: int = 30
    batch_size: int = 16
    lr: float = 1e-2
    weight_decay: float = 0.0
    init_seed: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError("target_modules must be a non-empty tuple of module-name suffixes")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           grad_clip=1.0)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything :func:`run_copy_experiment` needs.

    Attributes:
        task: the federated copy task; ``task.num_clients`` is K and ``task.contamination``
            the headline contamination fraction (always part of the sweep).
        local: local LoRA fine-tuning settings.
        clair: CLAIR's options (:class:`~fedlora_lite.clair.ClairConfig`; default: the library's
            defaults, no hand-set knob). ``side="column"`` shares the *output* directions of
            ΔW (the span of the B factors): every client starts from the same A, so input
            directions are shared by construction.
        seeds: one pool of clients (and one local training) per seed.
        sweep: contamination fractions evaluated on every seed's pool.
        methods: names from :data:`~fedlora_lite.experiments.copy_task.methods.METHODS`.
        tuned: methods with a knob send each client up to
            :data:`~fedlora_lite.experiments.copy_task.methods.TUNING_BUDGET` candidates and the
            client keeps the best on its validation pairs (``task.val_size`` must be > 0);
            False: the first setting only (and CLAIR's shrinkage weights).
        exact_match_size: held-out pairs per benign client decoded greedily (headline
            fraction and ``exact_match_methods`` only; 0 disables).
        exact_match_methods: methods whose exact match is measured.
        sweep_methods: methods evaluated at the sweep's other fractions (None: all ``methods``;
            fewer keeps a long sweep cheap).
        refactor_rank: also score CLAIR's refined updates re-factorised into adapters of
            this rank (headline fraction only; None disables).
        base_dir: checkpoint directory of the base; None = the shipped ``data/base_copy``.
        pretrain: if given, a :class:`fedlora_lite.experiments.copy_task.pretrain.PretrainConfig`: the base is
            pretrained with it (cached under ``output_dir/base``) instead of loaded.
        device: "auto", "cpu", "cuda", ...
        output_dir: cache root (local adapters, pretrained base); None disables caching.
        on_invalid: "exclude" (drop invalid clients, record why) or "raise".
        progress: tqdm bars.
    """

    task: CopyTaskConfig = field(default_factory=_default_task)
    local: LocalTrainingConfig = field(default_factory=LocalTrainingConfig)
    clair: ClairConfig = field(default_factory=ClairConfig)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sweep: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    methods: tuple[str, ...] = BASELINES + ("detect_average", "clair_paper", "clair_shrinkage", "clair")
    tuned: bool = True
    exact_match_size: int = 8
    exact_match_methods: tuple[str, ...] = ("local", "oracle_fedavg", "median", "detect_average", "clair")
    sweep_methods: tuple[str, ...] | None = None
    refactor_rank: int | None = 4
    base_dir: str | None = None
    pretrain: Any = None
    device: str = "auto"
    output_dir: str | None = None
    on_invalid: str = "exclude"
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.task, CopyTaskConfig):
            raise TypeError(f"task must be a CopyTaskConfig, got {type(self.task).__name__}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty tuple of non-negative ints, got {self.seeds!r}")
        object.__setattr__(self, "seeds", tuple(self.seeds))
        sweep = sorted({float(check_fraction(f, "sweep")) for f in self.sweep} | {float(self.task.contamination)})
        object.__setattr__(self, "sweep", tuple(sweep))
        from .methods import METHODS

        if isinstance(self.methods, str) or not self.methods or any(m not in METHODS for m in self.methods):
            raise ValueError(f"methods must be names from {list(METHODS)}, got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        if self.sweep_methods is not None:
            if isinstance(self.sweep_methods, str) or any(m not in self.methods for m in self.sweep_methods):
                raise ValueError(f"sweep_methods must be a subset of methods {list(self.methods)}, got {self.sweep_methods!r}")
            object.__setattr__(self, "sweep_methods", tuple(dict.fromkeys(self.sweep_methods)))
        if not isinstance(self.clair, ClairConfig):
            raise TypeError(f"clair must be a ClairConfig, got {type(self.clair).__name__}")
        if self.tuned and self.task.val_size == 0:
            raise ValueError("tuned=True needs validation pairs: set task.val_size > 0 (or tuned=False)")
        check_choice(self.on_invalid, "on_invalid", ("exclude", "raise"))
        if isinstance(self.exact_match_size, bool) or not isinstance(self.exact_match_size, int) or self.exact_match_size < 0:
            raise ValueError(f"exact_match_size must be a non-negative int, got {self.exact_match_size!r}")

    def pool_sizes(self) -> tuple[int, int]:
        """(benign, contaminated) clients needed so every sweep fraction can be formed."""
        n_cont = [_num_contaminated(f, self.task.num_clients) for f in self.sweep]
        return self.task.num_clients - min(n_cont), max(n_cont)


def _num_contaminated(fraction: float, K: int) -> int:
    return min(int(math.floor(fraction * K + 0.5)), K - 1)


