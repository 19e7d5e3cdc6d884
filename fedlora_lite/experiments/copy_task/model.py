"""A small GPT-2-style decoder built in code from a config (no hub downloads, ever).

Nothing here touches the Hugging Face hub: the tokenizer is a fixed character table and
the model is a :class:`transformers.GPT2LMHeadModel` constructed from a
:class:`transformers.GPT2Config` that :class:`ModelConfig` fills in. The tokenizer is
:mod:`~fedlora_lite.experiments.copy_task.tokenizer`, a saved base
:mod:`~fedlora_lite.experiments.copy_task.checkpoint`.

Sequence format of the copy tasks (shared with :mod:`~fedlora_lite.experiments.copy_task.sequences`
and :mod:`~fedlora_lite.experiments.copy_task.tasks`). The source sits in a field of fixed width
``W = tokenizer.source_width`` (24 by default), padded with ``<pad>``::

    [BOS] s_1 ... s_m <pad> ... <pad> [SEP] t_1 ... t_n [EOS]      (m <= W)
    |<------------- W + 2 positions ------->|

so target character j always sits exactly ``W + 1`` positions after source character j,
whatever the source length. With learned absolute position embeddings this makes copying
a fixed-offset lookup that a 2-layer model learns in a few hundred steps (with a
variable-length source it needs thousands). The loss and teacher-forced accuracy use
only ``t_1 .. t_n, EOS``; a target fits when ``n <= n_positions - W - 3``
(:func:`max_target_length`). ``source_width=None`` selects the plain variable-length
format ``[BOS] source [SEP] target [EOS]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ...core.runtime import resolve_device
from .tokenizer import CharTokenizer

__all__ = ["ModelConfig", "build_model", "count_parameters", "max_target_length"]


@dataclass
class ModelConfig:
    """Size of the GPT-2-style decoder (defaults: the ≈0.4M-parameter CPU model).

    Attributes:
        n_layer: transformer blocks.
        n_embd: model width.
        n_head: attention heads (must divide ``n_embd``).
        n_positions: maximum sequence length (BOS + source + SEP + target + EOS).
        dropout: residual/embedding/attention dropout (0 keeps LoRA deltas deterministic).
    """

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_embd", "n_head", "n_positions"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelConfig.n_head={self.n_head} must divide n_embd={self.n_embd}")
        if self.n_positions < 5:
            raise ValueError(f"ModelConfig.n_positions must be >= 5 to hold BOS a SEP b EOS, got {self.n_positions}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"ModelConfig.dropout must lie in [0, 1), got {self.dropout!r}")

    def to_gpt2_config(self, tokenizer: CharTokenizer) -> GPT2Config:
        """The equivalent :class:`transformers.GPT2Config` for ``tokenizer``'s vocabulary."""
        return GPT2Config(
            vocab_size=tokenizer.vocab_size,
            n_positions=self.n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            resid_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            attn_pdrop=self.dropout,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            tie_word_embeddings=True,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**data)


def max_target_length(cfg: ModelConfig, tokenizer: CharTokenizer) -> int:
    """Longest target (in characters) that fits after a full source field.

    Fixed-width format: ``n_positions - source_width - 3``; variable format: the longest
    ``n`` with ``n + n + 3 <= n_positions`` (equal-length source and target).
    """
    if tokenizer.source_width is None:
        return (cfg.n_positions - 3) // 2
    return cfg.n_positions - tokenizer.source_width - 3


def build_model(
    cfg: ModelConfig,
    tokenizer: CharTokenizer,
    *,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
) -> GPT2LMHeadModel:
    """Build a freshly initialised :class:`GPT2LMHeadModel` (no download).

    Args:
        cfg: model size.
        tokenizer: fixes ``vocab_size`` and the special token ids.
        seed: seeds the weight initialisation without touching the global RNG state
            (``None`` uses the current global state).
        device: where to put the model.

    Returns:
        The model in eval mode; embeddings and LM head are tied. GPT-2's attention and MLP
        projections (``c_attn``, ``c_proj``, ``c_fc``) are ``transformers`` ``Conv1D``
        layers whose weight has shape (in_features, out_features) — transposed relative to
        ``nn.Linear``.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(tokenizer, CharTokenizer):
        raise TypeError(f"tokenizer must be a CharTokenizer, got {type(tokenizer).__name__}")
    if tokenizer.source_width is not None and tokenizer.source_width + 4 > cfg.n_positions:
        raise ValueError(
            f"tokenizer.source_width={tokenizer.source_width} leaves no room for a target in n_positions={cfg.n_positions}"
        )
    gcfg = cfg.to_gpt2_config(tokenizer)
    if seed is None:
        model = GPT2LMHeadModel(gcfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = GPT2LMHeadModel(gcfg)
    # transformers infers the loss from the class name; "GPT2LMHeadModel" maps to nothing and
    # triggers a warning on first use. It is a causal LM loss: say so explicitly.
    model.loss_type = "ForCausalLM"
    return model.to(resolve_device(device)).eval()


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


