"""From dense updates back to LoRA factors: truncated SVD re-factorisation of ΔW.

A refined or aggregated update is a dense ΔW (or a wide product); to send it as an
adapter again it is re-factorised to rank r by a truncated SVD (Eckart-Young: the best
rank-r approximation), with the orientation conventions of :mod:`fedlora_lite.lora.factors`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.validation import check_choice, check_positive
from .factors import _ORIENTATIONS, LoraAdapter, LoraFactors

__all__ = ["factorize_delta", "deltas_to_lora_state"]


def factorize_delta(
    delta: torch.Tensor,
    rank: int,
    *,
    scaling: float = 1.0,
    fan_in_fan_out: bool = False,
    orientation: str = "base",
) -> tuple[LoraFactors, torch.Tensor]:
    """Best rank-``rank`` LoRA factors of one update (truncated SVD, Eckart–Young).

    With ΔW (out, in) = U Σ Vᵀ, ``B = U_r Σ_r^{1/2} / √s`` and ``A = Σ_r^{1/2} V_rᵀ / √s``,
    so ``s·B·A`` is the rank-r truncation and the singular values are split evenly
    between the factors.

    Args:
        delta: ΔW in ``orientation`` (see module docstring).
        rank: target rank r (``<= min(out, in)``).
        scaling: the adapter's ``alpha / r``.
        fan_in_fan_out: the base weight is Conv1D-style (in, out).
        orientation: layout of ``delta``.

    Returns:
        ``(factors, tail)`` — the factors (dtype of ``delta``) and the discarded singular
        values σ_{r+1}, ... (so the spectral error is ``tail[0]`` and the Frobenius
        error is ``tail.norm()``).
    """
    check_choice(orientation, "orientation", _ORIENTATIONS)
    if not isinstance(delta, torch.Tensor) or delta.ndim != 2:
        raise ValueError(f"delta must be a 2-D tensor, got {type(delta).__name__} {getattr(delta, 'shape', '')}")
    s = check_positive(scaling, "scaling")
    W = delta.T if (orientation == "base" and fan_in_fan_out) else delta
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank must be an int in [1, {min(W.shape)}] for a {tuple(W.shape)} update, got {rank!r}")
    U, S, Vh = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
    root = (S[:rank] / s).sqrt()
    B = (U[:, :rank] * root).to(delta.dtype)
    A = (root[:, None] * Vh[:rank]).to(delta.dtype)
    return LoraFactors(A=A.contiguous(), B=B.contiguous(), scaling=s, fan_in_fan_out=fan_in_fan_out), S[rank:].to(delta.dtype)


def deltas_to_lora_state(
    deltas: Mapping[str, torch.Tensor],
    rank: int,
    *,
    alpha: float | None = None,
    fan_in_fan_out: bool | Mapping[str, bool] = False,
    orientation: str = "base",
) -> LoraAdapter:
    """Re-factorise refined updates into a rank-``rank`` adapter by truncated SVD.

    Args:
        deltas: module name -> ΔW.
        rank: rank r of the new adapter.
        alpha: LoRA alpha of the new adapter (default ``2 * rank``, i.e. scaling 2).
        fan_in_fan_out: per module (mapping) or for all: is the base weight Conv1D-style?
            Get it from a reference model with ``{n: f.fan_in_fan_out for n, f in
            lora_factors(pm).items()}``; it matters only for ``orientation="base"``.
        orientation: layout of ``deltas``.

    Returns:
        :class:`LoraAdapter`; ``adapter.state_dict()`` has peft's key naming, and
        :func:`~fedlora_lite.lora.adapter_io.load_lora_factors` and
        :func:`~fedlora_lite.lora.adapter_io.save_adapter` consume it directly.
    """
    if not isinstance(deltas, Mapping) or not deltas:
        raise ValueError("deltas must be a non-empty mapping module name -> tensor")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    alpha = float(2 * rank if alpha is None else check_positive(alpha, "alpha"))
    if isinstance(fan_in_fan_out, Mapping) and set(deltas) - set(fan_in_fan_out):
        raise ValueError(f"fan_in_fan_out has no entry for modules {sorted(set(deltas) - set(fan_in_fan_out))}")
    factors = {}
    for n, d in sorted(deltas.items()):
        fifo = bool(fan_in_fan_out[n]) if isinstance(fan_in_fan_out, Mapping) else bool(fan_in_fan_out)
        if not torch.isfinite(torch.as_tensor(d)).all():
            raise ValueError(f"delta for {n!r} contains NaN or Inf")
        factors[n], _ = factorize_delta(d, rank, scaling=alpha / rank, fan_in_fan_out=fifo, orientation=orientation)
    return LoraAdapter(factors, int(rank), alpha)

