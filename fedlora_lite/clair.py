"""CLAIR: shared-subspace recovery, contamination flags and refinement of client updates.

Pipeline for K client updates M_k (d x p), following ``shared/design/CLAIR.md``:

1. decompose the stacked M = [M_1, ..., M_K] into low-rank L + block-sparse S
   (:func:`fedlora_lite.decomposition.decompose`);
2. shared subspace U-hat = leading left singular vectors of L-hat; the rank is given or
   chosen from L-hat's spectrum (:func:`choose_rank`);
3. contamination score of client k = ||S_k||_F / ||M_k||_F, the fraction of its update
   (in Frobenius norm) that the decomposition attributes to the block-sparse part. A
   client is flagged when the score exceeds ``threshold`` (default 0.5: more than half of
   the update's norm is unexplained by the shared subspace). Scores are returned so the
   rule can be re-thresholded;
4. refinement of every unflagged client (the collaborative set C-hat):
   ``refine="average"``: U U^T M_k + (I - U U^T) mean_{j in C-hat} M_j (own in-subspace
   part, collaborative average off the subspace); ``refine="project"``: U U^T M_k.

The shared subspace is on the column side by default (Theta_k = U V_k^T: clients share
the output directions); ``side="row"`` shares the input directions (Theta_k = W_k U^T).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .decomposition import Decomposition, decompose
from .validation import as_update_stack, check_choice, check_fraction

__all__ = ["ClairResult", "MultiModuleClairResult", "clair", "clair_modules", "choose_rank", "estimate_mu", "refine_updates"]

_SIDES = ("column", "row")
_REFINE = ("average", "project")


@dataclass
class ClairResult:
    """Output of :func:`clair`.

    Attributes:
        subspace: orthonormal basis of the shared subspace, (d, r) for ``side="column"``
            and (p, r) for ``side="row"``.
        rank: r.
        singular_values: singular values of L-hat (descending), used to choose r.
        scores: (K,) contamination scores ||S_k||_F / ||M_k||_F in [0, 1].
        flags: (K,) bool, True = flagged as contaminated.
        benign: (K,) bool, the collaborative set C-hat (= ~flags).
        refined: (K, d, p) refined updates for benign clients; flagged clients get their
            own input back unchanged (CLAIR does not serve them).
        decomposition: the underlying :class:`~fedlora_lite.decomposition.Decomposition`
            (on the transposed blocks when ``side="row"``).
        lam: block weight used.
        threshold: flag threshold used.
        side: "column" or "row".
        refine: "average" or "project".
    """

    subspace: torch.Tensor
    rank: int
    singular_values: torch.Tensor
    scores: torch.Tensor
    flags: torch.Tensor
    benign: torch.Tensor
    refined: torch.Tensor
    decomposition: Decomposition
    lam: float
    threshold: float
    side: str
    refine: str

    @property
    def flagged_clients(self) -> list[int]:
        """Indices of flagged clients."""
        return [int(i) for i in torch.nonzero(self.flags).flatten()]


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


def refine_updates(updates: Any, subspace: torch.Tensor, benign: torch.Tensor, mode: str = "average") -> torch.Tensor:
    """CLAIR refinement of the benign clients' updates inside a shared column subspace.

    Args:
        updates: (K, d, p) client updates (or a list of K d x p matrices).
        subspace: (d, r) orthonormal basis (r may be 0).
        benign: (K,) bool mask of the collaborative set; must contain at least one client.
        mode: "average" -> U U^T M_k + (I - U U^T) mean_{j benign} M_j;
            "project" -> U U^T M_k.

    Returns:
        (K, d, p) tensor: refined updates for benign clients, inputs for the others.
    """
    M = as_update_stack(updates, "updates", min_clients=1)
    check_choice(mode, "mode", _REFINE)
    K, d, _ = M.shape
    if not isinstance(subspace, torch.Tensor) or subspace.ndim != 2 or subspace.shape[0] != d:
        raise ValueError(f"subspace must be a (d={d}, r) tensor, got {getattr(subspace, 'shape', type(subspace))}")
    benign = torch.as_tensor(benign, device=M.device)
    if benign.dtype != torch.bool or benign.shape != (K,):
        raise ValueError(f"benign must be a bool mask of shape ({K},), got {benign.dtype} {tuple(benign.shape)}")
    if not bool(benign.any()):
        raise ValueError("benign selects no client: there is no collaborative set to refine with")
    U = subspace.to(M)
    inside = torch.einsum("dr,kdp->krp", U, M)
    own = torch.einsum("dr,krp->kdp", U, inside)
    if mode == "project":
        refined = own
    else:
        mean = M[benign].mean(dim=0)
        refined = own + (mean - U @ (U.T @ mean)).unsqueeze(0)
    return torch.where(benign.view(K, 1, 1), refined, M)


@dataclass
class _ModuleFit:
    stack: torch.Tensor  # (K, d, p) on the working side
    decomposition: Decomposition
    subspace: torch.Tensor
    rank: int
    singular_values: torch.Tensor
    sparse_sq: torch.Tensor  # (K,) ||S_k||_F^2
    total_sq: torch.Tensor  # (K,) ||M_k||_F^2


def _fit(updates: Any, name: str, rank: int | str, lam: float | None, mu: float | str | None, side: str,
         max_rank: int | None, solver_options: dict[str, Any]) -> _ModuleFit:
    M = as_update_stack(updates, name)
    check_choice(side, "side", _SIDES)
    if side == "row":
        M = M.transpose(1, 2).contiguous()
    K, d, p = M.shape
    dmax = min(d, K * p)
    if isinstance(rank, str):
        if rank != "auto":
            raise ValueError(f"rank must be a positive int or 'auto', got {rank!r}")
    elif isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= dmax:
        raise ValueError(f"rank must be 'auto' or an int in [1, {dmax}] (min(d, K*p) on the {side} side), got {rank!r}")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or not 1 <= max_rank <= dmax):
        raise ValueError(f"max_rank must be None or an int in [1, {dmax}], got {max_rank!r}")
    if isinstance(mu, str):
        if mu != "auto":
            raise ValueError(f"mu must be None, a positive float or 'auto', got {mu!r}")
        dec0 = decompose(list(M), lam=lam, **solver_options)
        mu = estimate_mu(M, dec0, rank, max_rank)
        solver_options = {**solver_options, "init": dec0}
    dec = decompose(list(M), lam=lam, mu=mu, **solver_options)
    U_all, s = _svd_of_L(dec)
    r = choose_rank(s, max_rank=max_rank) if rank == "auto" else rank
    if r > U_all.shape[1]:
        U_all, s = _svd_of_L(dec, r)
    if r == 0:
        warnings.warn(f"{name}: the low-rank part is zero (lam={dec.lam:.3g} too small?); the shared subspace is empty",
                      RuntimeWarning, stacklevel=3)
    sparse_sq = torch.stack([b.pow(2).sum() for b in dec.S_blocks])
    total_sq = M.pow(2).sum(dim=(1, 2))
    return _ModuleFit(M, dec, U_all[:, :r], r, s, sparse_sq, total_sq)


def estimate_mu(M: torch.Tensor, exact: Decomposition, rank: int | str = "auto", max_rank: int | None = None,
                threshold: float = 0.5) -> float:
    """Noise weight mu for the noisy form, estimated from an exact-form fit.

    Stable principal component pursuit (Zhou et al., 2010) takes mu of the order of the
    noise's spectral norm, ``sigma * (sqrt(d) + sqrt(n))`` for i.i.d. entries of size
    sigma in a d x n stack. sigma is estimated from the exact-form fit: the energy of the
    unflagged clients' blocks outside the rank-r subspace of L-hat, per residual degree
    of freedom, ``sigma^2 = sum_{k in C} ||(I - U U^T) M_k||_F^2 / (|C| p (d - r))``.

    Args:
        M: (K, d, p) stacked updates (column side).
        exact: exact-form :class:`~fedlora_lite.decomposition.Decomposition` of M.
        rank, max_rank: as in :func:`clair`.
        threshold: flag rule used to pick the clients that enter the estimate.

    Returns:
        mu > 0 (a tiny positive value if the benign residual is exactly zero).
    """
    K, d, p = M.shape
    U_all, s = _svd_of_L(exact)
    r = choose_rank(s, max_rank=max_rank) if rank == "auto" else int(rank)
    if r > U_all.shape[1]:
        U_all, s = _svd_of_L(exact, r)
    sparse_sq = torch.stack([b.pow(2).sum() for b in exact.S_blocks])
    _, flags = _flags(sparse_sq, M.pow(2).sum(dim=(1, 2)), threshold)
    benign = ~flags if bool((~flags).any()) else torch.ones_like(flags)
    U = U_all[:, :r]
    resid = M[benign] - torch.einsum("dr,krp->kdp", U, torch.einsum("dr,kdp->krp", U, M[benign]))
    dof = max(int(benign.sum()) * p * max(d - r, 1), 1)
    sigma = float(resid.pow(2).sum() / dof) ** 0.5
    n = K * p
    scale = float(torch.linalg.matrix_norm(M.reshape(-1, 1)))
    return max(sigma * (d**0.5 + n**0.5), 1e-12 * max(scale, 1e-300))


def _svd_of_L(dec: Decomposition, need: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (>= ``need`` of them) and all min(d, n) singular values of L-hat.

    Uses the compact SVD the solver kept from its last thresholding step (values
    zero-padded), which spares a full SVD of the d x n matrix; falls back to the full SVD
    when more vectors than L-hat's rank are asked for or no compact SVD is available.
    """
    svd = getattr(dec, "L_svd", None)
    if svd is not None and svd[0].shape[1] >= need:
        s = torch.zeros(min(dec.L.shape), dtype=dec.L.dtype, device=dec.L.device)
        s[: svd[1].numel()] = svd[1]
        return svd[0], s
    U, s, _ = torch.linalg.svd(dec.L, full_matrices=False)
    return U, s


