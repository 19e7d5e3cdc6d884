"""LoRA-aware aggregation of per-module factors: how to average K pairs (B_k, A_k) so the product means something.

The server receives client k's factors B_k (d x r_k) and A_k (r_k x p) of one module,
with weight w_k (e.g. sample counts, normalised to sum 1) and possibly different ranks.
What it *should* serve is the mean update ``Delta = sum_k w_k B_k A_k``; the rules differ in
whether they reach it, at what communication and with what rank:

================  ====================================================================  ==========
``fedit``         ``(sum w_k B_k)(sum w_k A_k)``, factors averaged separately            inexact
``ffa_lora``      A frozen at a shared init A_0: ``(sum w_k B_k) A_0``                  exact
``flora``         stacked ``[w_1 B_1 .. w_K B_K] [A_1; ..; A_K]``, rank sum r_k          exact
``fedex_lora``    FedIT's pair plus ``sum w_k B_k A_k - B-bar A-bar`` folded into the base  exact
``fed_sb``        fixed B, A; clients train R_k (r x r): ``B (sum w_k R_k) A``           exact
``fedsa_lora``    share ``A-bar = sum w_k A_k``, keep B_k local: ``B_k A-bar``          personalised
``flexlora``      exact mean, then the best rank-r_k factors of it for client k (SVD)    truncated
``fedrpca``       robust PCA of the factors: low-rank part averaged, sparse part x beta  inexact
================  ====================================================================  ==========

``aggregate_lora(name, factors, weights=None, **options)`` returns a
:class:`LoraAggregationResult`: every client's served pair, the global pair where there is
one, the dense base correction (FedEx-LoRA), the exactness residual
``||sum_k w_k Delta'_k - Delta||_F / ||Delta||_F`` (Delta'_k: client k's served update,
base correction included), communication up/down in floats (and bytes) and the rank growth.
Unequal ranks are zero-padded to r_max where a rule averages factors (HetLoRA's
convention, Cho et al. 2024, https://arxiv.org/abs/2401.06432): client k then takes the
first r_k columns/rows of the averaged pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.reduction import Pair, as_factor_pairs, truncate_factors
from ..core.validation import as_matrix, check_positive
from .result import check_options
from .rpca import robust_pca

__all__ = ["LORA_AGGREGATORS", "LoraAggregationResult", "aggregate_lora", "available_lora_aggregators"]


@dataclass(kw_only=True)
class LoraAggregationResult:
    """Output of :func:`aggregate_lora`.

    Attributes:
        method: registered name.
        factors: K pairs (B'_k (d x r'_k), A'_k (r'_k x p)): what client k loads next round.
        global_factors: the single pair every client receives, or None (personalised rules).
        base_update: (d, p) dense correction merged into the frozen base weights (FedEx-LoRA),
            else None.
        residual: ``||sum_k w_k Delta'_k - sum_k w_k B_k A_k||_F / ||sum_k w_k B_k A_k||_F``
            (NaN when not computed, ``compute_residual=False``).
        weights: (K,) normalised client weights.
        ranks_in: r_k received; ranks_out: rank r'_k of each served update's factors (the
            base correction, when present, counts as min(d, p)).
        upload_floats, download_floats: numbers sent clients -> server and server -> clients
            in one round, summed over the K clients.
        bytes_per_float: element size of the factors' dtype.
        info: rule-specific diagnostics.
    """

    method: str
    factors: list[Pair]
    global_factors: Pair | None
    base_update: torch.Tensor | None
    residual: float
    weights: torch.Tensor
    ranks_in: tuple[int, ...]
    ranks_out: tuple[int, ...]
    upload_floats: int
    download_floats: int
    bytes_per_float: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def upload_bytes(self) -> int:
        return self.upload_floats * self.bytes_per_float

    @property
    def download_bytes(self) -> int:
        return self.download_floats * self.bytes_per_float

    @property
    def rank_growth(self) -> float:
        """max r'_k / max r_k: 1 = no growth; FLoRA grows to sum r_k."""
        return max(self.ranks_out) / max(self.ranks_in)

    def update(self, k: int) -> torch.Tensor:
        """Client k's served dense update B'_k A'_k (+ the base correction), (d, p)."""
        B, A = self.factors[k]
        out = B @ A
        return out + self.base_update if self.base_update is not None else out

    def dense(self) -> torch.Tensor:
        """(K, d, p) served updates (forms K dense matrices: small modules only)."""
        return torch.stack([self.update(k) for k in range(len(self.factors))])


