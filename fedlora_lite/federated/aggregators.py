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

Every method accepts (and all but ``oracle_fedavg`` ignore) the true ``benign`` mask, so a
benchmark loop can pass the same arguments to all of them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.validation import as_update_stack, check_fraction, check_positive

__all__ = ["AGGREGATORS", "AggregationResult", "aggregate", "available_aggregators", "krum_scores"]


@dataclass
class AggregationResult:
    """Output of :func:`aggregate`.

    Attributes:
        method: registered name of the aggregator.
        estimates: (K, d, p) each client's estimate after aggregation.
        flags: (K,) bool, True = the method treated the client as contaminated; None for
            methods that make no such decision.
        info: method-specific diagnostics (e.g. Krum scores, Weiszfeld iterations, the
            :class:`~fedlora_lite.clair.ClairResult` under ``"result"``).
    """

    method: str
    estimates: torch.Tensor
    flags: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _broadcast(center: torch.Tensor, K: int) -> torch.Tensor:
    return center.unsqueeze(0).expand(K, *center.shape).clone()


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
    K = M.shape[0]
    srt = torch.sort(M, dim=0).values  # torch.median returns the lower middle value; avoid that bias
    center = 0.5 * (srt[(K - 1) // 2] + srt[K // 2])
    return AggregationResult("median", _broadcast(center, K))


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

    Distances are floored at ``eps * scale`` (scale = mean update norm) so the iteration
    stays defined when z lands on a client; stops when the step is below ``tol * scale``.
    """
    eps = check_positive(eps, "eps")
    tol = check_positive(tol, "tol")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    K = M.shape[0]
    X = M.reshape(K, -1)
    scale = float(X.norm(dim=1).mean())
    if scale == 0.0:
        return AggregationResult("geometric_median", M.clone(), info={"iterations": 0, "converged": True, "objective": 0.0})
    z = X.mean(dim=0)
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


def _default_f(K: int) -> int:
    return max((K - 3) // 2, 0)


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
    if f is None:
        return _default_f(K)
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
        raise ValueError(f"f must be a non-negative int, got {f!r}")
    if K <= 2 * f + 2:
        raise ValueError(f"Krum needs K > 2f + 2; with K={K} clients f must be <= {(K - 3) // 2}, got f={f}")
    return int(f)


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
}
"""Registered aggregators: name -> function(updates (K, d, p), benign, **options)."""


def available_aggregators() -> list[str]:
    """Names accepted by :func:`aggregate`, in registry order."""
    return list(AGGREGATORS)


def _check_options(method: str, fn: Callable[..., AggregationResult], options: dict[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method {method!r} got unknown options {unknown}; it accepts {allowed or 'no options'}")


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
        method: one of :func:`available_aggregators`.
        updates: K equal-shape (d, p) matrices (torch on any device, or numpy; float32/64)
            or a (K, d, p) tensor; K >= 3.
        benign: (K,) bool true benign mask; required by ``oracle_fedavg``, ignored by the rest.
        **options: method options, e.g. ``weights`` (fedavg), ``trim`` (trimmed_mean),
            ``eps``/``tol``/``max_iter`` (geometric_median), ``f`` (krum), ``f``/``m``
            (multi_krum), any :class:`~fedlora_lite.clair.ClairConfig` field (clair).

    Returns:
        An :class:`AggregationResult` with (K, d, p) estimates on the input's device and dtype.

    Raises:
        ValueError: unknown method (the message lists valid names), bad shapes, NaN/Inf,
            fewer than 3 clients, invalid option values.
        TypeError: an option the method does not accept.
    """
    if not isinstance(method, str) or method not in AGGREGATORS:
        raise ValueError(f"method must be one of {available_aggregators()}, got {method!r}")
    fn = AGGREGATORS[method]
    _check_options(method, fn, options)
    M = as_update_stack(updates, "updates")
    return fn(M, _as_benign(benign, M.shape[0], M.device), **options)
