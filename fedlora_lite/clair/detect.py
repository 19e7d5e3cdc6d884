"""CLAIR's data-driven flag rule (``threshold="auto"``, ours): leave-one-out residuals against a core.

The paper flags client k when its block-sparse share ||S_k||_F / ||M_k||_F is large. On
real LoRA updates no single threshold works: benign updates are never exactly low rank,
so their share depends on how noisy and how heterogeneous the clients are (0.3-0.7 on the
copy task, while contaminated clients sit at 0.75-0.95). What *is* stable is the order.
This rule (our own; ``threshold=<float>`` keeps the paper's fixed rule) reads the cut from
the data:

1. **Core.** The ``K - floor(K/2)`` clients with the lowest decomposition scores: a
   majority, so benign as long as fewer than half of the clients are contaminated.
2. **Leave-one-out residuals.** For every client k and rank r = 1..R, the fraction of its
   update outside the top-r left singular subspace of the core's stack *without k*,
   ``rho_k(r) = ||(I - U_r U_r^T) M_k||_F / ||M_k||_F`` (energies pooled over modules).
   Leaving k out makes a benign client's own estimation noise count against it exactly as
   a contaminated client's is counted, so benign residuals are tight and comparable.
3. **Stable split.** At every r, the largest gap in the sorted residuals with at most
   ``floor(K/2)`` clients above it; the flagged set is the split that stays the same over the
   longest run of consecutive ranks (at least ``min_run``), like stability selection along
   a model-size path (Meinshausen & Buhlmann 2010).
4. **Refit the core** on the unflagged clients and repeat once; then refine the split by
   2-means on the residuals averaged over the run (the largest gap can fall inside the
   contaminated group).
5. **Guard.** A split is accepted only if the flagged clients' median residual is at least
   ``guard`` times the core's (:data:`DEFAULT_GUARD`, calibrated on seeds disjoint from every
   reported result by ``benchmarks/calibrate_guard.py``); otherwise nobody is flagged.
   Without contamination the largest gap separates benign clients that differ a little,
   and this ratio stays small.

Cost: K SVDs of the core's stack per module (reduced blocks on the factored path, where
the residuals are the dense ones exactly), independent of the solver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_GUARD", "DetectionReport", "loo_residuals", "stable_split", "auto_flags"]

DEFAULT_GUARD = 1.35
"""Default guard ratio of :func:`auto_flags` (see ``benchmarks/calibrate_guard.py``)."""


@dataclass(kw_only=True)
class DetectionReport:
    """How :func:`auto_flags` reached its decision (kept on the results for inspection and plots).

    Attributes:
        flags: (K,) bool, the decision.
        core: (K,) bool, the core the final residuals were measured against.
        ranks: the rank path r = 1..R.
        residuals: (R, K) leave-one-out residual fractions rho_k(r) (final iteration).
        run: (first, last) index into ``ranks`` of the stable run, or None.
        ratio: median residual of the split's upper group over the core's, on the run.
        guard: the guard ratio used.
        accepted: whether the split passed the guard.
    """

    flags: torch.Tensor
    core: torch.Tensor
    ranks: list[int]
    residuals: torch.Tensor
    run: tuple[int, int] | None
    ratio: float
    guard: float
    accepted: bool


def loo_residuals(modules: Iterable[Sequence[torch.Tensor]], core: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Pooled leave-one-out residual fractions rho_k(r) of every client against the core.

    Args:
        modules: per module, K blocks (rows x p_k; the same K everywhere); any iterable,
            read once (a streamed model yields one module at a time).
        core: (K,) bool mask of the core (at least 2 clients).
        ranks: increasing ranks r >= 1.

    Returns:
        (len(ranks), K) float64 CPU tensor of residual fractions in [0, 1].
    """
    K = int(core.numel())
    resid = torch.zeros(len(ranks), K, dtype=torch.float64)
    total = torch.zeros(K, dtype=torch.float64)
    idx = torch.tensor(list(ranks)) - 1
    for blocks in modules:
        for k in range(K):
            others = [blocks[j] for j in range(K) if bool(core[j]) and j != k]
            U = torch.linalg.svd(torch.cat(others, dim=1), full_matrices=False)[0]
            energy = (U.T @ blocks[k]).pow(2).sum(dim=1).double().cpu()  # energy along each direction
            cum = torch.cumsum(energy, 0)
            tot = float(blocks[k].double().pow(2).sum())
            explained = cum[torch.clamp(idx, max=cum.numel() - 1)]
            resid[:, k] += torch.clamp(tot - explained, min=0.0)
            total[k] += tot
    return (resid / torch.clamp(total, min=torch.finfo(torch.float64).tiny)).sqrt()


