"""Low-rank plus block-sparse decomposition of stacked client updates (CLAIR's core).

Clients' matrices M_k (d x p_k) are stacked side by side, M = [M_1, ..., M_K] (d x n,
n = sum p_k), and split as M = L + S with L low-rank (the shared subspace) and S
block-sparse (a whole client is contaminated or not). Two convex programs:

* exact form (``mu=None``)::

      min ||L||_* + lam * sum_k ||S_k||_F    s.t.  L + S = M

  solved by ADMM with residual balancing (singular value thresholding for L, block
  soft-thresholding for S);

* noisy form (``mu > 0``)::

      min 1/2 ||M - L - S||_F^2 + mu * (||L||_* + lam * sum_k ||S_k||_F)

  solved by accelerated proximal gradient (FISTA with adaptive restart) on L alone:
  S is minimised in closed form (block soft-thresholding of M - L), which leaves a
  smooth block-Huber term with a 1-Lipschitz gradient, so the step size is exactly 1.

This is the block version of Outlier Pursuit (Xu, Caramanis & Sanghavi, 2012). Everything
is plain torch on whatever device the input lives on; blocks may have different widths
(needed by the LoRA-factored form, where client k contributes r_k columns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .validation import as_block_list, check_choice, check_positive

__all__ = [
    "Decomposition",
    "decompose",
    "default_lambda",
    "select_lambda",
    "LambdaPath",
    "decomposition_objective",
    "singular_value_threshold",
    "block_soft_threshold",
    "block_frobenius_norms",
]


@dataclass
class Decomposition:
    """Solution of the low-rank plus block-sparse program.

    Attributes:
        L: low-rank part, shape (d, n) with n = sum(block_sizes).
        S: block-sparse part, shape (d, n).
        block_sizes: width p_k of each client's block.
        block_norms: ||S_k||_F per client, shape (K,).
        objective: value of the program that was solved (exact or noisy form).
        iterations: iterations run.
        converged: whether the stopping rule was met before ``max_iter``.
        lam: block-sparsity weight used.
        mu: noise weight (None for the exact form).
        primal_residual: exact form: ||M - L - S||_F / ||M||_F; noisy form: 0.
        dual_residual: exact form: ADMM dual residual rho*||S - S_prev||_F / ||Y||_F;
            noisy form: relative norm of the proximal-gradient step (stationarity).
        rank: numerical rank of L (singular values above ``1e-9`` x the largest in
            float64, ``1e-5`` in float32).
        dual: ADMM multiplier Y (exact form), kept for warm starts; None otherwise.
        history: per-iteration (primal, dual) residuals, for convergence plots.
        L_svd: compact SVD (U (d, k), s (k,), Vh (k, n)) of L from the solver's last
            singular value thresholding, L = U diag(s) Vh (s descending); saves callers a
            full SVD of L (CLAIR's subspace, the rank, the nuclear norm).
    """

    L: torch.Tensor
    S: torch.Tensor
    block_sizes: tuple[int, ...]
    block_norms: torch.Tensor
    objective: float
    iterations: int
    converged: bool
    lam: float
    mu: float | None
    primal_residual: float
    dual_residual: float
    rank: int
    dual: torch.Tensor | None = None
    history: list[tuple[float, float]] = field(default_factory=list, repr=False)
    L_svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def L_blocks(self) -> tuple[torch.Tensor, ...]:
        """L split back into per-client blocks, each (d, p_k)."""
        return torch.split(self.L, list(self.block_sizes), dim=1)

    @property
    def S_blocks(self) -> tuple[torch.Tensor, ...]:
        """S split back into per-client blocks, each (d, p_k)."""
        return torch.split(self.S, list(self.block_sizes), dim=1)

    @property
    def num_clients(self) -> int:
        return len(self.block_sizes)


# --------------------------------------------------------------------------- proximal maps
def _block_index(block_sizes: Sequence[int], device: torch.device) -> torch.Tensor:
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
    U, s, Vh, _ = _svt_factors(X, tau, rank_hint)
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


def _svt_factors(X: torch.Tensor, tau: float, rank_hint: int | None = None, start: torch.Tensor | None = None,
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


# --------------------------------------------------------------------------- objective and lambda
def decomposition_objective(
    L: torch.Tensor,
    S: torch.Tensor,
    M: torch.Tensor,
    block_sizes: Sequence[int],
    lam: float,
    mu: float | None = None,
) -> float:
    """Objective of the exact (``mu=None``) or noisy form at (L, S); all matrices (d, n)."""
    idx = _block_index(block_sizes, M.device)
    return _objective(float(torch.linalg.matrix_norm(L, ord="nuc")), L, S, M, idx, len(block_sizes), lam, mu)


def _objective(nuc: float, L: torch.Tensor, S: torch.Tensor, M: torch.Tensor, idx: torch.Tensor, K: int,
               lam: float, mu: float | None) -> float:
    blk = float(block_frobenius_norms(S, idx, K).sum())
    if mu is None:
        return nuc + lam * blk
    return float(0.5 * torch.sum((M - L - S) ** 2)) + mu * (nuc + lam * blk)


def _rank_from_singular_values(s: torch.Tensor, dtype: torch.dtype) -> int:
    if s.numel() == 0 or s[0] == 0:
        return 0
    rtol = 1e-9 if dtype == torch.float64 else 1e-5
    return int((s > rtol * s[0]).sum())


def _numerical_rank(X: torch.Tensor) -> int:
    return _rank_from_singular_values(torch.linalg.svdvals(X), X.dtype)


def default_lambda(blocks: Any) -> float:
    """Theory-guided default block weight lam for K client blocks.

    Exact recovery needs lam inside a window (block Outlier Pursuit's dual certificate):

    * lam must exceed the benign blocks' share of the low-rank subgradient, about
      ``sqrt(r / |C|)``. Bounding the unknown shared rank r by the block rank p and taking
      |C| ~ K gives the scale ``lam_lo = sqrt(p / K)`` (the scale CLAIR.md asks for; with
      half the clients contaminated the share grows by sqrt(2), still inside the window
      below, and a scale rather than a strict bound since usually r < p);
    * lam times the spectral norm of the normalised contaminated blocks must stay below
      1. For up to K/2 generic contaminated d x p blocks that norm is about
      ``1/sqrt(p) + sqrt(K / (2 d))``, giving ``lam_hi = 1 / (1/sqrt(p) + sqrt(K/(2d)))``.

    The default is their geometric mean ``sqrt(lam_lo * lam_hi)``. p and d are
    *effective* sizes, so the value is invariant to zero padding and to orthonormal
    changes of basis, hence identical for a dense LoRA update and its factored reduction:
    p = the largest numerical rank of a client block, and d = ``max(rank(M), K p / 2)``,
    the observed rank of the stack or, when that is smaller, the span that K/2 generic
    contaminated blocks would occupy in a large ambient space (a conservative stand-in
    for the unknown ambient dimension, which the factored form does not see). Without
    that floor a clean federation would get lam_hi ~ lam_lo and a default at the lower
    edge of the window, flagging benign clients.

    Args:
        blocks: K matrices (d x p_k) or a (K, d, p) tensor.

    Returns:
        The default lam (a positive float).
    """
    mats = as_block_list(blocks, "blocks", same_width=False)
    return _default_lambda(mats, torch.linalg.svdvals(torch.cat(mats, dim=1)))


def _default_lambda(mats: list[torch.Tensor], stack_singular_values: torch.Tensor) -> float:
    K = len(mats)
    p_eff = max(max(_numerical_rank(m) for m in mats), 1)
    d_eff = max(_rank_from_singular_values(stack_singular_values, mats[0].dtype), K * p_eff / 2.0)
    lam_lo = math.sqrt(p_eff / K)
    lam_hi = 1.0 / (1.0 / math.sqrt(p_eff) + math.sqrt(K / (2.0 * d_eff)))
    return math.sqrt(lam_lo * lam_hi)


# --------------------------------------------------------------------------- solvers
def _solve_exact(M, idx, K, lam, max_iter, tol, init, progress, svd_rank_hint, spec=None):
    norm_M = float(torch.linalg.matrix_norm(M))
    if spec is None:
        spec = float(torch.linalg.matrix_norm(M, ord=2))
    if init is not None:
        L, S = init.L.clone(), init.S.clone()
        Y = init.dual.clone() if init.dual is not None else torch.zeros_like(M)
    else:
        L = torch.zeros_like(M)
        S = torch.zeros_like(M)
        # dual-feasible start (as in inexact ALM): Y = M / J(M), J = dual norm of the objective
        J = max(spec, float(block_frobenius_norms(M, idx, K).max()) / lam)
        Y = M / J
    rho = 1.25 / spec
    history: list[tuple[float, float]] = []
    converged = False
    rank = 0
    basis, gen = None, _svt_generator(M, svd_rank_hint)
    bar = _progress(progress, max_iter, "exact-form ADMM")
    it = 0
    for it in range(1, max_iter + 1):
        *L_svd, basis = _svt_factors(M - S + Y / rho, 1.0 / rho, svd_rank_hint and max(rank, svd_rank_hint), basis, gen)
        L, rank = (L_svd[0] * L_svd[1]) @ L_svd[2], int(L_svd[1].numel())
        S_prev = S
        S = block_soft_threshold(M - L + Y / rho, lam / rho, idx, K)
        R = M - L - S
        Y = Y + rho * R
        r_norm = float(torch.linalg.matrix_norm(R))
        s_norm = rho * float(torch.linalg.matrix_norm(S - S_prev))
        primal = r_norm / norm_M
        dual = s_norm / max(float(torch.linalg.matrix_norm(Y)), 1e-30)
        history.append((primal, dual))
        if bar is not None:
            bar.update(1)
        if primal < tol and dual < tol:
            converged = True
            break
        # residual balancing (Boyd et al. 2011, sec. 3.4.1); frozen late so ADMM's
        # fixed-penalty convergence guarantee applies
        if it < max_iter // 2:
            if r_norm > 10.0 * s_norm:
                rho *= 2.0
            elif s_norm > 10.0 * r_norm:
                rho /= 2.0
    if bar is not None:
        bar.close()
    primal, dual = history[-1]
    return L, S, Y, it, converged, primal, dual, history, tuple(L_svd)


def _solve_noisy(M, idx, K, lam, mu, max_iter, tol, init, progress, svd_rank_hint):
    def s_of(Lm: torch.Tensor) -> torch.Tensor:
        return block_soft_threshold(M - Lm, mu * lam, idx, K)

    def objective(Lm: torch.Tensor, nuc: float) -> float:
        Sm = s_of(Lm)
        blk = float(block_frobenius_norms(Sm, idx, K).sum())
        return 0.5 * float(torch.sum((M - Lm - Sm) ** 2)) + mu * (nuc + lam * blk)

    L = init.L.clone() if init is not None else torch.zeros_like(M)
    Z, t = L.clone(), 1.0
    nuc = float(torch.linalg.matrix_norm(L, ord="nuc")) if init is not None else 0.0
    f_prev = objective(L, nuc)
    scale = max(float(torch.linalg.matrix_norm(M)), 1e-30)
    history: list[tuple[float, float]] = []
    converged = False
    rank = 0
    basis, gen = None, _svt_generator(M, svd_rank_hint)
    bar = _progress(progress, max_iter, "noisy-form APG")
    it = 0
    for it in range(1, max_iter + 1):
        # gradient step of size 1 on the block-Huber term = S-update, then the prox of mu*||.||_*
        *svd, basis = _svt_factors(M - s_of(Z), mu, svd_rank_hint and max(rank, svd_rank_hint), basis, gen)
        L_new, rank, nuc = (svd[0] * svd[1]) @ svd[2], int(svd[1].numel()), float(svd[1].sum())
        step = float(torch.linalg.matrix_norm(L_new - L)) / scale
        f_new = objective(L_new, nuc)
        if f_new > f_prev:  # adaptive restart (O'Donoghue & Candes 2015): drop momentum
            t = 1.0
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        Z = L_new + ((t - 1.0) / t_next) * (L_new - L)
        L, t, f_prev, L_svd = L_new, t_next, f_new, svd
        history.append((0.0, step))
        if bar is not None:
            bar.update(1)
        if step < tol and it > 1:
            converged = True
            break
    if bar is not None:
        bar.close()
    S = s_of(L)
    return L, S, None, it, converged, 0.0, history[-1][1], history, tuple(L_svd)


def _svt_generator(M: torch.Tensor, svd_rank_hint: int | None) -> torch.Generator | None:
    # a private seeded stream: the randomized SVT is reproducible and leaves the global RNG alone
    return torch.Generator(device=M.device).manual_seed(0) if svd_rank_hint else None


def _progress(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def decompose(
    blocks: Any,
    lam: float | None = None,
    mu: float | None = None,
    *,
    max_iter: int = 5000,
    tol: float | None = None,
    init: Decomposition | None = None,
    svd_rank_hint: int | None = None,
    progress: bool = False,
) -> Decomposition:
    """Split stacked client blocks into low-rank L plus block-sparse S.

    Args:
        blocks: K client matrices (d x p_k; widths may differ) as torch tensors or numpy
            arrays, or a (K, d, p) tensor. CPU or CUDA, float32 or float64 (computation
            happens in the input's dtype/device; integers are promoted to float64).
        lam: block-sparsity weight; None -> :func:`default_lambda`.
        mu: None solves the exact form (L + S = M); a positive float solves the noisy form.
        max_iter: iteration cap.
        tol: stopping tolerance on the relative residuals; default 1e-9 in float64 and
            1e-5 in float32 (float32 round-off leaves a floor of a few 1e-6 under the
            residuals of stacks with hundreds of rows or more, so 1e-6 may never be met).
        init: a previous :class:`Decomposition` of the same shape to warm-start from (e.g.
            along a lam path).
        svd_rank_hint: expected rank of L; when far below min(d, n), SVT uses a randomized
            truncated SVD and falls back to a full SVD whenever the hint is too small.
        progress: show a tqdm bar over iterations.

    Returns:
        A :class:`Decomposition`.

    Raises:
        ValueError: bad shapes, NaN/Inf, fewer than 3 clients, non-positive lam/mu/tol.
    """
    mats = as_block_list(blocks, "blocks", same_width=False)
    M = torch.cat(mats, dim=1)
    sizes = tuple(int(m.shape[1]) for m in mats)
    K = len(sizes)
    stack_sv = None
    if lam is None:  # the stack's singular values give lam's effective sizes and the spectral norm
        stack_sv = torch.linalg.svdvals(M)
        lam = _default_lambda(mats, stack_sv)
    else:
        lam = check_positive(lam, "lam")
    if mu is not None:
        mu = check_positive(mu, "mu")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if tol is None:
        tol = 1e-9 if M.dtype == torch.float64 else 1e-5
    tol = check_positive(tol, "tol")
    if svd_rank_hint is not None and (isinstance(svd_rank_hint, bool) or not isinstance(svd_rank_hint, int) or svd_rank_hint < 1):
        raise ValueError(f"svd_rank_hint must be a positive int or None, got {svd_rank_hint!r}")
    if init is not None:
        if not isinstance(init, Decomposition):
            raise TypeError(f"init must be a Decomposition or None, got {type(init).__name__}")
        if init.block_sizes != sizes or init.L.shape != M.shape:
            raise ValueError(f"init has shape {tuple(init.L.shape)} / blocks {init.block_sizes}, expected {tuple(M.shape)} / {sizes}")
        init = Decomposition(**{**init.__dict__, "L": init.L.to(M), "S": init.S.to(M),
                                "dual": None if init.dual is None else init.dual.to(M)})
    idx = _block_index(sizes, M.device)
    if float(torch.linalg.matrix_norm(M)) == 0.0:
        zero = torch.zeros_like(M)
        return Decomposition(zero, zero.clone(), sizes, torch.zeros(K, dtype=M.dtype, device=M.device),
                             0.0, 0, True, lam, mu, 0.0, 0.0, 0, None, [],
                             L_svd=(zero[:, :0], zero[0, :0], zero[:0, :]))
    if mu is None:
        spec = None if stack_sv is None else float(stack_sv[0])
        L, S, Y, it, conv, primal, dual, hist, L_svd = _solve_exact(M, idx, K, lam, max_iter, tol, init, progress,
                                                                     svd_rank_hint, spec)
    else:
        L, S, Y, it, conv, primal, dual, hist, L_svd = _solve_noisy(M, idx, K, lam, mu, max_iter, tol, init, progress,
                                                                     svd_rank_hint)
    return Decomposition(
        L=L,
        S=S,
        block_sizes=sizes,
        block_norms=block_frobenius_norms(S, idx, K),
        objective=_objective(float(L_svd[1].sum()), L, S, M, idx, K, lam, mu),
        iterations=it,
        converged=conv,
        lam=lam,
        mu=mu,
        primal_residual=primal,
        dual_residual=dual,
        rank=_rank_from_singular_values(L_svd[1], L.dtype),
        dual=Y,
        history=hist,
        L_svd=L_svd,
    )


# --------------------------------------------------------------------------- choosing lambda
@dataclass
class LambdaPath:
    """Decompositions along a grid of lam values and the stability-based choice.

    Attributes:
        grid: lam values, increasing.
        flagged: per lam, the tuple of clients whose relative block norm exceeds the
            threshold.
        ranks: numerical rank of L per lam.
        chosen: the selected lam.
        chosen_index: its position in ``grid``.
    """

    grid: list[float]
    flagged: list[tuple[int, ...]]
    ranks: list[int]
    chosen: float
    chosen_index: int


def select_lambda(
    blocks: Any,
    grid: Sequence[float] | None = None,
    *,
    mu: float | None = None,
    threshold: float = 0.5,
    min_run: int = 3,
    **solver_options: Any,
) -> LambdaPath:
    """Choose lam from the data by stability of the flagged set along a lam path.

    Small lam sends everything to S (every client flagged, L = 0); large lam sends
    everything to L (nobody flagged, L not low-rank). In between, when the low-rank +
    block-sparse model fits, the flagged set stays constant over a range of lam. We solve
    along ``grid`` (warm-started) and return the centre (in log-lam) of the longest run of
    identical flagged sets that are neither empty nor every client (ties: the run that
    contains :func:`default_lambda`'s value, then the smaller lam). If no such run spans at
    least ``min_run`` grid points there is no stable contaminated set — typically there is
    no contamination — and the theory default is returned (``chosen_index`` then points at
    the grid value closest to it).

    Args:
        blocks: K client matrices or a (K, d, p) tensor.
        grid: increasing lam values; default 25 values log-spaced over
            [0.1, 10] x default_lambda.
        mu: None (exact form) or the noise weight.
        threshold: relative block norm ||S_k||_F / ||M_k||_F above which a client counts
            as flagged (same rule as :func:`fedlora_lite.clair.clair`).
        **solver_options: passed to :func:`decompose`.

    Returns:
        A :class:`LambdaPath`.
    """
    mats = as_block_list(blocks, "blocks", same_width=False)
    lam0 = default_lambda(mats)
    if grid is None:
        grid = [lam0 * 10 ** (e / 12) for e in range(-12, 13)]
    grid = [check_positive(g, "grid") for g in grid]
    if len(grid) < 3 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError("grid must hold at least 3 strictly increasing lam values")
    threshold = check_positive(threshold, "threshold")
    if isinstance(min_run, bool) or not isinstance(min_run, int) or min_run < 1:
        raise ValueError(f"min_run must be a positive int, got {min_run!r}")
    block_norm_M = torch.stack([torch.linalg.matrix_norm(m) for m in mats])
    flagged: list[tuple[int, ...]] = []
    ranks: list[int] = []
    prev = None
    for lam in grid:
        dec = decompose(mats, lam=lam, mu=mu, init=prev, **solver_options)
        prev = dec
        rel = dec.block_norms / torch.clamp(block_norm_M, min=torch.finfo(block_norm_M.dtype).tiny)
        flagged.append(tuple(int(i) for i in torch.nonzero(rel > threshold).flatten()))
        ranks.append(dec.rank)
    K = len(mats)
    runs: list[tuple[int, int]] = []  # [start, end] inclusive, over admissible lam only
    start = None
    for i, f in enumerate(flagged):
        ok = 0 < len(f) < K and ranks[i] > 0
        if ok and start is not None and f == flagged[start]:
            continue
        if start is not None:
            runs.append((start, i - 1))
        start = i if ok else None
    if start is not None:
        runs.append((start, len(grid) - 1))
    runs = [(a, b) for a, b in runs if b - a + 1 >= min_run]
    if not runs:
        nearest = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / lam0)))
        return LambdaPath(list(grid), flagged, ranks, lam0, nearest)

    def key(run: tuple[int, int]) -> tuple[int, int, int]:
        a, b = run
        return (b - a, int(grid[a] <= lam0 <= grid[b]), -a)

    a, b = max(runs, key=key)
    mid = (a + b) // 2
    chosen = math.sqrt(grid[a] * grid[b]) if (b - a) % 2 else grid[mid]
    return LambdaPath(list(grid), flagged, ranks, chosen, mid)
