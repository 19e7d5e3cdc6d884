"""Robust PCA by principal component pursuit: M = L + S with L low-rank and S entrywise sparse.

Used by FedRPCA (:func:`fedlora_lite.federated.lora_aggregation.aggregate_lora` with
``"fedrpca"``). This is the *entrywise* program of Candès, Li, Ma & Wright 2011
(https://arxiv.org/abs/0912.3599),

    min ||L||_* + lam ||S||_1   s.t.   L + S = M,   lam = 1 / sqrt(max(m, n)),

solved by the inexact augmented Lagrange multiplier method of Lin, Chen & Ma 2010
(https://arxiv.org/abs/1009.5055). CLAIR's own program (:mod:`fedlora_lite.core`) is
different: its S is *column-block* sparse (whole clients), which is what makes it a
detector; FedRPCA's S holds a few large entries of every client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.validation import as_matrix, check_positive

__all__ = ["RobustPCA", "robust_pca"]


@dataclass
class RobustPCA:
    """Output of :func:`robust_pca`: ``low_rank`` + ``sparse`` = the input (up to ``tol``)."""

    low_rank: torch.Tensor
    sparse: torch.Tensor
    rank: int
    lam: float
    iterations: int
    converged: bool


def _soft(X: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.sign(X) * (X.abs() - tau).clamp_min(0.0)


def robust_pca(M: torch.Tensor, *, lam: float | None = None, tol: float = 1e-7, max_iter: int = 500) -> RobustPCA:
    """Principal component pursuit by inexact ALM (see the module docstring).

    Args:
        M: (m, n) matrix (e.g. one column per client).
        lam: weight of ||S||_1; default 1 / sqrt(max(m, n)).
        tol: stop when ||M - L - S||_F <= tol ||M||_F.
        max_iter: iteration cap.

    Returns:
        A :class:`RobustPCA`.
    """
    M = as_matrix(M, "M")
    m, n = M.shape
    lam = 1.0 / math.sqrt(max(m, n)) if lam is None else check_positive(lam, "lam")
    tol = check_positive(tol, "tol")
    norm_fro = float(M.norm())
    L = torch.zeros_like(M)
    S = torch.zeros_like(M)
    if norm_fro == 0.0:
        return RobustPCA(L, S, 0, lam, 0, True)
    spectral = float(torch.linalg.matrix_norm(M, ord=2))
    Y = M / max(spectral, float(M.abs().max()) / lam)  # dual start of Lin et al. (Algorithm 5)
    mu, rho, mu_max = 1.25 / spectral, 1.5, 1e7 / spectral
    converged, it, rank = False, 0, 0
    for it in range(1, max_iter + 1):
        U, s, Vh = torch.linalg.svd(M - S + Y / mu, full_matrices=False)
        s = (s - 1.0 / mu).clamp_min(0.0)
        rank = int((s > 0).sum())
        L = (U[:, :rank] * s[:rank]) @ Vh[:rank]
        S = _soft(M - L + Y / mu, lam / mu)
        Z = M - L - S
        Y = Y + mu * Z
        mu = min(mu * rho, mu_max)
        if float(Z.norm()) <= tol * norm_fro:
            converged = True
            break
    return RobustPCA(L, S, rank, lam, it, converged)
