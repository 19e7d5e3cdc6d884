"""LoRA factors and adapters as plain torch data (no model, no peft needed to use them).

LoRA replaces a frozen weight ``W`` by ``W + s·B·A`` with ``A ∈ R^{r×in}``,
``B ∈ R^{out×r}`` and scaling ``s = alpha / r``. :class:`LoraFactors` holds one module's
factors, :class:`LoraAdapter` a whole adapter; both give the exact update ΔW in either
orientation (see :mod:`fedlora_lite.lora.peft_bridge` for the Conv1D pitfall).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.validation import check_choice, check_positive

__all__ = ["LoraFactors", "LoraAdapter", "stack_deltas"]

_ORIENTATIONS = ("base", "out_in")
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraFactors:
    """One module's LoRA factors.

    Attributes:
        A: (r, in_features).
        B: (out_features, r).
        scaling: ``alpha / r``.
        fan_in_fan_out: True if the base weight is stored (in, out) (GPT-2 ``Conv1D``).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        # the scaling multiplies every update built from these factors: NaN, 0 or a negative
        # value would pass silently into ΔW and into CLAIR's factored path
        self.scaling = check_positive(self.scaling, "LoraFactors.scaling")
        if not isinstance(self.fan_in_fan_out, (bool, np.bool_)):
            raise TypeError(f"LoraFactors.fan_in_fan_out must be a bool, got {type(self.fan_in_fan_out).__name__}")
        self.fan_in_fan_out = bool(self.fan_in_fan_out)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def delta(self, orientation: str = "base", dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW = scaling·B·A: (out, in), transposed to (in, out) for a Conv1D base if ``orientation="base"``."""
        check_choice(orientation, "orientation", _ORIENTATIONS)
        A, B = (self.A, self.B) if dtype is None else (self.A.to(dtype), self.B.to(dtype))
        d = (B @ A) * self.scaling
        return d.T if (orientation == "base" and self.fan_in_fan_out) else d


@dataclass
class LoraAdapter:
    """A model-free LoRA adapter: factors per module plus the peft hyperparameters.

    Attributes:
        factors: module name -> :class:`LoraFactors` (all of rank ``r``).
        r: LoRA rank.
        alpha: LoRA alpha (``scaling = alpha / r``).
    """

    factors: dict[str, LoraFactors]
    r: int
    alpha: float

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.factors))

    def deltas(self, orientation: str = "base", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Module name -> ΔW (see :meth:`LoraFactors.delta`)."""
        return {n: f.delta(orientation, dtype) for n, f in sorted(self.factors.items())}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """peft-format keys ``base_model.model.<name>.lora_{A,B}.weight`` -> contiguous CPU tensors."""
        out = {}
        for n, f in sorted(self.factors.items()):
            out[f"{_PEFT_PREFIX}{n}.lora_A.weight"] = f.A.detach().cpu().contiguous()
            out[f"{_PEFT_PREFIX}{n}.lora_B.weight"] = f.B.detach().cpu().contiguous()
        return out

    def lora_config(self):
        """A peft :class:`LoraConfig` targeting exactly these modules (full names)."""
        from peft import LoraConfig

        fifo = {f.fan_in_fan_out for f in self.factors.values()}
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, target_modules=list(self.module_names), lora_dropout=0.0,
            fan_in_fan_out=fifo == {True}, bias="none",
        )



def stack_deltas(adapters: Sequence[LoraAdapter], *, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Module name -> (K, out, in) exact updates ΔW = (alpha / r) B A of K adapters (nn.Linear orientation)."""
    if not adapters:
        raise ValueError("adapters is empty")
    names = adapters[0].module_names
    return {n: torch.stack([a.factors[n].delta("out_in", dtype) for a in adapters]) for n in names}
