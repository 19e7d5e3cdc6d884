"""Byzantine-robust aggregation rules beyond the classics, registered in :mod:`~fedlora_lite.federated.aggregators`.

Every rule takes the (K, d, p) stack of client updates (flattened to K vectors where the
rule is defined on vectors) and returns an
:class:`~fedlora_lite.federated.result.AggregationResult` whose estimate is broadcast to all
clients:

=========================  ================================================================
``bulyan``                 iterated Krum picks K - 2f, then a coordinate-wise trimmed mean
                           around their median (El Mhamdi et al. 2018)
``centered_clipping``      v <- v + mean_k clip_tau(M_k - v), a few times (Karimireddy et al. 2021)
``clipped_mean``           mean of the updates clipped to a fixed norm c (static clipping)
``adaptive_clipped_mean``  clipping norm = a quantile of the update norms (Andrew et al. 2021)
``mda``                    mean of the K - f updates with the smallest diameter (El Mhamdi et al. 2018)
=========================  ================================================================

and one pre-aggregation, :func:`nnm` (nearest-neighbour mixing, Allouah et al. 2023), which
replaces every update by the mean of its K - f nearest neighbours and composes with any
aggregator by name: ``aggregate("nnm+trimmed_mean", ...)``.

Conventions that differ from a reference implementation are documented on each rule and
tested explicitly in ``tests/federated/test_crosscheck_byzfl.py`` /
``tests/federated/test_crosscheck_flower.py``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from ..core.validation import as_matrix, check_fraction, check_positive
from .result import AggregationResult, broadcast, check_count, check_f

__all__ = ["ROBUST_AGGREGATORS", "PREAGGREGATORS", "nnm", "coordinate_median"]


def coordinate_median(X: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over dim 0, the mean of the two middle values when K is even (numpy's convention)."""
    K = X.shape[0]
    srt = torch.sort(X, dim=0).values
    return 0.5 * (srt[(K - 1) // 2] + srt[K // 2])


def _flat(M: torch.Tensor) -> torch.Tensor:
    return M.reshape(M.shape[0], -1)


def bulyan(M: torch.Tensor, benign: torch.Tensor | None, *, f: int | None = None) -> AggregationResult:
    """Bulyan (El Mhamdi, Guerraoui & Rouault 2018, https://arxiv.org/abs/1802.07927).

    Formula: S = theta = K - 2f clients chosen one by one by Krum on the remaining set;
    per coordinate j, ``mean of the beta = theta - 2f values of S closest to median_j(S)``.

    Krum on a remaining set of n clients sums the squared distances to the
    max(1, n - f - 2) nearest others (Flower's ``aggregate_bulyan`` convention); needs
    K >= 4f + 3 (default f = floor((K - 3) / 4)). Clients never selected are flagged.

    Ties at the beta-th distance (ours): with an even |S| the two middle values are always
    equidistant from the median, and identical byzantine copies tie with them; Flower's
    ``argpartition`` then keeps an arbitrary subset, so rounding noise of 1e-16 can move the
    result by a macroscopic amount. Here values tied (to 100 ulps) at the boundary share the
    remaining slots equally; without ties this is exactly the usual rule.
    """
    K = M.shape[0]
    f = check_f(f, K, bound="bulyan")
    X = _flat(M)
    sq = torch.cdist(X, X).pow(2)
    theta, beta = K - 2 * f, K - 4 * f
    remaining, selected = list(range(K)), []
    for _ in range(theta):
        idx = torch.tensor(remaining, device=M.device)
        sub = sq[idx][:, idx].clone()
        sub.fill_diagonal_(float("inf"))
        m = min(max(1, len(remaining) - f - 2), len(remaining) - 1)
        scores = torch.topk(sub, m, dim=1, largest=False).values.sum(dim=1) if m > 0 else torch.zeros(len(remaining), device=M.device)
        selected.append(remaining.pop(int(torch.argmin(scores))))
    S = X[torch.tensor(selected, device=M.device)]
    center = _closest_to_median_mean(S, beta)
    flags = torch.ones(K, dtype=torch.bool, device=M.device)
    flags[selected] = False
    info = {"selected": selected, "f": f, "theta": theta, "beta": beta}
    return AggregationResult("bulyan", broadcast(center.reshape(M.shape[1:]), K), flags=flags, info=info)


def _closest_to_median_mean(S: torch.Tensor, beta: int) -> torch.Tensor:
    """Per coordinate, the mean of the ``beta`` values of S (n, D) closest to the coordinate median; boundary ties shared."""
    dist, order = torch.sort((S - coordinate_median(S)).abs(), dim=0, stable=True)
    vals = torch.gather(S, 0, order)
    edge = dist[beta - 1]  # the beta-th smallest distance, per coordinate
    tol = 100 * torch.finfo(S.dtype).eps * S.abs().amax(dim=0)
    inside = dist < edge - tol
    tied = (dist - edge).abs() <= tol  # includes row beta - 1, so at least one value per coordinate
    share = (beta - inside.sum(dim=0)) / tied.sum(dim=0)
    return ((vals * inside).sum(dim=0) + share * (vals * tied).sum(dim=0)) / beta


def _clip(D: torch.Tensor, tau: float) -> torch.Tensor:
    """Rows of D scaled to norm <= tau: x * min(1, tau / ||x||)."""
    norms = D.norm(dim=1, keepdim=True)
    factor = torch.where(norms > tau, tau / norms.clamp_min(torch.finfo(D.dtype).tiny), torch.ones_like(norms))
    return D * factor


def centered_clipping(M: torch.Tensor, benign: torch.Tensor | None, *, center: Any = None, tau: float | None = None,
                      iterations: int = 3) -> AggregationResult:
    """Centered clipping (Karimireddy, He & Jaggi 2021, https://arxiv.org/abs/2012.10333).

    Formula: ``v_{l+1} = v_l + (1/K) sum_k clip_tau(M_k - v_l)``, ``clip_tau(x) = x min(1, tau/||x||)``,
    for l = 0 .. iterations - 1.

    The paper (and ByzFL's ``CenteredClipping``, which keeps it as state) starts from the
    previous round's aggregate; pass it as ``center=`` (a (d, p) matrix) for that form.
    Without one we start from the coordinate-wise median, and ``tau=None`` uses the median
    distance of the updates to the start (both ours: a one-shot server has no history,
    and a zero start would shrink the result to norm tau).
    """
    K = M.shape[0]
    X = _flat(M)
    if center is None:
        v = coordinate_median(X)
    else:
        v = as_matrix(center, "center", dtype=M.dtype, device=M.device)
        if v.shape != M.shape[1:]:
            raise ValueError(f"center must have shape {tuple(M.shape[1:])}, got {tuple(v.shape)}")
        v = v.reshape(-1)
    iterations = check_count(iterations, "iterations", 1, 10_000)
    if tau is None:
        tau = float((X - v).norm(dim=1).median())
    tau = check_positive(tau, "tau", allow_zero=True)
    for _ in range(iterations):
        v = v + _clip(X - v, tau).mean(dim=0)
    return AggregationResult("centered_clipping", broadcast(v.reshape(M.shape[1:]), K), info={"tau": tau, "iterations": iterations})


def _clipped_mean(M: torch.Tensor, c: float, method: str, info: dict[str, Any]) -> AggregationResult:
    X = _flat(M)
    norms = X.norm(dim=1)
    flags = norms > c
    center = _clip(X, c).mean(dim=0)
    info = {"clip_norm": c, "clipped": int(flags.sum()), **info}
    return AggregationResult(method, broadcast(center.reshape(M.shape[1:]), M.shape[0]), flags=flags, info=info)


def clipped_mean(M: torch.Tensor, benign: torch.Tensor | None, *, clip_norm: float | None = None) -> AggregationResult:
    """Static norm clipping, then the mean: ``(1/K) sum_k M_k min(1, c / ||M_k||_F)``.

    The rule of DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963) without
    the noise; also ByzFL's ``Clipping`` pre-aggregation followed by the average. ``clip_norm``
    (c) is required: a fixed norm only means something in the units of your updates.
    Clipped clients are reported as flags.
    """
    if clip_norm is None:
        raise ValueError("clipped_mean needs clip_norm=c (a fixed norm in the units of the updates); "
                         "use 'adaptive_clipped_mean' to set it from the updates")
    return _clipped_mean(M, check_positive(clip_norm, "clip_norm"), "clipped_mean", {})


def adaptive_clipped_mean(M: torch.Tensor, benign: torch.Tensor | None, *, quantile: float = 0.5,
                          clip_norm: float | None = None, learning_rate: float = 0.2) -> AggregationResult:
    """Adaptive norm clipping (Andrew, Thakkar, McMahan & Ramaswamy 2021, https://arxiv.org/abs/1905.03871).

    Formula: clipped mean with c; next round ``c <- c exp(-eta (b - q))``, b = fraction of
    ||M_k|| <= c, so c tracks the q-quantile of the update norms.

    With ``clip_norm=None`` (a first round, or a stateless server) c is the empirical
    q-quantile of this round's norms (ours; the paper starts from a guess and lets the
    geometric update converge). ``info["next_clip_norm"]`` is the paper's update of c, to be
    passed back as ``clip_norm=`` next round. No noise is added to b (the DP part of the paper).
    """
    q = check_fraction(quantile, "quantile", inclusive_high=True)
    eta = check_positive(learning_rate, "learning_rate", allow_zero=True)
    norms = _flat(M).norm(dim=1)
    c = float(torch.quantile(norms, q)) if clip_norm is None else check_positive(clip_norm, "clip_norm")
    below = float((norms <= c).double().mean())
    nxt = c * math.exp(-eta * (below - q))
    return _clipped_mean(M, c, "adaptive_clipped_mean", {"quantile": q, "next_clip_norm": nxt})


def mda(M: torch.Tensor, benign: torch.Tensor | None, *, f: int | None = None,
        max_subsets: int = 2_000_000) -> AggregationResult:
    """Minimum-diameter averaging (El Mhamdi, Guerraoui & Rouault 2018, https://arxiv.org/abs/1802.07927).

    Formula: ``mean of argmin_{|S| = K - f} max_{i, j in S} ||M_i - M_j||_F``.

    Exhaustive over the C(K, f) subsets, in lexicographic order (the first minimiser wins,
    as in ByzFL's ``MDA``); needs K > 2f (default f = floor((K - 1) / 2)) and refuses
    more than ``max_subsets`` subsets instead of running for hours. Clients outside the
    chosen subset are flagged.
    """
    K = M.shape[0]
    f = check_f(f, K, bound="majority")
    n_sub = math.comb(K, K - f)
    if n_sub > max_subsets:
        raise ValueError(f"mda would scan C({K}, {f}) = {n_sub} subsets (> max_subsets={max_subsets}); "
                         "lower f or raise max_subsets")
    X = _flat(M)
    dist = torch.cdist(X, X)
    k = K - f
    best, best_subset = float("inf"), tuple(range(k))
    if k >= 2:
        iu = torch.triu_indices(k, k, 1, device=M.device)
        combos = itertools.combinations(range(K), k)
        while True:
            chunk = list(itertools.islice(combos, 50_000))
            if not chunk:
                break
            idx = torch.tensor(chunk, device=M.device)
            diam = dist[idx[:, iu[0]], idx[:, iu[1]]].max(dim=1).values
            j = int(torch.argmin(diam))
            if float(diam[j]) < best:
                best, best_subset = float(diam[j]), chunk[j]
    sel = torch.tensor(best_subset, device=M.device)
    flags = torch.ones(K, dtype=torch.bool, device=M.device)
    flags[sel] = False
    info = {"f": f, "selected": list(best_subset), "diameter": best if k >= 2 else 0.0}
    return AggregationResult("mda", broadcast(X[sel].mean(dim=0).reshape(M.shape[1:]), K), flags=flags, info=info)


def nnm(M: torch.Tensor, *, f: int | None = None) -> torch.Tensor:
    """Nearest-neighbour mixing (Allouah et al. 2023, https://arxiv.org/abs/2302.06079).

    Formula: ``y_k = mean of the K - f updates nearest to M_k`` (Frobenius distance, M_k
    itself included), for every k; the mixed updates then go to any aggregator.

    Args:
        M: (K, d, p) updates.
        f: assumed number of Byzantine clients, 0 <= f < K (default floor((K - 1) / 2)).

    Returns:
        (K, d, p) mixed updates.
    """
    K = M.shape[0]
    f = check_f(f, K, bound="majority")
    X = _flat(M)
    dist = torch.cdist(X, X)
    dist.fill_diagonal_(-1.0)  # a client is always its own nearest neighbour, even with duplicates
    near = torch.topk(dist, K - f, dim=1, largest=False).indices
    return X[near].mean(dim=1).reshape(M.shape)


ROBUST_AGGREGATORS = {
    "bulyan": bulyan,
    "centered_clipping": centered_clipping,
    "clipped_mean": clipped_mean,
    "adaptive_clipped_mean": adaptive_clipped_mean,
    "mda": mda,
}
"""The rules of this module, merged into :data:`~fedlora_lite.federated.aggregators.AGGREGATORS`."""

PREAGGREGATORS = {"nnm": nnm}
"""Pre-aggregations composable with any aggregator as ``"<pre>+<aggregator>"``: name -> function(M, *, f)."""