def _gap_split(s: torch.Tensor) -> tuple[tuple[int, ...], float]:
    K = s.numel()
    order = torch.argsort(s)
    ss = s[order]
    best, m_best = -1.0, 1
    for m in range(1, K // 2 + 1):  # m clients above the gap: at most half
        g = float(ss[K - m] - ss[K - m - 1])
        if g > best:
            best, m_best = g, m
    return tuple(sorted(int(i) for i in order[K - m_best:])), best


def stable_split(path: torch.Tensor, *, min_run: int = 3) -> tuple[tuple[int, ...], tuple[int, int] | None]:
    """The gap split that stays the same over the longest run of rows of ``path`` (R, K).

    Returns:
        (flagged indices, (first, last) row of the run); ``((), None)`` when no split is
        stable over ``min_run`` consecutive rows. Ties: the larger mean gap.
    """
    splits = [_gap_split(row) for row in path]
    best: tuple[tuple[int, float], tuple[int, ...], tuple[int, int]] | None = None
    i = 0
    while i < len(splits):
        j = i
        while j + 1 < len(splits) and splits[j + 1][0] == splits[i][0]:
            j += 1
        key = (j - i + 1, sum(splits[t][1] for t in range(i, j + 1)) / (j - i + 1))
        if best is None or key > best[0]:
            best = (key, splits[i][0], (i, j))
        i = j + 1
    if best is None or best[0][0] < min_run:
        return (), None
    return best[1], best[2]


def _two_means(x: torch.Tensor, flagged: tuple[int, ...], max_iter: int = 20) -> torch.Tensor:
    """Refine a split of 1-D values by 2-means with medians (at most half the clients above the cut).

    The largest gap can fall *inside* the contaminated group (two corrupted clients far
    out, a third one nearer); re-assigning each client to the nearer group median fixes that.
    """
    K = x.numel()
    up = torch.zeros(K, dtype=torch.bool)
    up[list(flagged)] = True
    for _ in range(max_iter):
        cut = 0.5 * (float(x[~up].median()) + float(x[up].median()))
        new = x > cut
        if int(new.sum()) == 0 or int(new.sum()) > K // 2 or bool((new == up).all()):
            break
        up = new
    return up


def auto_flags(modules: Callable[[], Iterable[Sequence[torch.Tensor]]], scores: torch.Tensor, *, room: int,
               max_rank: int = 12, min_run: int = 3, guard: float = DEFAULT_GUARD, iterations: int = 2,
               floor: float = 1e-6) -> DetectionReport:
    """The data-driven flag rule (see the module docstring).

    Args:
        modules: a callable returning, each time, an iterable over modules of the K
            (normalised) blocks the decomposition saw (called once per core refit).
        room: the largest useful rank (the smallest, over modules, of the block rows and of
            the core's columns without its widest client).
        scores: (K,) the decomposition's joint scores (they only choose the first core).
        max_rank: longest rank path.
        min_run: shortest stable run.
        guard: minimum residual ratio of the flagged group over the core.
        iterations: core refits.
        floor: residual fractions below it count as zero (round-off; ~1e-3 for float32 data).

    Returns:
        A :class:`DetectionReport`.
    """
    K = int(scores.numel())
    core = torch.zeros(K, dtype=torch.bool)
    core[torch.argsort(scores.double().cpu())[: K - K // 2]] = True
    ranks = list(range(1, max(1, min(max_rank, room)) + 1))
    flagged: tuple[int, ...] = ()
    run = None
    resid = torch.zeros(len(ranks), K, dtype=torch.float64)
    for _ in range(max(1, iterations)):
        resid = loo_residuals(modules(), core, ranks)
        flagged, run = stable_split(resid, min_run=min_run)
        new_core = torch.ones(K, dtype=torch.bool)
        new_core[list(flagged)] = False
        if not flagged or bool((new_core == core).all()) or int(new_core.sum()) < 2:
            break
        core = new_core
    ratio = 1.0
    if flagged and run is not None:
        mid = resid[run[0] : run[1] + 1].mean(dim=0)
        up = _two_means(mid, flagged)
        flagged = tuple(int(i) for i in torch.nonzero(up).flatten())
        # residual fractions below the round-off floor count as zero: an exactly low-rank
        # federation has nothing to flag
        ratio = float(max(mid[up].median(), floor) / max(mid[~up].median(), floor))
    accepted = bool(flagged) and ratio >= guard
    flags = torch.zeros(K, dtype=torch.bool)
    if accepted:
        flags[list(flagged)] = True
    return DetectionReport(flags=flags, core=core, ranks=ranks, residuals=resid, run=run, ratio=ratio, guard=guard,
                           accepted=accepted)
