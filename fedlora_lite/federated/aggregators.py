"""One interface for CLAIR and the baseline aggregators it is compared against.

``aggregate(method, updates, benign=..., **options)`` takes K client updates (K, d, p) and
returns every client's estimate after aggregation. Global methods (FedAvg, robust
aggregators) broadcast one matrix to all K clients; personalised methods (Local, CLAIR)
return one matrix per client. Methods that make a keep/drop decision also return flags
(True = treated as contaminated), so detection can be scored with
:func:`fedlora_lite.federated.metrics.detection_metrics`.

Registered methods (:func:`available_aggregators`):

=====================  ==========================================================
``local``              each client keeps its own update (no collaboration)
``fedavg``             (weighted) mean of all updates
``oracle_fedavg``      mean over the *true* benign clients (needs ``benign=``)
``median``             coordinate-wise median
``trimmed_mean``       coordinate-wise mean after trimming ``trim`` on each side
``geometric_median``   Weiszfeld's algorithm on the flattened updates
``krum``               the update with the smallest Krum score (Blanchard et al. 2017)
``multi_krum``         mean of the ``m`` updates with the smallest Krum scores
``clair``              :func:`fedlora_lite.clair.clair` (refined updates + flags)
=====================  ==========================================================

plus the rules of :mod:`fedlora_lite.federated.robust` (``bulyan``, ``centered_clipping``,
``clipped_mean``, ``adaptive_clipped_mean``, ``mda``) and any of them behind a
pre-aggregation: ``"nnm+trimmed_mean"`` mixes every update with its nearest neighbours
(:func:`~fedlora_lite.federated.robust.nnm`) before the trimmed mean.

Every method accepts (and all but ``oracle_fedavg`` ignore) the true ``benign`` mask, so a
benchmark loop can pass the same arguments to all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..core.validation import as_update_stack, check_fraction, check_positive
from .result import AggregationResult, accepted_options, broadcast, check_f, check_options
from .robust import PREAGGREGATORS, ROBUST_AGGREGATORS, coordinate_median

__all__ = ["AGGREGATORS", "AggregationResult", "aggregate", "available_aggregators", "krum_scores"]

_broadcast = broadcast


def _local(M: torch.Tensor, benign: torch.Tensor | None) -> AggregationResult:
    return AggregationResult("local", M.clone())


def _fedavg(M: torch.Tensor, benign: torch.Tensor | None, *, weights: Any = None) -> AggregationResult:
    """Mean of all updates, optionally weighted (e.g. by sample sizes n_k)."""
    K = M.shape[0]
    if weights is None:
        return AggregationResult("fedavg", _broadcast(M.mean(dim=0), K))
    try:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64)).to(device=M.device, dtype=M.dtype)
    except (TypeError, ValueError) as exc:  # strings, objects, ragged lists
        raise TypeError(f"weights must be {K} real numbers, got {weights!r:.80}") from exc
    if w.shape != (K,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {K} finite non-negative numbers with a positive sum")
    center = torch.einsum("k,kdp->dp", w / w.sum(), M)
    return AggregationResult("fedavg", _broadcast(center, K), info={"weights": w})


def _oracle_fedavg(M: torch.Tensor, benign: torch.Tensor | None) -> AggregationResult:
    """Mean over the true benign clients (an oracle upper bound for global averaging)."""
    if benign is None:
        raise ValueError("method 'oracle_fedavg' needs the true benign mask: aggregate(..., benign=federation.benign)")
    if not bool(benign.any()):
        raise ValueError("benign selects no client; oracle_fedavg has nothing to average")
    return AggregationResult("oracle_fedavg", _broadcast(M[benign].mean(dim=0), M.shape[0]))


def _median(M: torch.Tensor, benign: torch.Tensor | None) -> AggregationResult:
    """Coordinate-wise median (mean of the two middle values when K is even)."""
    # torch.median returns the lower middle value; coordinate_median averages the two (no bias)
    return AggregationResult("median", _broadcast(coordinate_median(M), M.shape[0]))


def _trimmed_mean(M: torch.Tensor, benign: torch.Tensor | None, *, trim: float = 0.1) -> AggregationResult:
    """Coordinate-wise mean after removing floor(trim * K) smallest and largest values."""
    trim = check_fraction(trim, "trim", high=0.5)
    K = M.shape[0]
    t = math.floor(trim * K)
    srt = torch.sort(M, dim=0).values
    center = srt[t : K - t].mean(dim=0)
    return AggregationResult("trimmed_mean", _broadcast(center, K), info={"trimmed_each_side": t})


def _geometric_median(
    M: torch.Tensor, benign: torch.Tensor | None, *, eps: float = 1e-8, tol: float = 1e-10, max_iter: int = 1000
) -> AggregationResult:
    """Weiszfeld iterations for argmin_z sum_k ||M_k - z||_F.

    Distances are floored at ``eps * scale`` so the iteration stays defined when z lands on
    a client; it stops when the step is below ``tol * scale``. The scale is the *median*
    update norm and the start is the coordinate-wise median: one client scaled by 1e10
    can then neither inflate the floor and tolerance nor start the iteration near itself.
    """
    eps = check_positive(eps, "eps")
    tol = check_positive(tol, "tol")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    K = M.shape[0]
    X = M.reshape(K, -1)
    norms = X.norm(dim=1)
    scale = float(norms.median())
    if scale == 0.0:
        scale = float(norms.max())
    if scale == 0.0:
        return AggregationResult("geometric_median", M.clone(), info={"iterations": 0, "converged": True, "objective": 0.0})
    z = coordinate_median(X)
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        dist = torch.clamp((X - z).norm(dim=1), min=eps * scale)
        w = 1.0 / dist
        z_new = (w[:, None] * X).sum(dim=0) / w.sum()
        step = float((z_new - z).norm())
        z = z_new
        if step <= tol * scale:
            converged = True
            break
    objective = float((X - z).norm(dim=1).sum())
    info = {"iterations": it, "converged": converged, "objective": objective}
    return AggregationResult("geometric_median", _broadcast(z.reshape(M.shape[1:]), K), info=info)


def krum_scores(updates: Any, f: int | None = None) -> torch.Tensor:
    """Krum score of each client: sum of squared distances to its K - f - 2 nearest others.

    Args:
        updates: (K, d, p) client updates.
        f: assumed number of Byzantine clients; default floor((K - 3) / 2), the largest
            value with K > 2f + 2.

    Returns:
        (K,) scores (smaller = more central).
    """
    M = as_update_stack(updates, "updates")
    K = M.shape[0]
    f = _check_f(f, K)
    X = M.reshape(K, -1)
    sq = torch.cdist(X, X).pow(2)
    sq.fill_diagonal_(float("inf"))
    nearest = torch.topk(sq, K - f - 2, dim=1, largest=False).values
    return nearest.sum(dim=1)


def _check_f(f: int | None, K: int) -> int:
    return check_f(f, K, bound="krum")


def _krum(M: torch.Tensor, benign: torch.Tensor | None, *, f: int | None = None) -> AggregationResult:
    """Broadcast the update with the smallest Krum score; flag the f highest-scoring clients.

    Flagging the f worst scores (not the K - 1 unselected clients) gives Krum a detection
    signal consistent with its own assumption of f Byzantine clients.
    """
    K = M.shape[0]
    f = _check_f(f, K)
    scores = krum_scores(M, f)
    order = torch.argsort(scores)
    flags = torch.zeros(K, dtype=torch.bool, device=M.device)
    if f > 0:
        flags[order[K - f :]] = True
    info = {"scores": scores, "selected": int(order[0]), "f": f}
    return AggregationResult("krum", _broadcast(M[order[0]], K), flags=flags, info=info)


def _multi_krum(M: torch.Tensor, benign: torch.Tensor | None, *, f: int | None = None, m: int | None = None) -> AggregationResult:
    """Mean of the m updates with the smallest Krum scores (default m = K - f); flag the rest."""
    K = M.shape[0]
    f = _check_f(f, K)
    if m is None:
        m = K - f
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= K:
        raise ValueError(f"m must be an int in [1, {K}], got {m!r}")
    scores = krum_scores(M, f)
    selected = torch.argsort(scores)[: int(m)]
    flags = torch.ones(K, dtype=torch.bool, device=M.device)
    flags[selected] = False
    info = {"scores": scores, "selected": sorted(int(i) for i in selected), "f": f, "m": int(m)}
    return AggregationResult("multi_krum", _broadcast(M[selected].mean(dim=0), K), flags=flags, info=info)


def _clair(M: torch.Tensor, benign: torch.Tensor | None, **options: Any) -> AggregationResult:
    """CLAIR: refined updates for the collaborative set, inputs back for flagged clients."""
    from ..clair.api import (
        clair,  # local import: clair pulls in the solver, keep this module light
    )

    result = clair(M, **options)
    info = {"result": result, "scores": result.scores, "rank": result.rank, "lam": result.lam}
    return AggregationResult("clair", result.refined_updates, flags=result.flags, info=info)


AGGREGATORS: dict[str, Callable[..., AggregationResult]] = {
    "local": _local,
    "fedavg": _fedavg,
    "oracle_fedavg": _oracle_fedavg,
    "median": _median,
    "trimmed_mean": _trimmed_mean,
    "geometric_median": _geometric_median,
    "krum": _krum,
    "multi_krum": _multi_krum,
    "clair": _clair,
    **ROBUST_AGGREGATORS,
}
"""Registered aggregators: name -> function(updates (K, d, p), benign, **options)."""


def available_aggregators(*, composed: bool = False) -> list[str]:
    """Names accepted by :func:`aggregate`, in registry order.

    Args:
        composed: also list every ``"<pre-aggregation>+<aggregator>"`` combination (e.g.
            ``"nnm+trimmed_mean"``); any registered aggregator except ``local`` and
            ``oracle_fedavg`` composes.
    """
    names = list(AGGREGATORS)
    if composed:
        names += [f"{pre}+{m}" for pre in PREAGGREGATORS for m in AGGREGATORS if m not in _NOT_COMPOSABLE]
    return names


_NOT_COMPOSABLE = ("local", "oracle_fedavg")


def _resolve(method: Any) -> tuple[list[str], str]:
    """Split ``"nnm+trimmed_mean"`` into ([pre-aggregations], aggregator), checking every name."""
    parts = method.split("+") if isinstance(method, str) else [None]
    *pre, final = parts
    ok = final in AGGREGATORS and all(p in PREAGGREGATORS for p in pre) and not (pre and final in _NOT_COMPOSABLE)
    if not ok:
        raise ValueError(f"method must be one of {available_aggregators()}, or '<pre>+<method>' with <pre> in "
                         f"{sorted(PREAGGREGATORS)} (e.g. 'nnm+trimmed_mean'), got {method!r}")
    return pre, final


def _as_benign(benign: Any, K: int, device: torch.device) -> torch.Tensor | None:
    if benign is None:
        return None
    b = torch.as_tensor(np.asarray(benign.cpu() if isinstance(benign, torch.Tensor) else benign))
    if b.dtype != torch.bool or b.shape != (K,):
        raise ValueError(f"benign must be a bool mask of shape ({K},), got dtype {b.dtype} and shape {tuple(b.shape)}")
    return b.to(device)


def aggregate(method: str, updates: Any, *, benign: Any = None, **options: Any) -> AggregationResult:
    """Aggregate K client updates with a registered method.

    Args:
        method: one of :func:`available_aggregators`, optionally behind pre-aggregations
            (``"nnm+trimmed_mean"``: nearest-neighbour mixing with ``f``, then the rule).
        updates: K equal-shape (d, p) matrices (torch on any device, or numpy; float32/64)
            or a (K, d, p) tensor; K >= 3.
        benign: (K,) bool true benign mask; required by ``oracle_fedavg``, ignored by the rest.
        **options: method options, e.g. ``weights`` (fedavg), ``trim`` (trimmed_mean),
            ``eps``/``tol``/``max_iter`` (geometric_median), ``f`` (krum), ``f``/``m``
            (multi_krum), any :class:`~fedlora_lite.clair.ClairConfig` field (clair); the
            robust rules' options are listed on each in :mod:`fedlora_lite.federated.robust`.

    Returns:
        An :class:`AggregationResult` with (K, d, p) estimates on the input's device and dtype.

    Raises:
        ValueError: unknown method (the message lists valid names), bad shapes, NaN/Inf,
            fewer than 3 clients, invalid option values.
        TypeError: an option the method does not accept.
    """
    pre, final = _resolve(method)
    fn = AGGREGATORS[final]
    check_options(method, fn, options, extra=("f",) if pre else ())
    M = as_update_stack(updates, "updates")
    mask = _as_benign(benign, M.shape[0], M.device)
    if not pre:
        return fn(M, mask, **options)
    # a pre-aggregation uses the assumed Byzantine count f; the aggregator also gets it if it takes f
    f = options.get("f")
    for name in pre:
        M = PREAGGREGATORS[name](M, f=f)
    accepted = accepted_options(fn)
    rest = {k: v for k, v in options.items() if k != "f" or accepted is None or "f" in accepted}
    result = fn(M, mask, **rest)
    result.method = method
    result.info["preaggregated"] = M
    return result
