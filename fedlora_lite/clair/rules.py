"""CLAIR's rules on top of a decomposition: the shared rank, the noise weight mu, scores and flags.

Each rule is a small pure function of the decomposition (and of the dense shape (d, p) of
one client update), so the dense and the LoRA-factored paths call the same code: on the
factored path the blocks are the reduced ones (``q x t_k``), whose norms, spectra and
residual energies equal the dense ones exactly (:mod:`fedlora_lite.core.reduction`).
"""

from __future__ import annotations

import torch

from ..core.decomposition import Decomposition
from ..core.validation import check_fraction

__all__ = ["choose_rank", "estimate_mu", "scores_and_flags", "check_threshold", "singular_vectors_of_L", "padded"]


def choose_rank(singular_values: torch.Tensor, *, max_rank: int | None = None, rtol: float = 1e-3) -> int:
    """Choose the shared rank from L-hat's singular values by the largest spectral gap.

    r = argmax_{1 <= i <= R} s_i / s_{i+1} with R = min(max_rank, len(s) - 1), where
    values below ``rtol * s_1`` count as ``rtol * s_1``: directions carrying less than
    0.1% (default) of the leading one are treated as noise, so a tiny leaked direction
    (the exact form on noisy inputs leaves a few) cannot create a spurious huge gap. On an
    exactly low-rank L-hat this returns its rank; with noise absorbed into L-hat it
    returns the rank at the clearest signal/noise gap.

    Args:
        singular_values: descending, non-negative, shape (m,).
        max_rank: largest rank considered; default len(s) - 1 (or len(s) if m == 1).
        rtol: noise floor relative to s_1 (default 1e-3).

    Returns:
        r >= 0 (0 only when L-hat is zero).
    """
    s = singular_values.detach().flatten()
    if not bool(torch.isfinite(s).all()):  # NaN compares false everywhere: the gap rule would return 1
        raise ValueError("singular_values contains NaN or Inf")
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    if s.numel() == 1:
        return 1
    R = s.numel() - 1 if max_rank is None else min(int(max_rank), s.numel() - 1)
    if R < 1:
        return s.numel() if max_rank is None else min(int(max_rank), s.numel())
    floored = torch.clamp(s, min=rtol * float(s[0]))
    ratios = floored[:R] / floored[1 : R + 1]
    if float(ratios.max()) <= 1.0 + 1e-12:  # flat spectrum: no gap, keep everything allowed
        return R
    return int(torch.argmax(ratios)) + 1


def check_threshold(threshold: float) -> float:
    """The flag threshold as a float in (0, 1)."""
    t = check_fraction(threshold, "threshold")
    if t == 0:
        raise ValueError("threshold must lie in (0, 1), got 0")
    return t


def scores_and_flags(sparse_sq: torch.Tensor, total_sq: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ||S_k||_F / ||M_k||_F (from squared energies, clamped to [0, 1]) and flags score > threshold."""
    scores = torch.where(total_sq > 0, (sparse_sq / torch.clamp(total_sq, min=torch.finfo(total_sq.dtype).tiny)).sqrt(),
                         torch.zeros_like(total_sq))
    scores = torch.clamp(scores, max=1.0)
    return scores, scores > threshold


def padded(s: torch.Tensor, length: int) -> torch.Tensor:
    """``s`` zero-padded to ``length`` (the dense spectrum length min(d, K p))."""
    out = torch.zeros(max(length, s.numel()), dtype=s.dtype, device=s.device)
    out[: s.numel()] = s
    return out


def singular_vectors_of_L(dec: Decomposition, need: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (>= ``need`` of them) and all min(rows, cols) singular values of L-hat.

    Uses the compact SVD the solver kept from its last thresholding step (values
    zero-padded), which spares a full SVD of L-hat; falls back to the full SVD when more
    vectors than L-hat's rank are asked for or no compact SVD is available.
    """
    svd = dec.L_svd
    if svd is not None and svd[0].shape[1] >= need:
        return svd[0], padded(svd[1], min(dec.L.shape))
    U, s, _ = torch.linalg.svd(dec.L, full_matrices=False)
    return U, s


def estimate_mu(blocks: list[torch.Tensor], exact: Decomposition, shape: tuple[int, int], *,
                rank: int | str = "auto", max_rank: int | None = None, threshold: float = 0.5) -> float:
    """Noise weight mu for the noisy form, estimated from an exact-form fit.

    Stable principal component pursuit (Zhou et al., 2010) takes mu of the order of the
    noise's spectral norm, ``sigma * (sqrt(d) + sqrt(n))`` for i.i.d. entries of size
    sigma in a d x n stack. sigma is estimated from the exact-form fit: the energy of the
    unflagged clients' blocks outside the rank-r subspace of L-hat, per residual degree
    of freedom, ``sigma^2 = sum_{k in C} ||(I - U U^T) M_k||_F^2 / (|C| p (d - r))``.

    Args:
        blocks: the K blocks the decomposition was computed on (dense d x p updates, or the
            reduced blocks of the factored path, which give the same energies).
        exact: the exact-form :class:`~fedlora_lite.core.decomposition.Decomposition`.
        shape: (d, p) of one dense client update (on the working side).
        rank, max_rank: as in :class:`~fedlora_lite.clair.config.ClairConfig`.
        threshold: flag rule used to pick the clients that enter the estimate.

    Returns:
        mu > 0 (a tiny positive value if the benign residual is exactly zero).
    """
    (d, p), K = shape, len(blocks)
    U_all, s = singular_vectors_of_L(exact)
    r = choose_rank(padded(s, min(d, K * p)), max_rank=max_rank) if rank == "auto" else int(rank)
    if r > U_all.shape[1]:
        U_all, s = singular_vectors_of_L(exact, r)
    total_sq = torch.stack([b.pow(2).sum() for b in blocks])
    sparse_sq = torch.stack([b.pow(2).sum() for b in exact.S_blocks])
    _, flags = scores_and_flags(sparse_sq, total_sq, threshold)
    benign = ~flags if bool((~flags).any()) else torch.ones_like(flags)
    U = U_all[:, :r]
    resid = sum(float((Mk - U @ (U.T @ Mk)).pow(2).sum()) for Mk, b in zip(blocks, benign) if bool(b))
    dof = max(int(benign.sum()) * p * max(d - r, 1), 1)
    sigma = (resid / dof) ** 0.5
    scale = float(total_sq.sum()) ** 0.5
    return max(sigma * (d**0.5 + (K * p) ** 0.5), 1e-12 * max(scale, 1e-300))
