"""The two iterative solvers behind :func:`fedlora_lite.core.decomposition.decompose`.

* exact form ``min ||L||_* + lam sum_k ||S_k||_F  s.t. L + S = M``: ADMM with residual
  balancing (Boyd et al. 2011, sec. 3.4.1), singular value thresholding for L and block
  soft-thresholding for S, started from a dual-feasible multiplier as in inexact ALM;
* noisy form ``min 1/2 ||M - L - S||_F^2 + mu (||L||_* + lam sum_k ||S_k||_F)``:
  accelerated proximal gradient (FISTA with adaptive restart, O'Donoghue & Candes 2015)
  on L alone. S is minimised in closed form (block soft-thresholding of M - L), which
  leaves a smooth block-Huber term with a 1-Lipschitz gradient, so the step is exactly 1.

Both take a :class:`Stack` (the d x n matrix with its block structure) and
:class:`SolverOptions`, and return a :class:`SolverRun`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .prox import block_frobenius_norms, block_index, block_soft_threshold, svt_factors

__all__ = ["Stack", "SolverOptions", "SolverRun", "solve_exact", "solve_noisy"]


@dataclass(frozen=True)
class Stack:
    """The stacked client blocks M = [M_1, ..., M_K] (d x n) and their column structure."""

    M: torch.Tensor
    block_sizes: tuple[int, ...]
    index: torch.Tensor  # (n,) block id of every column

    @classmethod
    def of(cls, M: torch.Tensor, block_sizes: tuple[int, ...]) -> Stack:
        return cls(M, block_sizes, block_index(block_sizes, M.device))

    @property
    def K(self) -> int:
        return len(self.block_sizes)

    def block_norms(self, X: torch.Tensor) -> torch.Tensor:
        return block_frobenius_norms(X, self.index, self.K)

    def shrink_blocks(self, X: torch.Tensor, tau: float) -> torch.Tensor:
        return block_soft_threshold(X, tau, self.index, self.K)


@dataclass(frozen=True)
class SolverOptions:
    """Iteration cap, tolerance on the relative residuals, SVT rank hint, progress bar."""

    max_iter: int
    tol: float
    svd_rank_hint: int | None = None
    progress: bool = False


@dataclass
class SolverRun:
    """What a solver returns: the pair (L, S), the multiplier (exact form) and diagnostics.

    ``L_svd`` is the compact SVD (U, s, Vh) of L from the last thresholding step.
    """

    L: torch.Tensor
    S: torch.Tensor
    dual: torch.Tensor | None
    iterations: int
    converged: bool
    primal_residual: float
    dual_residual: float
    history: list[tuple[float, float]] = field(default_factory=list)
    L_svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class _Iterations:
    """Iteration loop helper: SVT warm start + private RNG stream + optional tqdm bar."""

    def __init__(self, M: torch.Tensor, options: SolverOptions, desc: str):
        self.options = options
        self.rank = 0
        self.basis: torch.Tensor | None = None
        # a private seeded stream: the randomized SVT is reproducible and leaves the global RNG alone
        self.gen = torch.Generator(device=M.device).manual_seed(0) if options.svd_rank_hint else None
        self.bar: Any = None
        if options.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=options.max_iter, desc=desc, leave=False)

    def svt(self, X: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hint = self.options.svd_rank_hint and max(self.rank, self.options.svd_rank_hint)
        U, s, Vh, self.basis = svt_factors(X, tau, hint, self.basis, self.gen)
        self.rank = int(s.numel())
        return U, s, Vh

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def solve_exact(stack: Stack, lam: float, options: SolverOptions, init: Any = None,
                spectral_norm: float | None = None) -> SolverRun:
    """ADMM for the exact form (see the module docstring).

    Args:
        stack: the stacked blocks.
        lam: block weight.
        options: iteration settings.
        init: a previous decomposition (``L``, ``S``, ``dual`` attributes) to warm-start from.
        spectral_norm: ||M||_2 if already known (spares one SVD).
    """
    M = stack.M
    norm_M = float(torch.linalg.matrix_norm(M))
    spec = float(torch.linalg.matrix_norm(M, ord=2)) if spectral_norm is None else spectral_norm
    if init is not None:
        L, S = init.L.clone(), init.S.clone()
        Y = init.dual.clone() if init.dual is not None else torch.zeros_like(M)
    else:
        L, S = torch.zeros_like(M), torch.zeros_like(M)
        # dual-feasible start (as in inexact ALM): Y = M / J(M), J = dual norm of the objective
        Y = M / max(spec, float(stack.block_norms(M).max()) / lam)
    rho = 1.25 / spec
    run = SolverRun(L, S, Y, 0, False, 1.0, 1.0)
    loop = _Iterations(M, options, "exact-form ADMM")
    for it in range(1, options.max_iter + 1):
        U, s, Vh = loop.svt(M - S + Y / rho, 1.0 / rho)
        L = (U * s) @ Vh
        S_prev = S
        S = stack.shrink_blocks(M - L + Y / rho, lam / rho)
        R = M - L - S
        Y = Y + rho * R
        r_norm = float(torch.linalg.matrix_norm(R))
        s_norm = rho * float(torch.linalg.matrix_norm(S - S_prev))
        primal, dual = r_norm / norm_M, s_norm / max(float(torch.linalg.matrix_norm(Y)), 1e-30)
        run.history.append((primal, dual))
        loop.tick()
        run.iterations, run.L_svd = it, (U, s, Vh)
        if primal < options.tol and dual < options.tol:
            run.converged = True
            break
        # residual balancing, frozen late so ADMM's fixed-penalty convergence guarantee applies
        if it < options.max_iter // 2:
            if r_norm > 10.0 * s_norm:
                rho *= 2.0
            elif s_norm > 10.0 * r_norm:
                rho /= 2.0
    loop.close()
    run.L, run.S, run.dual = L, S, Y
    run.primal_residual, run.dual_residual = run.history[-1]
    return run


def solve_noisy(stack: Stack, lam: float, mu: float, options: SolverOptions, init: Any = None) -> SolverRun:
    """Accelerated proximal gradient for the noisy form (see the module docstring)."""
    M = stack.M

    def s_of(Lm: torch.Tensor) -> torch.Tensor:
        return stack.shrink_blocks(M - Lm, mu * lam)

    def objective(Lm: torch.Tensor, nuc: float) -> float:
        Sm = s_of(Lm)
        return 0.5 * float(torch.sum((M - Lm - Sm) ** 2)) + mu * (nuc + lam * float(stack.block_norms(Sm).sum()))

    L = init.L.clone() if init is not None else torch.zeros_like(M)
    Z, t = L.clone(), 1.0
    f_prev = objective(L, float(torch.linalg.matrix_norm(L, ord="nuc")) if init is not None else 0.0)
    scale = max(float(torch.linalg.matrix_norm(M)), 1e-30)
    run = SolverRun(L, L, None, 0, False, 0.0, 1.0)
    loop = _Iterations(M, options, "noisy-form APG")
    for it in range(1, options.max_iter + 1):
        # gradient step of size 1 on the block-Huber term = S-update, then the prox of mu*||.||_*
        U, s, Vh = loop.svt(M - s_of(Z), mu)
        L_new = (U * s) @ Vh
        step = float(torch.linalg.matrix_norm(L_new - L)) / scale
        f_new = objective(L_new, float(s.sum()))
        if f_new > f_prev:  # adaptive restart: drop momentum
            t = 1.0
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        Z = L_new + ((t - 1.0) / t_next) * (L_new - L)
        L, t, f_prev = L_new, t_next, f_new
        run.history.append((0.0, step))
        run.iterations, run.L_svd = it, (U, s, Vh)
        loop.tick()
        if step < options.tol and it > 1:
            run.converged = True
            break
    loop.close()
    run.L, run.S = L, s_of(L)
    run.dual_residual = run.history[-1][1]
    return run
