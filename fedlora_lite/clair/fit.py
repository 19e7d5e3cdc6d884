"""ONE CLAIR fit for one module, used by the dense and by the LoRA-factored path.

A :class:`Problem` is what the solver sees: K blocks plus the dense shape (d, p) of one
client update. Dense updates give their own blocks (d x p); LoRA factors give the exact
reduced blocks (q x t_k) of :func:`fedlora_lite.core.reduction.reduce_pairs`, together with
the basis Q that lifts a reduced subspace back to R^d. :func:`fit_problem` then runs the
same steps on either:

1. **Robust normalisation (ours).** Client norms ||M_k||_F are computed overflow-safely,
   the stack is divided by their median (so flags and iteration counts do not depend on
   the units: the exact program is scale-equivariant, and real LoRA updates have entries
   of 1e-2 to 1e-4), and every block is clipped to ``clip`` times that median, so one
   client scaled by 1e30 can neither overflow the solver nor dominate the stack.
2. (optional) the mu estimate, the decomposition, the rank, the energies that give the
   scores.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..core.decomposition import Decomposition, decompose
from ..core.reduction import FactoredReduction, Pair, as_factor_pairs, oriented, reduce_pairs
from ..core.validation import as_update_stack
from .config import ClairConfig
from .rules import choose_rank, estimate_mu, padded, singular_vectors_of_L

__all__ = ["AUTO_RANK_HINT_MIN", "Problem", "ModuleFit", "dense_problem", "factored_problem", "fit_problem"]

AUTO_RANK_HINT_MIN = 256
"""Reduced problems at least this large on their smaller side use the randomized SVT by default."""


@dataclass
class Problem:
    """One module's CLAIR problem in the working orientation (``side`` applied).

    Attributes:
        blocks: the solver's K blocks: dense (d, p) updates, or reduced (q, t_k) blocks.
        shape: (d, p) of one dense client update.
        name: label used in messages (the argument name, e.g. ``updates_by_module['v']``).
        stack: (K, d, p) dense updates (dense path only).
        pairs: the oriented factor pairs (factored path only).
        reduction: the exact reduction (factored path only).
    """

    blocks: list[torch.Tensor]
    shape: tuple[int, int]
    name: str
    stack: torch.Tensor | None = None
    pairs: list[Pair] | None = None
    reduction: FactoredReduction | None = None
    scale: float = 1.0
    norms: torch.Tensor | None = None
    multipliers: torch.Tensor | None = None
    solver_blocks: list[torch.Tensor] | None = None

    def normalise(self, clip: float | None) -> None:
        """Fill ``norms``, ``scale``, ``multipliers`` and ``solver_blocks`` (see the module docstring)."""
        self.norms = client_norms(self.blocks)
        pos = self.norms[self.norms > 0]
        self.scale = float(pos.median()) if pos.numel() else 1.0
        mult = torch.ones_like(self.norms)
        if clip is not None:
            mult = torch.where(self.norms > clip * self.scale, clip * self.scale / torch.clamp(self.norms, min=1e-300), mult)
        self.multipliers = mult
        self.solver_blocks = [b * (float(m) / self.scale) for b, m in zip(self.blocks, mult)]

    @property
    def num_clients(self) -> int:
        return len(self.blocks)

    @property
    def factored(self) -> bool:
        return self.reduction is not None

    def block_ranks(self) -> list[int]:
        """Inner width of every client's block (r_k on the factored path, p when dense)."""
        return [int(b.shape[1]) for b in self.blocks]

    def lift(self, basis: torch.Tensor) -> torch.Tensor:
        """A subspace basis in the blocks' coordinates -> (d, r) in R^d."""
        return basis if self.reduction is None else self.reduction.Q @ basis


def client_norms(blocks: list[torch.Tensor]) -> torch.Tensor:
    """(K,) Frobenius norms as float64 on the CPU, without overflow (each block scaled by its max first)."""
    out = []
    for b in blocks:
        a = float(b.abs().max()) if b.numel() else 0.0
        out.append(0.0 if a == 0.0 else a * float(torch.linalg.matrix_norm((b / a).double())))
    return torch.tensor(out, dtype=torch.float64)


def dense_problem(updates: Any, name: str, side: str) -> Problem:
    """Validate K dense updates (K matrices or a (K, d, p) tensor) into a :class:`Problem`."""
    M = as_update_stack(updates, name)
    if side == "row":
        M = M.transpose(1, 2).contiguous()
    return Problem(list(M), (int(M.shape[1]), int(M.shape[2])), name, stack=M)


def factored_problem(factors: Any, name: str, side: str, scaling: Any = None) -> Problem:
    """Validate K LoRA pairs (B_k, A_k) and reduce them exactly into a :class:`Problem`."""
    pairs = oriented(as_factor_pairs(factors, name, scaling), side)
    red = reduce_pairs(pairs)
    return Problem(list(red.blocks), red.shape, name, pairs=pairs, reduction=red)


