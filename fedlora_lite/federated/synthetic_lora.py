"""Random LoRA federations: K factor pairs with a shared column subspace and contaminated clients.

Used by the factored-CLAIR tests, notebook 07 and the benchmarks (LLM-shaped modules).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.reduction import Pair
from ..core.runtime import resolve_device
from ..core.validation import check_fraction

__all__ = ["SyntheticLora", "random_lora_factors"]


@dataclass
class SyntheticLora:
    """A random LoRA federation: ``factors`` (K pairs), the true ``benign`` mask and shared ``U``."""

    factors: list[Pair]
    benign: torch.Tensor
    U: torch.Tensor


def random_lora_factors(
    d: int,
    p: int,
    num_clients: int,
    rank: int | Sequence[int],
    *,
    shared_rank: int = 4,
    contamination: float = 0.2,
    heterogeneity: float = 0.0,
    contaminated: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SyntheticLora:
    """Random LoRA factors with a shared column subspace and contaminated clients.

    Benign k: ``B_k = U C_k + heterogeneity * sqrt(shared_rank / d) E_k`` with U (d x
    shared_rank) orthonormal, C_k and E_k standard Gaussian; contaminated k: B_k Gaussian
    with entries of variance shared_rank / d (another, random subspace; the same expected
    norm). A_k: Gaussian / sqrt(p). The first ``round(contamination * K)`` clients of a
    random permutation are contaminated.

    Args:
        d, p: update shape; num_clients: K; rank: r_k (int or K ints).
        shared_rank: dimension of the shared subspace (<= min r_k).
        contamination: fraction of contaminated clients in [0, 1).
        heterogeneity: relative size of the benign clients' off-subspace part.
        contaminated: explicit contaminated client indices (overrides ``contamination``;
            e.g. the same clients in every module of a model).
        generator: torch CPU generator (default: seeded with 0).
        dtype, device: of the returned factors (sampling happens on the CPU in float64).

    Returns:
        A :class:`SyntheticLora`.
    """
    device = resolve_device(device)  # a clear error before any drawing
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    ranks = [int(rank)] * num_clients if isinstance(rank, int) else [int(r) for r in rank]
    if len(ranks) != num_clients or min(ranks) < shared_rank or shared_rank < 1:
        raise ValueError(f"rank must be an int or {num_clients} ints, each >= shared_rank={shared_rank}")
    check_fraction(contamination, "contamination")
    kw = {"generator": g, "dtype": torch.float64}
    U, _ = torch.linalg.qr(torch.randn(d, shared_rank, **kw))
    bad = set(torch.randperm(num_clients, generator=g)[: round(contamination * num_clients)].tolist())
    if contaminated is not None:
        bad = {int(k) for k in contaminated}
        if not all(0 <= k < num_clients for k in bad):
            raise ValueError(f"contaminated must hold client indices in [0, {num_clients}), got {sorted(bad)}")
    scale = math.sqrt(shared_rank / d)
    pairs = []
    for k, r in enumerate(ranks):
        if k in bad:
            B = scale * torch.randn(d, r, **kw)
        else:
            B = U @ torch.randn(shared_rank, r, **kw) + heterogeneity * scale * torch.randn(d, r, **kw)
        A = torch.randn(r, p, **kw) / math.sqrt(p)
        pairs.append((B.to(device=device, dtype=dtype), A.to(device=device, dtype=dtype)))
    benign = torch.tensor([k not in bad for k in range(num_clients)], device=device)
    return SyntheticLora(pairs, benign, U.to(device=device, dtype=dtype))
