"""CLAIR's refinement of the collaborative set, on dense updates and on LoRA factors.

For a benign client k (k in C-hat) with shared subspace U (our reading of the paper's
"reduces off-subspace estimation error through cross-client averaging while preserving
client-specific variation within the shared LoRA subspace"):

* ``refine="average"``: ``U U^T M_k + (I - U U^T) mean_{j in C-hat} M_j`` (own in-subspace
  part, collaborative average off the subspace);
* ``refine="project"``: ``U U^T M_k``.

Flagged clients get their own update back (CLAIR does not serve them). On factors the
refined update is never densified: with B_off = (I - U U^T) [B_j]_{j in C} / |C| and
A_off = [A_j]_{j in C},

    U U^T B_k A_k + (I - U U^T) (1/|C|) sum_{j in C} B_j A_j = [U U^T B_k, B_off] @ [A_k; A_off],

so client k's refined factors have rank r_k + min(m_C, d, p), m_C = sum_{j in C} r_j
("average"), or exactly r_k ("project"). The shared pair (B_off, A_off) is stored once
(:class:`RefinedFactors` builds each client's pair on access).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..core.reduction import Pair, truncate_factors
from ..core.validation import as_update_stack, check_choice
from .config import REFINE_MODES

__all__ = ["refine_updates", "RefinedFactors", "refine_factors"]


def _warn_all_flagged(name: str) -> None:
    warnings.warn(f"{name}: every client was flagged; returning the local updates unrefined "
                  "(lower lam or raise threshold if this is unexpected)", RuntimeWarning, stacklevel=4)


def refine_updates(updates: Any, subspace: torch.Tensor, benign: Any, mode: str = "average") -> torch.Tensor:
    """CLAIR refinement of the benign clients' updates inside a shared column subspace.

    Args:
        updates: (K, d, p) client updates (or a list of K d x p matrices).
        subspace: (d, r) orthonormal basis (r may be 0).
        benign: (K,) bool mask of the collaborative set; must contain at least one client.
        mode: "average" or "project" (see the module docstring).

    Returns:
        (K, d, p) tensor: refined updates for benign clients, inputs for the others.
    """
    M = as_update_stack(updates, "updates", min_clients=1)
    check_choice(mode, "mode", REFINE_MODES)
    K, d, _ = M.shape
    if not isinstance(subspace, torch.Tensor) or subspace.ndim != 2 or subspace.shape[0] != d:
        raise ValueError(f"subspace must be a (d={d}, r) tensor, got {getattr(subspace, 'shape', type(subspace))}")
    benign = torch.as_tensor(benign, device=M.device)
    if benign.dtype != torch.bool or benign.shape != (K,):
        raise ValueError(f"benign must be a bool mask of shape ({K},), got {benign.dtype} {tuple(benign.shape)}")
    if not bool(benign.any()):
        raise ValueError("benign selects no client: there is no collaborative set to refine with")
    U = subspace.to(M)
    gram_err = float((U.T @ U - torch.eye(U.shape[1], dtype=U.dtype, device=U.device)).abs().max()) if U.shape[1] else 0.0
    eps = torch.finfo(subspace.dtype if subspace.is_floating_point() else U.dtype).eps  # the basis' own precision
    if not gram_err <= 1e3 * max(eps, torch.finfo(U.dtype).eps) * max(1, U.shape[1]):  # also catches NaN
        raise ValueError(f"subspace must have orthonormal columns (max |U^T U - I| = {gram_err:.2g})")
    inside = torch.einsum("dr,kdp->krp", U, M)
    own = torch.einsum("dr,krp->kdp", U, inside)
    if mode == "project":
        refined = own
    else:
        mean = M[benign].mean(dim=0)
        refined = own + (mean - U @ (U.T @ mean)).unsqueeze(0)
    return torch.where(benign.view(K, 1, 1), refined, M)


def refine_stack(stack: torch.Tensor, subspace: torch.Tensor, benign: torch.Tensor, mode: str, name: str) -> torch.Tensor:
    """:func:`refine_updates` on a validated stack, or the stack unchanged (with a warning) if all are flagged."""
    if bool(benign.any()):
        return refine_updates(stack, subspace, benign, mode)
    _warn_all_flagged(name)
    return stack.clone()


class RefinedFactors(Sequence):
    """K refined LoRA pairs; client k's pair is assembled on access.

    Benign client k (refine="average"): ``(cat[U U^T B_k, B_off], cat[A_k; A_off])`` with the
    shared off-subspace pair (B_off, A_off) stored once; refine="project": ``(U U^T B_k, A_k)``.
    Flagged clients: their own (B_k, A_k). ``B @ A`` equals the dense refinement.

    Attributes:
        own: per client the own pair (working orientation).
        shared: (B_off, A_off) or None.
        benign: (K,) bool.
        transposed: True for side="row" (pairs are transposed back on access).
    """

    def __init__(self, own: list[Pair], shared: Pair | None, benign: torch.Tensor, transposed: bool = False):
        self.own, self.shared, self.benign, self.transposed = own, shared, benign, transposed

    def __len__(self) -> int:
        return len(self.own)

    def __getitem__(self, k: int) -> Pair:  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(f"client index {k} out of range for {len(self)} clients")
        k = k % len(self)
        B, A = self.own[k]
        if self.shared is not None and bool(self.benign[k]):
            B, A = torch.cat([B, self.shared[0]], dim=1), torch.cat([A, self.shared[1]], dim=0)
        return (A.T, B.T) if self.transposed else (B, A)

    @property
    def ranks(self) -> list[int]:
        """Inner width of each client's refined pair."""
        extra = 0 if self.shared is None else int(self.shared[0].shape[1])
        return [int(B.shape[1]) + (extra if bool(b) else 0) for (B, _), b in zip(self.own, self.benign)]

    def dense(self) -> torch.Tensor:
        """All refined updates as a dense (K, d, p) tensor (memory K d p: small cases only)."""
        return torch.stack([B @ A for B, A in self])

    def truncated(self, rank: int, *, shared_rank: int | None = None) -> list[Pair]:
        """Every client's pair re-truncated to ``rank`` by :func:`truncate_factors`.

        Args:
            rank: target rank per client.
            shared_rank: first truncate the shared off-subspace pair once to this rank, so
                each client's truncation works on width r_k + shared_rank instead of
                r_k + m_C (much cheaper for many clients; an extra approximation).
        """
        src = self
        if shared_rank is not None and self.shared is not None:
            src = RefinedFactors(self.own, truncate_factors(*self.shared, shared_rank), self.benign, self.transposed)
        return [truncate_factors(B, A, rank) for B, A in src]