@dataclass
class ModuleFit:
    """What one fit produces (see :func:`fit_problem`).

    Attributes:
        decomposition: of the solver's blocks, i.e. of the normalised, clipped stack
            (reduced blocks on the factored path: its objective, block norms and lam are the
            dense program's); None once dropped (streamed modules keep only the small state).
            ``objective``, ``mu`` and ``singular_values`` below are in the updates' units.
        subspace: (d, r) orthonormal basis of the shared subspace in R^d.
        rank: r.
        singular_values: of L-hat, zero-padded to the dense length min(d, K p).
        sparse_sq, total_sq: (K,) ||S_k||_F^2 and ||M_k||_F^2.
        mu: the noise weight used (None = exact form).
        scale: the median client norm the stack was divided by.
        multipliers: (K,) norm-clipping factors min(1, clip * scale / ||M_k||).
        shape: (d, p) of one dense client update (working orientation).
        name: the problem's label.
    """

    decomposition: Decomposition | None
    subspace: torch.Tensor
    rank: int
    singular_values: torch.Tensor
    sparse_sq: torch.Tensor
    total_sq: torch.Tensor
    mu: float | None
    shape: tuple[int, int]
    name: str
    lam: float
    objective: float
    iterations: int
    converged: bool
    scale: float = 1.0
    multipliers: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    block_rows: int = 0
    block_widths: tuple[int, ...] = ()


def _check_rank(cfg: ClairConfig, problem: Problem, side: str) -> None:
    (d, p), K = problem.shape, problem.num_clients
    dmax = min(d, K * p)
    if cfg.rank != "auto" and cfg.rank > dmax:
        raise ValueError(f"rank must be 'auto' or an int in [1, {dmax}] (min(d, K*p) on the {side} side), got {cfg.rank!r}")
    if problem.reduction is not None and cfg.rank != "auto" and cfg.rank > problem.reduction.q:
        raise ValueError(f"rank={cfg.rank} exceeds q={problem.reduction.q}, the dimension of span[B_1 ... B_K]: directions "
                         "beyond it carry no data (the dense path would pad with arbitrary null-space vectors)")
    if cfg.max_rank is not None and cfg.max_rank > dmax:
        raise ValueError(f"max_rank must be None or an int in [1, {dmax}], got {cfg.max_rank!r}")


def _solver_options(cfg: ClairConfig, problem: Problem, progress: bool) -> dict[str, Any]:
    hint = cfg.svd_rank_hint
    if hint == "auto":
        hint = None
        if problem.reduction is not None:
            sizes = [int(b.shape[1]) for b in problem.blocks]
            if min(problem.reduction.q, sum(sizes)) >= AUTO_RANK_HINT_MIN:
                # large reduced problem: randomized truncated SVT (full-SVD fallback when the hint is low)
                hint = max(sizes)
    return {"max_iter": cfg.max_iter, "tol": cfg.tol, "svd_rank_hint": hint, "progress": progress}


def fit_problem(problem: Problem, cfg: ClairConfig, *, progress: bool = False) -> ModuleFit:
    """Decompose one module's blocks and read off the shared subspace, its rank and the energies.

    Steps: with ``mu="auto"`` an exact-form fit first and :func:`~fedlora_lite.clair.rules.estimate_mu`
    (warm start for the noisy fit); the decomposition; the rank (given, or from L-hat's
    spectrum zero-padded to the dense length, so both paths see the dense spectrum); the
    subspace lifted to R^d; ||S_k||^2 and ||M_k||^2 per client.
    """
    _check_rank(cfg, problem, cfg.side)
    opts = _solver_options(cfg, problem, progress)
    (d, p), K = problem.shape, problem.num_clients
    problem.normalise(cfg.clip)
    blocks = problem.solver_blocks
    mu = cfg.mu if not isinstance(cfg.mu, float | int) else float(cfg.mu) / problem.scale
    if mu == "auto":
        dec0 = decompose(blocks, lam=cfg.lam, **opts)
        mu = estimate_mu(blocks, dec0, problem.shape, rank=cfg.rank, max_rank=cfg.max_rank)
        opts["init"] = dec0
    dec = decompose(blocks, lam=cfg.lam, mu=mu, **opts)
    U_all, s = singular_vectors_of_L(dec)
    s_full = padded(s, min(d, K * p))
    r = choose_rank(s_full, max_rank=cfg.max_rank) if cfg.rank == "auto" else cfg.rank
    if r > U_all.shape[1]:
        U_all, _ = singular_vectors_of_L(dec, r)
    if r == 0:
        warnings.warn(f"{problem.name}: the low-rank part is zero (lam={dec.lam:.3g} too small?); the shared subspace "
                      "is empty", RuntimeWarning, stacklevel=4)
    # energies in the original units of the (clipped) updates, float64: pooled over modules
    # they weight a module by how much of the update it carries
    scale2 = problem.scale**2
    sparse_sq = torch.stack([b.double().pow(2).sum() for b in dec.S_blocks]).cpu() * scale2
    total_sq = torch.stack([b.double().pow(2).sum() for b in blocks]).cpu() * scale2
    if not (bool(torch.isfinite(sparse_sq).all()) and bool(torch.isfinite(dec.L).all())):
        raise FloatingPointError(f"{problem.name}: the decomposition produced non-finite values; the updates span too "
                                 "many orders of magnitude for their dtype (pass float64)")
    return ModuleFit(decomposition=dec, subspace=problem.lift(U_all[:, :r]), rank=r, singular_values=s_full * problem.scale,
                     sparse_sq=sparse_sq, total_sq=total_sq, mu=None if dec.mu is None else dec.mu * problem.scale,
                     shape=problem.shape, name=problem.name, lam=dec.lam,
                     objective=dec.objective * (problem.scale if dec.mu is None else scale2),
                     iterations=dec.iterations, converged=dec.converged, scale=problem.scale,
                     multipliers=problem.multipliers, norms=problem.norms, block_rows=int(blocks[0].shape[0]),
                     block_widths=tuple(int(b.shape[1]) for b in blocks))
