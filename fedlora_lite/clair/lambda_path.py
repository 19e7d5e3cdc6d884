"""Choosing lam from the data: stability of the flagged set along a lam path.

Small lam sends everything to S (every client flagged, L = 0); large lam sends everything
to L (nobody flagged, L not low-rank). In between, when the low-rank + block-sparse model
fits, the flagged set stays constant over a range of lam: :func:`select_lambda` finds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.decomposition import decompose, default_lambda
from ..core.validation import as_block_list, check_positive
from .rules import check_threshold

__all__ = ["LambdaPath", "select_lambda"]


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
    threshold = check_threshold(threshold)
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
