"""A small, seeded training loop for copy-task sequences (full model or LoRA only).

:func:`train_on_pairs` optimises whichever parameters have ``requires_grad`` — all of
them for base pretraining, only the LoRA factors for a peft-wrapped model — with AdamW,
optional cosine decay and gradient clipping. Data is either a fixed list of
``(source, target)`` pairs (sampled in seeded epochs of random permutations, the
data-scarce client setting) or a callable that draws a fresh batch (pretraining on an
endless stream of random strings). On CUDA the forward pass runs under bf16 autocast
(``autocast="auto"``); on CPU everything stays fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ...core.validation import check_positive
from .tokenizer import CharTokenizer
from .sequences import collate, sequence_loss

__all__ = ["TrainConfig", "TrainHistory", "train_on_pairs"]

PairSampler = Callable[[int, torch.Generator], Sequence[tuple[str, str]]]


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: optimiser steps.
        batch_size: pairs per step (capped at the dataset size for a fixed list).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        schedule: ``"constant"`` or ``"cosine"`` (decay to 10% of ``lr`` after warm-up).
        grad_clip: max global gradient norm (``None`` disables clipping).
        autocast: ``"auto"`` (bf16 on CUDA only), ``True`` or ``False``.
    """

    steps: int = 100
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float | None = 1.0
    autocast: bool | str = "auto"

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"TrainConfig.{f} must be a positive int, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be a non-negative int, got {self.warmup_steps!r}")
        check_positive(self.lr, "TrainConfig.lr")
        check_positive(self.weight_decay, "TrainConfig.weight_decay", allow_zero=True)
        if self.grad_clip is not None:
            check_positive(self.grad_clip, "TrainConfig.grad_clip")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"TrainConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.autocast not in ("auto", True, False):
            raise ValueError(f"TrainConfig.autocast must be 'auto', True or False, got {self.autocast!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate used at optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(self.steps - self.warmup_steps, 1)
        frac = (step - self.warmup_steps) / span
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class TrainHistory:
    """Per-step training losses (mean cross-entropy on target tokens)."""

    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean of the last 10% of the losses (less noisy than the last one)."""
        if not self.losses:
            return float("nan")
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def _batches_from_list(pairs: Sequence[tuple[str, str]], batch_size: int, generator: torch.Generator):
    n = len(pairs)
    bs = min(batch_size, n)
    order: list[int] = []
    while True:
        if len(order) < bs:
            order += torch.randperm(n, generator=generator).tolist()
        idx, order = order[:bs], order[bs:]
        yield [pairs[i] for i in idx]


def train_on_pairs(
    model: torch.nn.Module,
    tokenizer: CharTokenizer,
    data: Sequence[tuple[str, str]] | PairSampler,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "train",
) -> TrainHistory:
    """Train ``model`` in place on copy-task pairs and return the loss history.

    Args:
        model: causal LM (plain or peft); its trainable parameters are optimised on the
            device they live on.
        tokenizer: the character tokenizer.
        data: a non-empty list of ``(source, target)`` pairs, or a callable
            ``sample(batch_size, generator) -> pairs`` for streamed data.
        cfg: optimisation settings.
        generator: CPU ``torch.Generator`` driving batch order / sampling (reproducibility).
        progress: show a tqdm bar.
        desc: tqdm label.

    Returns:
        :class:`TrainHistory`. The model is left in eval mode.

    Raises:
        ValueError: empty data, no trainable parameters, or a non-finite loss.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=False everywhere)")
    if callable(data):
        sampler = data

        def batches():
            while True:
                yield sampler(cfg.batch_size, generator)

        stream = batches()
    else:
        if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
            raise TypeError(f"data must be a sequence of (source, target) pairs or a callable, got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError("data is empty: cannot fine-tune on a client with no examples")
        stream = _batches_from_list(data, cfg.batch_size, generator)
    device = params[0].device
    use_autocast = device.type == "cuda" if cfg.autocast == "auto" else bool(cfg.autocast)
    n_pos = int(getattr(getattr(model, "config", None), "n_positions", 0)) or None
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = TrainHistory()
    steps = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, leave=False)
    model.train()
    for step in steps:
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        batch = collate(tokenizer, next(stream), max_length=n_pos, device=device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = sequence_loss(model, batch)
        if not torch.isfinite(loss):
            model.eval()
            raise ValueError(f"non-finite training loss at step {step}; lower TrainConfig.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        history.losses.append(float(loss.detach()))
    model.eval()
    return history