def _weights(weights: Any, K: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((K,), 1.0 / K, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    if w.shape != (K,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {K} finite non-negative numbers with a positive sum, got {weights!r}")
    return (w / w.sum()).to(dtype=like.dtype, device=like.device)


def _pad(pairs: list[Pair], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, d, r) and (K, r, p) stacks, zero-padded to rank r."""
    d, p = pairs[0][0].shape[0], pairs[0][1].shape[1]
    B = pairs[0][0].new_zeros(len(pairs), d, r)
    A = pairs[0][0].new_zeros(len(pairs), r, p)
    for k, (Bk, Ak) in enumerate(pairs):
        B[k, :, : Bk.shape[1]] = Bk
        A[k, : Ak.shape[0]] = Ak
    return B, A


def _stack(pairs: list[Pair], w: torch.Tensor) -> Pair:
    """The exact mean as one factored pair: [w_1 B_1 .. w_K B_K] @ [A_1; ..; A_K]."""
    return torch.cat([wk * B for wk, (B, _) in zip(w, pairs)], dim=1), torch.cat([A for _, A in pairs], dim=0)


def _truncated(B: torch.Tensor, A: torch.Tensor, ranks: Sequence[int]) -> list[Pair]:
    return [(B[:, :r], A[:r]) for r in ranks]


@dataclass
class _Served:
    factors: list[Pair]
    global_factors: Pair | None
    up: int
    down: int
    ranks_out: tuple[int, ...]
    base_update: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _fedit(pairs: list[Pair], w: torch.Tensor, ranks: list[int], d: int, p: int) -> _Served:
    """FedIT (Zhang et al. 2024, https://arxiv.org/abs/2305.05644): ``B-bar A-bar = (sum w_k B_k)(sum w_k A_k)``.

    Inexact: the error is the cross-term ``sum_{k != j} w_k w_j B_k A_j - sum_k w_k (1 - w_k) B_k A_k``.
    """
    Bp, Ap = _pad(pairs, max(ranks))
    Bbar, Abar = torch.einsum("k,kdr->dr", w, Bp), torch.einsum("k,krp->rp", w, Ap)
    up = sum(r * (d + p) for r in ranks)
    return _Served(_truncated(Bbar, Abar, ranks), (Bbar, Abar), up, up, tuple(ranks))


def _ffa_lora(pairs: list[Pair], w: torch.Tensor, ranks: list[int], d: int, p: int, *, atol: float = 1e-6) -> _Served:
    """FFA-LoRA (Sun et al. 2024, https://arxiv.org/abs/2403.12313): A frozen at A_0, ``(sum w_k B_k) A_0``, exact.

    Every A_k must be the first r_k rows of the largest-rank client's A (the shared frozen
    initialisation); only the B's travel.
    """
    check_positive(atol, "atol", allow_zero=True)
    A0 = pairs[int(np.argmax(ranks))][1]
    for k, (_, Ak) in enumerate(pairs):
        if not torch.allclose(Ak, A0[: Ak.shape[0]], atol=atol, rtol=0.0):
            raise ValueError(f"ffa_lora needs every A_k to be the shared frozen A_0 (its first r_k rows); client {k}'s "
                             f"A differs by {float((Ak - A0[: Ak.shape[0]]).abs().max()):.3g} > atol={atol}")
    Bp, _ = _pad(pairs, max(ranks))
    Bbar = torch.einsum("k,kdr->dr", w, Bp)
    up = sum(r * d for r in ranks)
    return _Served([(Bbar, A0)] * len(pairs), (Bbar, A0), up, len(pairs) * max(ranks) * d, (max(ranks),) * len(pairs))


def _flora(pairs: list[Pair], w: torch.Tensor, ranks: list[int], d: int, p: int) -> _Served:
    """FLoRA (Wang et al. 2024, https://arxiv.org/abs/2409.05976): ``[w_1 B_1 .. w_K B_K][A_1; ..; A_K] = sum w_k B_k A_k``, exact.

    The served rank is sum r_k: it grows with K (clients merge it into the base and restart LoRA).
    """
    pair = _stack(pairs, w)
    m = sum(ranks)
    return _Served([pair] * len(pairs), pair, sum(r * (d + p) for r in ranks), len(pairs) * m * (d + p),
                   (m,) * len(pairs))


def _fedex_lora(pairs: list[Pair], w: torch.Tensor, ranks: list[int], d: int, p: int) -> _Served:
    """FedEx-LoRA (Singhal et al. 2025, https://arxiv.org/abs/2410.09432): FedIT's pair + ``sum w_k B_k A_k - B-bar A-bar`` into the base, exact.

    The residual is a dense d x p matrix sent to every client (merged into its frozen weights).
    """
    served = _fedit(pairs, w, ranks, d, p)
    Bbar, Abar = served.global_factors
    Bs, As = _stack(pairs, w)
    residual = Bs @ As - Bbar @ Abar
    r = max(ranks)
    return _Served([(Bbar, Abar)] * len(pairs), (Bbar, Abar), served.up, len(pairs) * (r * (d + p) + d * p),
                   (min(r + min(d, p), sum(ranks)),) * len(pairs), base_update=residual)


def _fedsa_lora(pairs: list[Pair], w: torch.Tensor, ranks: list[int], d: int, p: int) -> _Served:
    """FedSA-LoRA (Guo et al. 2025, https://arxiv.org/abs/2410.01463): share ``A-bar = sum w_k A_k``, keep B_k: ``B_k A-bar``.

    Personalised: the A's learn what clients share, the B's what is client-specific.
    """
    _, Ap = _pad(pairs, max(ranks))
    Abar = torch.einsum("k,krp->rp", w, Ap)
    up = sum(r * p for r in ranks)
    return _Served([(B, Abar[: B.shape[1]]) for B, _ in pairs], None, up, up, tuple(ranks))


def _flexlora(pairs: list[Pair], w: torch.Tensor, ranks: list[int], d: int, p: int, *,
              rank: int | None = None) -> _Served:
    """FlexLoRA (Bai et al. 2024, https://arxiv.org/abs/2402.11505), FedSVD-style: best rank-r_k factors of ``sum w_k B_k A_k``.

    The exact mean is kept factored (stacked pair, QRs, a small SVD): never formed densely.
    ``rank`` = one served rank for every client (default: each client's own r_k).
    """
    targets = list(ranks) if rank is None else [rank] * len(pairs)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    Bs, As = _stack(pairs, w)
    Bt, At = truncate_factors(Bs, As, max(targets))
    served = [(Bt[:, :r], At[:r]) for r in targets]
    return _Served(served, served[0] if rank is not None else None, sum(r * (d + p) for r in ranks),
                   sum(B.shape[1] * (d + p) for B, _ in served), tuple(B.shape[1] for B, _ in served))


def _fedrpca(pairs: list[Pair], w: torch.Tensor, ranks: list[int], d: int, p: int, *, beta: float = 2.0,
             lam: float | None = None, reference: Pair | None = None, personal: bool = False) -> _Served:
    """FedRPCA (Jhunjhunwala et al. 2025, https://arxiv.org/abs/2506.01194): per factor, ``X-bar = sum w_k L_k + beta sum w_k S_k``.

    For B and then A: the clients' vectorised factor updates (relative to ``reference``,
    the round's starting global pair; default zero) form the columns of a matrix, robust
    PCA (:func:`~fedlora_lite.federated.rpca.robust_pca`) splits it into a low-rank common
    part L and a sparse client-specific part S, L is averaged and S averaged and scaled by
    beta (scaled averaging, as in Task Arithmetic). beta = 1 gives FedIT exactly. The paper
    tunes beta; 2.0 is our default. ``personal=True`` (ours) serves client k
    ``mean(L) + beta S_k`` instead of the shared ``beta mean(S)``.
    """
    beta = check_positive(beta, "beta")
    Bp, Ap = _pad(pairs, max(ranks))
    if reference is not None:
        RB = as_matrix(reference[0], "reference[0] (B)", dtype=Bp.dtype, device=Bp.device)
        RA = as_matrix(reference[1], "reference[1] (A)", dtype=Bp.dtype, device=Bp.device)
        if RB.shape != Bp.shape[1:] or RA.shape != Ap.shape[1:]:
            raise ValueError(f"reference must be a pair of shapes {tuple(Bp.shape[1:])} and {tuple(Ap.shape[1:])}")
    else:
        RB, RA = torch.zeros_like(Bp[0]), torch.zeros_like(Ap[0])
    out, info = [], {}
    for label, X, R in (("B", Bp, RB), ("A", Ap, RA)):
        D = (X - R).reshape(len(pairs), -1).T  # one column per client
        dec = robust_pca(D, lam=lam)
        common = dec.low_rank @ w
        sparse = dec.sparse * w if not personal else dec.sparse
        info[f"rank_{label}"], info[f"converged_{label}"] = dec.rank, dec.converged
        info[f"sparse_share_{label}"] = float(dec.sparse.norm() / D.norm().clamp_min(1e-300))
        if personal:
            out.append([R + (common + beta * sparse[:, k]).reshape(R.shape) for k in range(len(pairs))])
        else:
            out.append(R + (common + beta * sparse.sum(dim=1)).reshape(R.shape))
    up = sum(r * (d + p) for r in ranks)
    if personal:
        served = [(out[0][k][:, :r], out[1][k][:r]) for k, r in enumerate(ranks)]
        return _Served(served, None, up, up, tuple(ranks), info=info)
    return _Served(_truncated(out[0], out[1], ranks), (out[0], out[1]), up, up, tuple(ranks), info=info)


def _triples(factors: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fed-SB input: K triples (B, R_k, A) with one shared B (d x r) and A (r x p)."""
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or len(factors) < 1:
        raise TypeError("fed_sb needs a sequence of K triples (B, R_k, A)")
    mats = []
    for k, item in enumerate(factors):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 3:
            raise TypeError(f"factors[{k}] must be a triple (B, R_k, A) for fed_sb, got {type(item).__name__}")
        mats.append(tuple(as_matrix(x, f"factors[{k}][{i}]") for i, x in enumerate(item)))
    B, _, A = mats[0]
    dtype = torch.float64 if any(x.dtype == torch.float64 for t in mats for x in t) else torch.float32
    B, A = B.to(dtype), A.to(dtype)
    r = B.shape[1]
    R = []
    for k, (Bk, Rk, Ak) in enumerate(mats):
        if Bk.shape != B.shape or Ak.shape != A.shape or Rk.shape != (r, r) or A.shape[0] != r:
            raise ValueError(f"factors[{k}]: expected B {tuple(B.shape)}, R ({r}, {r}), A ({r}, p); got "
                             f"{tuple(Bk.shape)}, {tuple(Rk.shape)}, {tuple(Ak.shape)}")
        if not (torch.equal(Bk.to(dtype).to(B.device), B) and torch.equal(Ak.to(dtype).to(B.device), A)):
            raise ValueError(f"factors[{k}]: fed_sb needs the same fixed B and A for every client")
        R.append(Rk.to(dtype=dtype, device=B.device))
    return B, torch.stack(R), A


LORA_AGGREGATORS: dict[str, Callable[..., _Served] | None] = {
    "fedit": _fedit,
    "ffa_lora": _ffa_lora,
    "flora": _flora,
    "fedex_lora": _fedex_lora,
    "fed_sb": None,  # takes triples (B, R_k, A), not pairs: dispatched by aggregate_lora to _fed_sb
    "fedsa_lora": _fedsa_lora,
    "flexlora": _flexlora,
    "fedrpca": _fedrpca,
}
"""Registered LoRA aggregation rules, in the order of the module table."""


def available_lora_aggregators() -> list[str]:
    """Names accepted by :func:`aggregate_lora`."""
    return list(LORA_AGGREGATORS)


def _fed_sb(factors: Any, weights: Any) -> tuple[LoraAggregationResult, torch.Tensor, torch.Tensor]:
    """Fed-SB / LoRA-SB (Singhal et al. 2025, https://arxiv.org/abs/2502.15436): ``B (sum w_k R_k) A``, exact."""
    B, R, A = _triples(factors)
    K, r = R.shape[0], R.shape[1]
    w = _weights(weights, K, B)
    Rbar = torch.einsum("k,kij->ij", w, R)
    pair = (B @ Rbar, A)
    exact_pairs = [(B @ R[k], A) for k in range(K)]
    res = LoraAggregationResult(method="fed_sb", factors=[pair] * K, global_factors=pair, base_update=None,
                                residual=float("nan"), weights=w, ranks_in=(r,) * K, ranks_out=(r,) * K,
                                upload_floats=K * r * r, download_floats=K * r * r,
                                bytes_per_float=B.element_size(), info={"R_mean": Rbar})
    return res, *_stack(exact_pairs, w)


def aggregate_lora(name: str, factors: Any, weights: Any = None, *, scaling: Any = None,
                   compute_residual: bool = True, **options: Any) -> LoraAggregationResult:
    """Aggregate K clients' LoRA factors of one module with a named rule.

    Args:
        name: one of :func:`available_lora_aggregators`.
        factors: K pairs (B_k (d x r_k), A_k (r_k x p)) — tensors, arrays or objects with
            ``.B``/``.A``/``.scaling`` such as :class:`fedlora_lite.lora.LoraFactors`; for
            ``"fed_sb"`` K triples (B, R_k, A) with one shared B and A. K >= 1.
        weights: (K,) non-negative client weights (e.g. sample counts); default uniform.
        scaling: LoRA scaling alpha/r per client (float or K floats), multiplied into B_k.
        compute_residual: compute the exactness residual (one d x p product; turn off for
            large modules when only the served factors are needed).
        **options: the rule's options: ``atol`` (ffa_lora), ``rank`` (flexlora), ``beta``,
            ``lam``, ``reference``, ``personal`` (fedrpca).

    Returns:
        A :class:`LoraAggregationResult`.

    Raises:
        ValueError: unknown name (the message lists the valid ones), bad shapes or weights.
        TypeError: an option the rule does not take.
    """
    if not isinstance(name, str) or name not in LORA_AGGREGATORS:
        raise ValueError(f"name must be one of {available_lora_aggregators()}, got {name!r}")
    if name == "fed_sb":
        if options or scaling is not None:
            raise TypeError(f"lora aggregator 'fed_sb' got unknown options {sorted(options) + (['scaling'] if scaling is not None else [])}; it accepts no options")
        result, Bs, As = _fed_sb(factors, weights)
    else:
        fn = LORA_AGGREGATORS[name]
        check_options(name, fn, options, what="lora aggregator")
        pairs = as_factor_pairs(factors, "factors", scaling, min_clients=1)
        ranks = [B.shape[1] for B, _ in pairs]
        d, p = pairs[0][0].shape[0], pairs[0][1].shape[1]
        w = _weights(weights, len(pairs), pairs[0][0])
        s = fn(pairs, w, ranks, d, p, **options)
        result = LoraAggregationResult(method=name, factors=s.factors, global_factors=s.global_factors,
                                       base_update=s.base_update, residual=float("nan"), weights=w,
                                       ranks_in=tuple(ranks), ranks_out=s.ranks_out, upload_floats=s.up,
                                       download_floats=s.down, bytes_per_float=pairs[0][0].element_size(), info=s.info)
        Bs, As = _stack(pairs, w)
    if compute_residual:
        exact = Bs @ As
        B0, A0 = result.factors[0]
        if all(B is B0 and A is A0 for B, A in result.factors):  # one broadcast pair: form it once
            served = B0 @ A0
        else:
            served = sum(wk * (B @ A) for wk, (B, A) in zip(result.weights, result.factors))
        if result.base_update is not None:
            served = served + result.base_update
        denom = float(exact.norm())
        result.residual = float((served - exact).norm()) / denom if denom > 0 else float((served - exact).norm())
    return result
