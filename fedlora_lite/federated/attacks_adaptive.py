"""An adaptive attack on CLAIR: it knows CLAIR's estimated subspace, its threshold and its code.

CLAIR flags client k when the block-sparse share of its update, ||S_k||_F / ||M_k||_F,
exceeds a threshold, and refines every unflagged client with the collaborative average
*off* the shared subspace U-hat. So the damage a byzantine client can do unflagged is its
off-subspace part, and the score it must keep low grows with that part's share. The
attacker (ours, designed for this package; no paper defines it) therefore sends

    b_j = N ( sqrt(1 - gamma^2) u_j + gamma u_off ),

with u_j the unit in-subspace direction of a random honest client (it looks benign inside
U-hat), u_off the unit direction of ``-(I - U U^T) mean(honest)`` (it pulls every refined
benign update away from the honest off-subspace average), N = ``scale`` x the median
honest norm, and gamma in [0, 1] found by bisection on CLAIR itself (the attacker runs
CLAIR on the honest updates plus its own and keeps the largest gamma for which none of
its clients is flagged: it "stays just under the threshold"). Modes:

* ``"evade"``: each byzantine client borrows a different honest in-subspace direction;
* ``"collude"``: all byzantine clients send the same update, a rank-one group that the
  low-rank part can absorb (it "enters the shared subspace" instead of hiding under it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.validation import check_choice, check_positive
from .lowrank import factor_updates, truncate_updates

__all__ = ["AdaptiveAttack", "clair_adaptive", "clair_adaptive_search"]

_MODES = ("evade", "collude")


@dataclass
class AdaptiveAttack:
    """Outcome of :func:`clair_adaptive_search`.

    Attributes:
        updates: (f, d, p) byzantine updates.
        gamma: off-subspace share used (0 = fully inside U-hat).
        flagged: how many of the f byzantine clients CLAIR flags at that gamma.
        threshold: CLAIR's threshold the attack targeted.
        rank: rank of the subspace estimated from the honest updates.
        evaluations: CLAIR runs spent by the search.
    """

    updates: torch.Tensor
    gamma: float
    flagged: int
    threshold: float
    rank: int
    evaluations: int


def clair_adaptive_search(H: torch.Tensor, f: int, generator: torch.Generator, *, mode: str = "evade",
                          scale: float = 1.0, steps: int = 6, config: Any = None,
                          clair_options: Mapping[str, Any] | None = None, rank: int | None = None) -> AdaptiveAttack:
    """Craft the adaptive byzantine updates (see the module docstring) and report the search.

    Args:
        H: (n, d, p) honest updates, n >= 3.
        f: number of byzantine clients.
        generator: torch generator (which honest directions are borrowed).
        mode: "evade" or "collude".
        scale: byzantine norm relative to the median honest norm (> 0).
        steps: bisection steps on gamma after the two end points (>= 0).
        config, clair_options: CLAIR's configuration as the server runs it.
        rank: LoRA rank r of the federation (None: dense updates). Every crafted update is
            cut to its best rank-r approximation (all a client can send as a rank-r
            adapter) *before* the search tests it, and the attacker runs CLAIR on the exact
            rank-r factors, as the server does (the honest updates must have rank <= r).

    Returns:
        An :class:`AdaptiveAttack`.
    """
    from ..clair.api import clair  # local import: the solver is only needed by this attack

    check_choice(mode, "mode", _MODES)
    scale = check_positive(scale, "scale")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if H.shape[0] < 3:
        raise ValueError(f"clair_adaptive needs at least 3 honest updates to estimate CLAIR's subspace, got {H.shape[0]}")
    opts = dict(clair_options or {})

    def run(X: torch.Tensor):
        return clair(X if rank is None else factor_updates(X, rank), config, **opts)

    ref = run(H)
    row = ref.config.side == "row"
    W = H.transpose(1, 2) if row else H  # work where the subspace acts on the left
    U = ref.subspace.to(W)
    inside = torch.einsum("dr,kdp->krp", U, W)
    P_in = torch.einsum("dr,krp->kdp", U, inside)
    mu = W.mean(dim=0)
    off = -(mu - U @ (U.T @ mu))
    if float(off.norm()) <= 1e-12 * max(float(mu.norm()), 1e-300):
        noise = torch.randn(W.shape[1:], generator=generator, dtype=torch.float64).to(W)
        off = noise - U @ (U.T @ noise)
    u_off = off / off.norm()
    picks = torch.randint(0, H.shape[0], (1 if mode == "collude" else f,), generator=generator).tolist()
    u_in = []
    for j in picks:
        v = P_in[j] if float(P_in[j].norm()) > 0 else W[j]
        u_in.append(v / v.norm())
    u_in = torch.stack(u_in).expand(f, *W.shape[1:]) if mode == "collude" else torch.stack(u_in)
    N = scale * float(H.reshape(H.shape[0], -1).norm(dim=1).median())
    n = H.shape[0]
    evaluations = 1

    def craft(gamma: float) -> torch.Tensor:
        B = N * (math.sqrt(max(1.0 - gamma * gamma, 0.0)) * u_in + gamma * u_off)
        B = B.transpose(1, 2).contiguous() if row else B
        return B if rank is None else truncate_updates(B, rank)

    def flagged(gamma: float) -> int:
        nonlocal evaluations
        evaluations += 1
        return int(run(torch.cat([H, craft(gamma)])).flags[n:].sum())

    lo, hi = 0.0, 1.0
    f_hi = flagged(hi)
    if f_hi == 0:
        return AdaptiveAttack(craft(hi), hi, 0, ref.config.threshold, ref.rank, evaluations)
    f_lo = flagged(lo)
    if f_lo > 0:  # even a purely in-subspace update is flagged: send it anyway (the least detectable)
        return AdaptiveAttack(craft(lo), lo, f_lo, ref.config.threshold, ref.rank, evaluations)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if flagged(mid) == 0:
            lo = mid
        else:
            hi = mid
    return AdaptiveAttack(craft(lo), lo, 0, ref.config.threshold, ref.rank, evaluations)


def clair_adaptive(H: torch.Tensor, f: int, generator: torch.Generator, *, mode: str = "evade", scale: float = 1.0,
                   steps: int = 6, config: Any = None, clair_options: Mapping[str, Any] | None = None,
                   rank: int | None = None) -> torch.Tensor:
    """Adaptive attack on CLAIR (ours): the updates of :func:`clair_adaptive_search`.

    Formula: ``b_j = N (sqrt(1 - gamma^2) u_j + gamma u_off)``, gamma the largest share
    that CLAIR (run by the attacker with the server's ``config``) does not flag.
    """
    return clair_adaptive_search(H, f, generator, mode=mode, scale=scale, steps=steps, config=config,
                                 clair_options=clair_options, rank=rank).updates