def refine_factors(pairs: list[Pair], U: torch.Tensor, benign: torch.Tensor, mode: str, *, transposed: bool = False,
                   name: str = "factors") -> RefinedFactors:
    """Refined factors of K (oriented) LoRA pairs; see the module docstring."""
    if not bool(benign.any()):
        _warn_all_flagged(name)
        return RefinedFactors(list(pairs), None, benign, transposed)
    own = [(U @ (U.T @ B), A) if bool(b) else (B, A) for (B, A), b in zip(pairs, benign)]
    shared = None
    if mode == "average":
        idx = [k for k in range(len(pairs)) if bool(benign[k])]
        BC = torch.cat([pairs[k][0] for k in idx], dim=1) / len(idx)
        B_off, A_off = BC - U @ (U.T @ BC), torch.cat([pairs[k][1] for k in idx], dim=0)
        if B_off.shape[1] > A_off.shape[1]:  # wider than p: compress exactly through A's side
            P, R = torch.linalg.qr(A_off.T)
            B_off, A_off = B_off @ R.T, P.T
        if B_off.shape[1] > B_off.shape[0]:  # wider than d
            QB, RB = torch.linalg.qr(B_off)
            B_off, A_off = QB, RB @ A_off
        shared = (B_off, A_off)
    return RefinedFactors(own, shared, benign, transposed)
