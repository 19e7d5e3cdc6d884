"""The exact LoRA-factored reduction: CLAIR's programs on K low-rank updates, at size sum r_k.

When client k sends LoRA factors, its update is M_k = B_k A_k (B_k: d x r_k, A_k: r_k x p,
ranks may differ). The dense programs of :mod:`fedlora_lite.core.decomposition` on the
d x Kp stack have an exact small equivalent (``docs/CLAIR.md``, "LoRA-native form"):

* one thin QR of the stacked B's, ``[B_1 ... B_K] = Q R_B`` (Q: d x q orthonormal,
  q = min(d, sum r_k)), so ``Q^T B_k`` is a column block of R_B at no extra cost;
* K thin QRs ``A_k^T = P_k R_k`` (P_k: p x t_k orthonormal, t_k = min(r_k, p));
* ``M_k = Q Mt_k P_k^T`` with the small block ``Mt_k = (Q^T B_k) R_k^T`` (q x t_k).

Why it is exact: X -> [Q X_1 P_1^T, ..., Q X_K P_K^T] is an isometry that preserves
the nuclear norm of the stack, its Frobenius norm and every block's Frobenius norm
(orthonormal factors on both sides). Projecting any dense pair (L, S) onto these
subspaces keeps L + S = M (M is already there) and cannot increase a nuclear or
Frobenius norm, so both programs (exact and noisy form) on ``Mt = [Mt_1 ... Mt_K]``
(q x sum t_k) have the same optimal value as on M, and a solution maps back by
``L_k = Q Lt_k P_k^T``, ``S_k = Q St_k P_k^T``. The solver's iterates (singular value
thresholding, block shrinkage) never leave these subspaces either, and
:func:`~fedlora_lite.core.decomposition.default_lambda` uses numerical ranks, so the two
paths run the same iterations and pick the same lam. Cost: the thin QR (which reads
every input: the floor), then work that depends on K and the r_k but not on d * p.

:func:`truncate_factors` re-truncates any pair (B, A) to a target rank by QRs and a small
SVD, without forming B A.

LoRA scaling: the update is ``(alpha / r) B A``; pass B already multiplied by the scaling,
or give ``scaling=`` (per client), or pass objects with ``.B``, ``.A`` and ``.scaling``
attributes (:class:`fedlora_lite.lora.LoraFactors`), whose scaling is applied (times
``scaling=`` if both are given). Such objects give ``B A`` in peft's (out, in)
orientation, so side="column" shares output directions whatever the base layer type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .validation import as_matrix, check_choice, check_fraction, check_positive

__all__ = ["Pair", "FactoredReduction", "as_factor_pairs", "is_factor_pair", "oriented", "reduce_pairs", "reduce_factors",
           "truncate_factors", "SIDES"]

Pair = tuple[torch.Tensor, torch.Tensor]
SIDES = ("column", "row")


def is_factor_pair(item: Any) -> bool:
    """True for a LoRA factor pair: an object with ``.A`` and ``.B``, or a 2-sequence of 2-D arrays."""
    if hasattr(item, "A") and hasattr(item, "B"):
        return True
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
        return False
    return all(getattr(x, "ndim", None) == 2 for x in item)


def as_factor_pairs(factors: Any, name: str, scaling: Any = None, min_clients: int = 3) -> list[Pair]:
    """Validate K LoRA pairs (B_k: d x r_k, A_k: r_k x p) -> list of tensors on one device/dtype.

    ``scaling`` (a float or K floats) and each item's own ``.scaling`` are multiplied into B_k.
    """
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"{name} must be a sequence of (B_k, A_k) pairs, got {type(factors).__name__}")
    items = list(factors)
    if len(items) < min_clients:
        raise ValueError(f"{name} needs at least {min_clients} clients, got {len(items)}")
    if scaling is None:
        scales = [None] * len(items)
    elif isinstance(scaling, Sequence) and not isinstance(scaling, (str, bytes)):
        if len(scaling) != len(items):
            raise ValueError(f"scaling has {len(scaling)} entries but {name} has {len(items)} clients")
        scales = [check_positive(s, f"scaling[{k}]") for k, s in enumerate(scaling)]
    else:
        scales = [check_positive(scaling, "scaling")] * len(items)
    pairs: list[Pair] = []
    for k, item in enumerate(items):
        own_scale = None
        if hasattr(item, "A") and hasattr(item, "B"):  # e.g. fedlora_lite.lora.LoraFactors
            own_scale = getattr(item, "scaling", None)
            item = (item.B, item.A)
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise TypeError(f"{name}[{k}] must be a pair (B, A) of matrices, got {type(item).__name__}")
        B = as_matrix(item[0], f"{name}[{k}][0] (B)")
        A = as_matrix(item[1], f"{name}[{k}][1] (A)")
        if B.shape[1] != A.shape[0] or B.shape[1] == 0:
            raise ValueError(f"{name}[{k}]: B is {tuple(B.shape)} and A is {tuple(A.shape)}; expected B (d x r_k), "
                             "A (r_k x p) with r_k >= 1")
        if own_scale is not None:
            own_scale = check_positive(own_scale, f"{name}[{k}].scaling")
        for s in (own_scale, scales[k]):
            if s is not None:
                B = B * float(s)
        pairs.append((B, A))
    d, p = pairs[0][0].shape[0], pairs[0][1].shape[1]
    for k, (B, A) in enumerate(pairs):
        if B.shape[0] != d or A.shape[1] != p:
            raise ValueError(f"{name}[{k}] gives a {B.shape[0]} x {A.shape[1]} update but {name}[0] gives {d} x {p}; "
                             "all clients must share (d, p)")
        if d == 0 or p == 0:
            raise ValueError(f"{name}[{k}] is empty")
    dtype = torch.float64 if any(t.dtype == torch.float64 for pr in pairs for t in pr) else torch.float32
    device = pairs[0][0].device
    return [(B.to(device=device, dtype=dtype), A.to(device=device, dtype=dtype)) for B, A in pairs]


def oriented(pairs: list[Pair], side: str) -> list[Pair]:
    # side="row" shares the input directions: work on M_k^T = A_k^T B_k^T
    return pairs if side == "column" else [(A.T, B.T) for B, A in pairs]


@dataclass
class FactoredReduction:
    """The exact reduction of K LoRA updates M_k = B_k A_k (working orientation).

    Attributes:
        Q: (d, q) orthonormal basis of span[B_1 ... B_K], q = min(d, sum r_k).
        P: per client, (p, t_k) orthonormal basis of the row space of A_k.
        R: per client, (t_k, r_k) with A_k^T = P_k R_k.
        blocks: per client, the reduced block Mt_k = Q^T B_k R_k^T, (q, t_k);
            M_k = Q Mt_k P_k^T exactly.
        shape: (d, p) of a dense update.
    """

    Q: torch.Tensor
    P: tuple[torch.Tensor, ...]
    R: tuple[torch.Tensor, ...]
    blocks: tuple[torch.Tensor, ...]
    shape: tuple[int, int]

    @property
    def q(self) -> int:
        return int(self.Q.shape[1])

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(int(b.shape[1]) for b in self.blocks)

    def lift(self, X: torch.Tensor) -> torch.Tensor:
        """Map a reduced (q, sum t_k) matrix back to dense (K, d, p) blocks Q X_k P_k^T (densifies)."""
        if X.ndim != 2 or X.shape != (self.q, sum(self.block_sizes)):
            raise ValueError(f"X must have shape ({self.q}, {sum(self.block_sizes)}), got {tuple(X.shape)}")
        parts = torch.split(X.to(self.Q), list(self.block_sizes), dim=1)
        return torch.stack([self.Q @ (Xk @ Pk.T) for Xk, Pk in zip(parts, self.P)])


def reduce_pairs(pairs: list[Pair]) -> FactoredReduction:
    """The reduction of already validated, oriented pairs (see :func:`reduce_factors`)."""
    d, p = pairs[0][0].shape[0], pairs[0][1].shape[1]
    ranks = [int(B.shape[1]) for B, _ in pairs]
    Q, RB = torch.linalg.qr(torch.cat([B for B, _ in pairs], dim=1))  # the one O(d (sum r)^2) step
    if len(set(ranks)) == 1:  # batched thin QRs of the A_k^T
        Ps, Rs = torch.linalg.qr(torch.stack([A.T for _, A in pairs]))
        P, R = list(Ps.unbind(0)), list(Rs.unbind(0))
    else:
        P, R = map(list, zip(*(torch.linalg.qr(A.T) for _, A in pairs)))
    blocks = torch.split(RB, ranks, dim=1)  # Q^T B_k, free from the QR
    return FactoredReduction(Q, tuple(P), tuple(R), tuple(b @ Rk.T for b, Rk in zip(blocks, R)), (d, p))


def reduce_factors(factors: Any, *, side: str = "column", scaling: Any = None) -> FactoredReduction:
    """The exact reduction of K LoRA updates (see the module docstring).

    Args:
        factors: K pairs (B_k (d x r_k), A_k (r_k x p)), torch or numpy, any device.
        side: "column" (reduce M_k) or "row" (reduce M_k^T, shared input subspace).
        scaling: optional LoRA scaling per client (float or K floats), multiplied into B_k.

    Returns:
        A :class:`FactoredReduction`; ``decompose(list(red.blocks))`` solves the dense program.
    """
    check_choice(side, "side", SIDES)
    return reduce_pairs(oriented(as_factor_pairs(factors, "factors", scaling), side))



def truncate_factors(B: Any, A: Any, rank: int | None = None, *, rtol: float | None = None) -> Pair:
    """Best rank-``rank`` factors of B A (Eckart-Young) without forming the d x p product.

    B = Q_B R_B and A^T = Q_A R_A (thin QRs), SVD of the small core R_B R_A^T = U s V^T,
    keep the leading ``rank`` triplets and split s evenly: B' = Q_B U sqrt(s),
    A' = sqrt(s) V^T Q_A^T. Cost O((d + p) m^2 + m^3) for inner width m.

    Args:
        B: (d, m); A: (m, p).
        rank: target rank; None keeps the numerical rank (singular values above ``rtol``
            times the largest), i.e. an exact compression.
        rtol: numerical-zero level for ``rank=None``; default 1e-12 (float64) / 1e-6 (float32).

    Returns:
        (B' (d, k), A' (k, p)) with k = min(rank, numerical rank); B' A' is the best
        rank-k approximation of B A.
    """
    B = as_matrix(B, "B")
    A = as_matrix(A, "A", dtype=B.dtype, device=B.device)
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"B is {tuple(B.shape)} and A is {tuple(A.shape)}: inner dimensions differ")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    if rtol is None:
        rtol = 1e-12 if B.dtype == torch.float64 else 1e-6
    rtol = check_fraction(rtol, "rtol")
    QB, RB = torch.linalg.qr(B)
    QA, RA = torch.linalg.qr(A.T)
    Uc, s, Vch = torch.linalg.svd(RB @ RA.T)
    k = int((s > rtol * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    k = max(min(k, rank) if rank is not None else k, 1)
    root = s[:k].sqrt()
    return QB @ (Uc[:, :k] * root), (root.unsqueeze(1) * Vch[:k]) @ QA.T

