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

This is the block version of Outlier Pursuit (Xu, Caramanis & Sanghavi, 2012). The solvers
live in :mod:`fedlora_lite.core.solvers`, the proximal maps in :mod:`fedlora_lite.core.prox`.
Everything is plain torch on whatever device the input lives on; blocks may have different
widths (needed by the LoRA-factored form, where client k contributes r_k columns). The
default lam (:func:`default_lambda`) is a property of the program (the window of its
dual certificate), not a CLAIR rule; choosing lam from data is
:func:`fedlora_lite.clair.select_lambda`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .prox import block_frobenius_norms, block_index
from .solvers import SolverOptions, Stack, solve_exact, solve_noisy
from .validation import as_block_list, check_positive

__all__ = ["Decomposition", "decompose", "default_lambda", "decomposition_objective", "numerical_rank"]


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
    idx = block_index(block_sizes, M.device)
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


def numerical_rank(X: torch.Tensor) -> int:
    """Number of singular values above 1e-9 (float64) / 1e-5 (float32) times the largest."""
    return _rank_from_singular_values(torch.linalg.svdvals(X), X.dtype)


def default_lambda(blocks: Any) -> float:
    """Theory-guided default block weight lam for K client blocks.

    Exact recovery needs lam inside a window (block Outlier Pursuit's dual certificate):

    * lam must exceed the benign blocks' share of the low-rank subgradient, about
      ``sqrt(r / |C|)``. Bounding the unknown shared rank r by the block rank p and taking
      |C| ~ K gives the scale ``lam_lo = sqrt(p / K)`` (the scale ``docs/CLAIR.md`` asks for; with
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
    p_eff = max(max(numerical_rank(m) for m in mats), 1)
    d_eff = max(_rank_from_singular_values(stack_singular_values, mats[0].dtype), K * p_eff / 2.0)
    lam_lo = math.sqrt(p_eff / K)
    lam_hi = 1.0 / (1.0 / math.sqrt(p_eff) + math.sqrt(K / (2.0 * d_eff)))
    return math.sqrt(lam_lo * lam_hi)



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
    stack = Stack.of(M, sizes)
    if float(torch.linalg.matrix_norm(M)) == 0.0:
        zero = torch.zeros_like(M)
        return Decomposition(L=zero, S=zero.clone(), block_sizes=sizes, block_norms=torch.zeros(K, dtype=M.dtype, device=M.device),
                             objective=0.0, iterations=0, converged=True, lam=lam, mu=mu, primal_residual=0.0,
                             dual_residual=0.0, rank=0, L_svd=(zero[:, :0], zero[0, :0], zero[:0, :]))
    options = SolverOptions(max_iter=max_iter, tol=tol, svd_rank_hint=svd_rank_hint, progress=progress)
    if mu is None:
        spec = None if stack_sv is None else float(stack_sv[0])
        run = solve_exact(stack, lam, options, init, spec)
    else:
        run = solve_noisy(stack, lam, mu, options, init)
    return Decomposition(
        L=run.L,
        S=run.S,
        block_sizes=sizes,
        block_norms=stack.block_norms(run.S),
        objective=_objective(float(run.L_svd[1].sum()), run.L, run.S, M, stack.index, K, lam, mu),
        iterations=run.iterations,
        converged=run.converged,
        lam=lam,
        mu=mu,
        primal_residual=run.primal_residual,
        dual_residual=run.dual_residual,
        rank=_rank_from_singular_values(run.L_svd[1], M.dtype),
        dual=run.dual,
        history=run.history,
        L_svd=run.L_svd,
    )
