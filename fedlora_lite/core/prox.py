"""Proximal maps of the two norms in CLAIR's programs, and a warm-startable randomized SVD.

* ``prox`` of tau * sum_k ||X_k||_F (block soft-thresholding): shrink every client block's
  Frobenius norm by tau, or to zero;
* ``prox`` of tau * ||X||_* (singular value thresholding, Cai, Candes & Shen 2010):
  soft-threshold the singular values, with an optional randomized truncated SVD
  (Halko, Martinsson & Tropp 2011) that falls back to a full SVD when its rank hint is
  too small, so the result is always the exact prox.

Plain torch on the input's device and dtype; no policy, no CLAIR rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["block_index", "block_frobenius_norms", "block_soft_threshold", "singular_value_threshold", "svt_factors"]


def block_index(block_sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """(n,) block id of every column of a stack whose blocks have widths ``block_sizes``."""
    sizes = torch.as_tensor(list(block_sizes), device=device)
    return torch.repeat_interleave(torch.arange(len(block_sizes), device=device), sizes)


def block_frobenius_norms(X: torch.Tensor, block_index: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """||X_k||_F for the column blocks of X (d x n) given each column's block id (n,)."""
    col_sq = (X * X).sum(dim=0)
    out = torch.zeros(num_blocks, dtype=X.dtype, device=X.device)
    return out.index_add_(0, block_index, col_sq).sqrt()


def block_soft_threshold(X: torch.Tensor, tau: float, block_index: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Prox of tau * sum_k ||X_k||_F: shrink every block's Frobenius norm by tau (or to 0)."""
    norms = block_frobenius_norms(X, block_index, num_blocks)
    scale = torch.clamp(1.0 - tau / torch.clamp(norms, min=torch.finfo(X.dtype).tiny), min=0.0)
    return X * scale[block_index].unsqueeze(0)


def singular_value_threshold(X: torch.Tensor, tau: float, rank_hint: int | None = None) -> tuple[torch.Tensor, int, float]:
    """Prox of tau * ||X||_*: soft-threshold the singular values of X.

    Args:
        X: (d, n) matrix.
        tau: threshold.
        rank_hint: if given and well below min(d, n), first try a randomized SVD (subspace
            iteration, Halko et al. 2011) with 10 more components than the hint; fall back
            to the full SVD when the hint was too small (the smallest computed singular
            value still exceeds tau), so the result is always the exact prox up to the
            randomized SVD's accuracy. Inside the solvers the subspace is warm-started from
            the previous iteration's, so its error keeps shrinking as the iterates settle.

    Returns:
        (thresholded matrix, its rank, nuclear norm of the result).
    """
    U, s, Vh, _ = svt_factors(X, tau, rank_hint)
    return (U * s) @ Vh, int(s.numel()), float(s.sum())


def _randomized_svd(X: torch.Tensor, k: int, start: torch.Tensor | None, generator: torch.Generator | None,
                    niter: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-k SVD of X (m x n) by subspace iteration from ``start`` (n x <= k), padded with
    Gaussian columns; returns (U (m, k), s (k,), Vh (k, n))."""
    cols = [] if start is None else [start[:, :k]]
    extra = k - (0 if start is None else cols[0].shape[1])
    if extra > 0:
        cols.append(torch.randn(X.shape[1], extra, generator=generator, dtype=X.dtype, device=X.device))
    Qy = torch.linalg.qr(X @ torch.cat(cols, dim=1)).Q
    for _ in range(niter):
        Qy = torch.linalg.qr(X @ torch.linalg.qr(X.T @ Qy).Q).Q
    Ub, s, Vh = torch.linalg.svd(Qy.T @ X, full_matrices=False)
    return Qy @ Ub, s, Vh


def svt_factors(X: torch.Tensor, tau: float, rank_hint: int | None = None, start: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
    """:func:`singular_value_threshold` as a compact SVD (U, s - tau, Vh) of the kept triplets,
    plus the right singular basis (n, k) to warm-start the next randomized call (or None)."""
    m = min(X.shape)
    if rank_hint is not None and rank_hint + 10 < m // 2:
        k = min(m, rank_hint + 10)
        U, s, Vh = _randomized_svd(X, k, start, generator, niter=4 if start is None else 1)
        if s[-1] <= tau:
            keep = s > tau
            return U[:, keep], s[keep] - tau, Vh[keep], Vh.T
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    keep = s > tau
    return U[:, keep], s[keep] - tau, Vh[keep], None

