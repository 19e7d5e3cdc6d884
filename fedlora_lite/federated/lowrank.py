"""Dense updates as LoRA factors: best rank-r factors, rank-r truncation, a checked factoring of a whole stack.

In a LoRA federation every client, byzantine or not, sends a pair (B_k, A_k) of rank at
most r, so an attack computed on dense updates must be cut to rank r before it can be
sent (:func:`truncate_updates`), and an aggregator with a factored path (CLAIR) can take
the exact factors of rank-r dense updates (:func:`factor_updates`). The factoring is the
truncated SVD (Eckart-Young), with the singular values split evenly between B and A, as
:func:`fedlora_lite.lora.factorize_delta` does for adapters (that one carries the peft
orientation and scaling conventions and lives in ``lora``, which this layer does not import).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.validation import check_fraction

__all__ = ["best_rank_factors", "factor_updates", "truncate_updates"]


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    return rank


def best_rank_factors(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of one (d, p) matrix.

    Returns:
        ``(B (d, k), A (k, p), tail)`` with k = min(rank, d, p), ``B @ A`` the best rank-k
        approximation of M and ``tail`` the discarded singular values (descending).
    """
    rank = _check_rank(rank)
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    root = s[:rank].sqrt()
    return U[:, :rank] * root, root.unsqueeze(1) * Vh[:rank], s[rank:]


def truncate_updates(X: torch.Tensor, rank: int) -> torch.Tensor:
    """(K, d, p) updates, each replaced by its best rank-``rank`` approximation."""
    return torch.stack([B @ A for B, A, _ in (best_rank_factors(x, rank) for x in X)])


def factor_updates(updates: torch.Tensor | Mapping[str, torch.Tensor], rank: int, *, rtol: float = 1e-6,
                   ) -> list[tuple[torch.Tensor, torch.Tensor]] | dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The exact rank-``rank`` LoRA factors (B_k, A_k) of updates that have rank <= ``rank``.

    Args:
        updates: (K, d, p) updates, or module -> (K, d_m, p_m).
        rank: the LoRA rank r.
        rtol: an update whose discarded singular values exceed ``rtol`` times its largest
            one is not rank r: a ValueError (instead of silently handing an aggregator a
            different update than the others see).

    Returns:
        K pairs, or module -> K pairs; ``B_k @ A_k`` equals update k to ``rtol``.
    """
    rank = _check_rank(rank)
    rtol = check_fraction(rtol, "rtol")
    if isinstance(updates, torch.Tensor):
        pairs = []
        for k, M in enumerate(updates):
            B, A, tail = best_rank_factors(M, rank)
            top = float(B[:, 0].square().sum())  # ||B[:, 0]||^2 = the largest singular value
            if tail.numel() and float(tail[0]) > rtol * top:
                raise ValueError(f"update {k} has rank > {rank} (singular value {rank + 1} is {float(tail[0]) / top:.2e} "
                                 f"of the largest, above rtol={rtol}); truncate it first (truncate_updates)")
            pairs.append((B, A))
        return pairs
    out = {}
    for name, M in updates.items():
        try:
            out[name] = factor_updates(M, rank, rtol=rtol)
        except ValueError as exc:
            raise ValueError(f"module {name!r}: {exc}") from exc
    return out