def _flags(sparse_sq: torch.Tensor, total_sq: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.where(total_sq > 0, (sparse_sq / torch.clamp(total_sq, min=torch.finfo(total_sq.dtype).tiny)).sqrt(),
                         torch.zeros_like(total_sq))
    scores = torch.clamp(scores, max=1.0)
    return scores, scores > threshold


def _refine_or_keep(fit: _ModuleFit, benign: torch.Tensor, mode: str, side: str, name: str) -> torch.Tensor:
    if bool(benign.any()):
        refined = refine_updates(fit.stack, fit.subspace, benign, mode)
    else:
        warnings.warn(f"{name}: every client was flagged; returning the local updates unrefined "
                      "(lower lam or raise threshold if this is unexpected)", RuntimeWarning, stacklevel=3)
        refined = fit.stack.clone()
    return refined.transpose(1, 2).contiguous() if side == "row" else refined


def _check_threshold(threshold: float) -> float:
    t = check_fraction(threshold, "threshold")
    if t == 0:
        raise ValueError("threshold must lie in (0, 1), got 0")
    return t


def clair(
    updates: Any,
    *,
    rank: int | str = "auto",
    lam: float | None = None,
    mu: float | str | None = None,
    side: str = "column",
    threshold: float = 0.5,
    refine: str = "average",
    max_rank: int | None = None,
    **solver_options: Any,
) -> ClairResult:
    """Run CLAIR on K client update matrices.

    Args:
        updates: K matrices of equal shape (d, p) — torch tensors (CPU or CUDA) or numpy
            arrays, float32/float64 — or a (K, d, p) tensor. K >= 3.
        rank: shared rank r, or "auto" to choose it from L-hat's spectrum (:func:`choose_rank`).
        lam: block-sparsity weight; None -> :func:`~fedlora_lite.decomposition.default_lambda`
            (or pick one with :func:`~fedlora_lite.decomposition.select_lambda`).
        mu: None = exact form (noiseless model); > 0 = noisy form, mu of the order of the
            noise's spectral norm; "auto" = noisy form with mu from :func:`estimate_mu`
            (a two-stage fit: exact form first, then the noise level of its benign residual).
        side: "column" (shared output subspace, default) or "row" (shared input subspace).
        threshold: flag client k when ||S_k||_F / ||M_k||_F > threshold; in (0, 1).
        refine: "average" (default) or "project"; see the module docstring.
        max_rank: largest rank "auto" may choose.
        **solver_options: passed to :func:`~fedlora_lite.decomposition.decompose`
            (max_iter, tol, init, svd_rank_hint, progress).

    Returns:
        A :class:`ClairResult` (tensors on the input's device, in its dtype).
    """
    threshold = _check_threshold(threshold)
    check_choice(refine, "refine", _REFINE)
    fit = _fit(updates, "updates", rank, lam, mu, side, max_rank, solver_options)
    scores, flags = _flags(fit.sparse_sq, fit.total_sq, threshold)
    refined = _refine_or_keep(fit, ~flags, refine, side, "updates")
    return ClairResult(fit.subspace, fit.rank, fit.singular_values, scores, flags, ~flags, refined,
                       fit.decomposition, fit.decomposition.lam, threshold, side, refine)


@dataclass
class MultiModuleClairResult:
    """Output of :func:`clair_modules`: one joint contamination decision, per-module subspaces.

    Attributes:
        per_module: module name -> :class:`ClairResult` (its ``scores`` are the module's
            own; its ``flags``/``benign``/``refined`` use the joint decision).
        scores: (K,) joint scores sqrt(sum_m ||S_k^m||_F^2 / sum_m ||M_k^m||_F^2).
        flags: (K,) bool joint flags (scores > threshold).
        benign: (K,) bool, ~flags.
        refined: module name -> (K, d_m, p_m) refined updates.
        threshold: flag threshold used.
    """

    per_module: dict[str, ClairResult]
    scores: torch.Tensor
    flags: torch.Tensor
    benign: torch.Tensor
    refined: dict[str, torch.Tensor]
    threshold: float

    @property
    def flagged_clients(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.flags).flatten()]


def clair_modules(
    updates_by_module: Mapping[str, Any],
    *,
    rank: int | str = "auto",
    lam: float | None = None,
    mu: float | str | None = None,
    side: str = "column",
    threshold: float = 0.5,
    refine: str = "average",
    max_rank: int | None = None,
    **solver_options: Any,
) -> MultiModuleClairResult:
    """CLAIR on every adapted module of a model with one contamination decision per client.

    Each module is decomposed on its own (its own lam default, subspace and rank). The
    joint score pools the block energies over modules,
    ``sqrt(sum_m ||S_k^m||^2 / sum_m ||M_k^m||^2)``, i.e. the fraction of client k's whole
    update that no module's shared subspace explains. Pooling energies (rather than
    averaging per-module scores) weights a module by how much of the update it carries,
    so a near-empty module cannot veto a decision. All modules are then refined with the
    same collaborative set.

    Args:
        updates_by_module: module name -> K client updates for that module (each
            module's d_m x p_m may differ; K must agree).
        rank, lam, mu, side, threshold, refine, max_rank, **solver_options: as in
            :func:`clair`, applied to every module.

    Returns:
        A :class:`MultiModuleClairResult`.
    """
    if not isinstance(updates_by_module, Mapping) or len(updates_by_module) == 0:
        raise ValueError("updates_by_module must be a non-empty mapping of module name -> client updates")
    threshold = _check_threshold(threshold)
    check_choice(refine, "refine", _REFINE)
    fits: dict[str, _ModuleFit] = {}
    K = None
    for name, ups in updates_by_module.items():
        fit = _fit(ups, f"updates_by_module[{name!r}]", rank, lam, mu, side, max_rank, solver_options)
        if K is not None and fit.stack.shape[0] != K:
            raise ValueError(f"updates_by_module[{name!r}] has {fit.stack.shape[0]} clients, expected {K}")
        K = fit.stack.shape[0]
        fits[name] = fit
    sparse = sum(f.sparse_sq.double().cpu() for f in fits.values())
    total = sum(f.total_sq.double().cpu() for f in fits.values())
    scores, flags = _flags(sparse, total, threshold)
    per_module: dict[str, ClairResult] = {}
    refined: dict[str, torch.Tensor] = {}
    for name, fit in fits.items():
        dev = fit.stack.device
        m_scores, _ = _flags(fit.sparse_sq, fit.total_sq, threshold)
        refined[name] = _refine_or_keep(fit, (~flags).to(dev), refine, side, f"updates_by_module[{name!r}]")
        per_module[name] = ClairResult(fit.subspace, fit.rank, fit.singular_values, m_scores, flags.to(dev),
                                       (~flags).to(dev), refined[name], fit.decomposition,
                                       fit.decomposition.lam, threshold, side, refine)
    return MultiModuleClairResult(per_module, scores, flags, ~flags, refined, threshold)
