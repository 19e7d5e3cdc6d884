"""The methods compared on the copy task, each as per-client *candidates* with an equal tuning budget.

Every method turns one federation's local adapters into, for each client, a short list of
candidate updates ΔW (module name -> (out, in)). A method without a knob has one
candidate; a method with a knob has one candidate per setting, at most
:data:`TUNING_BUDGET` (the size of CLAIR's weight grid), and each client keeps the
candidate with the best token accuracy on its own validation pairs (client-side
validation: the server sends the candidates, nobody trains on the validation pairs).
The same budget and the same rule for CLAIR and for every tunable baseline:

=====================  ==============================================================
``local``              the client's own update
``fedavg``             mean of all updates
``oracle_fedavg``      mean over the true benign clients (an oracle, not a method)
``median``             coordinate-wise median
``trimmed_mean``       coordinate-wise trimmed mean, trim fraction tuned
``geometric_median``   geometric median (Weiszfeld)
``krum``               Krum, its f tuned
``multi_krum``         Multi-Krum, (f, m) tuned
``svd_refine``         ablation without detection: top-r SVD of the whole stack (r = CLAIR's
                       rank), the paper's refinement with the mean over *all* clients
``detect_average``     CLAIR's flags, then the (norm-robust) mean over the unflagged
``clair_paper``        CLAIR's flags and the paper's refinement (weights (1, 0), plain mean)
``clair_shrinkage``    CLAIR with weights from the shrinkage estimate (no validation)
``clair``              CLAIR, weights (w_in, w_off) chosen by each client from the grid
=====================  ==============================================================

The four CLAIR variants share one CLAIR fit (flags, subspaces) and differ only in the
refinement, so their differences isolate the refinement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...clair import ClairConfig, clair_modules
from ...clair.refine import WEIGHT_GRID, apply_family, robust_mean_weights
from ...clair.rules import choose_rank
from ...federated import aggregate
from ...lora import LoraAdapter

__all__ = ["METHODS", "CLAIR_METHODS", "TUNING_BUDGET", "Federation", "MethodCandidates", "baseline_grid",
           "method_candidates"]

CLAIR_METHODS = ("detect_average", "clair_paper", "clair_shrinkage", "clair")
METHODS = ("local", "fedavg", "oracle_fedavg", "median", "trimmed_mean", "geometric_median", "krum", "multi_krum",
           "svd_refine") + CLAIR_METHODS
TUNING_BUDGET = len(WEIGHT_GRID)
"""Most candidates any method may send a client (CLAIR's 3 x 3 weight grid)."""


@dataclass
class Federation:
    """One federation: a subset of a seed's client pool with its local adapters.

    Attributes:
        seed, fraction: the pool's seed and the contamination fraction of this subset.
        indices: pool indices of the members (in order).
        adapters: their local adapters.
        benign: (K,) bool ground truth (used by ``oracle_fedavg`` and the scoring only).
        deltas: module -> (K, out, in) exact updates (float64).
    """

    seed: int
    fraction: float
    indices: list[int]
    adapters: list[LoraAdapter]
    benign: torch.Tensor
    deltas: dict[str, torch.Tensor] = field(repr=False)

    @property
    def num_clients(self) -> int:
        return len(self.indices)

    def factors(self) -> dict[str, list[Any]]:
        return {n: [a.factors[n] for a in self.adapters] for n in self.adapters[0].module_names}


@dataclass
class MethodCandidates:
    """A method's output on one federation.

    Attributes:
        candidates: per client, the list of candidate ΔW dicts (one for a method without a knob).
        labels: the setting of each candidate (same for every client).
        flags: (K,) bool clients the method treated as contaminated, or None.
        info: diagnostics (CLAIR's result under ``"clair"``).
    """

    candidates: list[list[dict[str, torch.Tensor]]]
    labels: list[str]
    flags: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def baseline_grid(method: str, K: int) -> list[dict[str, Any]]:
    """The settings a tunable baseline may send (at most :data:`TUNING_BUDGET`, distinct in effect)."""
    if method == "trimmed_mean":
        counts = sorted({math.floor(t * K) for t in (0.05 * i for i in range(1, 10)) if 1 <= math.floor(t * K) < K / 2})
        return [{"trim": (c + 0.5) / K} for c in counts][:TUNING_BUDGET] or [{"trim": 0.1}]
    if method in ("krum", "multi_krum"):
        fs = list(range(1, (K - 3) // 2 + 1)) or [0]
        if method == "krum":
            return [{"f": f} for f in fs][:TUNING_BUDGET]
        grid = [{"f": f, "m": m} for f in fs for m in sorted({K - f, max(1, K - 2 * f), max(1, (K + 1) // 2)})]
        return grid[:TUNING_BUDGET]
    return [{}]


def _per_client(est: Mapping[str, torch.Tensor], K: int) -> list[dict[str, torch.Tensor]]:
    return [{n: e[k] for n, e in est.items()} for k in range(K)]


def _svd_refine(deltas: Mapping[str, torch.Tensor], ranks: Mapping[str, int]) -> dict[str, torch.Tensor]:
    out = {}
    for n, M in deltas.items():
        K = M.shape[0]
        U, s, _ = torch.linalg.svd(torch.cat(list(M), dim=1), full_matrices=False)
        r = max(ranks.get(n) or choose_rank(s), 1)
        W = torch.tensor([[1.0, 0.0]] * K, dtype=M.dtype)
        out[n] = apply_family(M, U[:, :r], torch.ones(K, dtype=torch.bool), W, M.mean(dim=0))
    return out


def _clair_family(fed: Federation, res: Any, clip: float | None) -> dict[Any, list[dict[str, torch.Tensor]]]:
    """Dense refined updates of CLAIR's fit for every weight pair of the grid, plus the paper's point."""
    K, benign = fed.num_clients, res.benign.cpu()
    out: dict[Any, dict[str, torch.Tensor]] = {}
    for n, M in fed.deltas.items():
        U = res.per_module[n].subspace.to(M)
        if not bool(benign.any()):
            for key in (*WEIGHT_GRID, "paper"):
                out.setdefault(key, {})[n] = M
            continue
        from ...clair.fit import client_norms

        c = robust_mean_weights(client_norms(list(M)), benign, clip).to(M)
        mean = torch.einsum("k,kdp->dp", c, M)
        for w in WEIGHT_GRID:
            out.setdefault(w, {})[n] = apply_family(M, U, benign, torch.tensor([w] * K, dtype=M.dtype), mean)
        plain = M[benign].mean(dim=0)
        out.setdefault("paper", {})[n] = apply_family(M, U, benign, torch.tensor([(1.0, 0.0)] * K, dtype=M.dtype), plain)
    return {key: _per_client(est, K) for key, est in out.items()}


def method_candidates(methods: Sequence[str], fed: Federation, clair_cfg: ClairConfig,
                      tuned: bool = True) -> dict[str, MethodCandidates]:
    """Every requested method's candidates on one federation (CLAIR is fitted once for its variants).

    Args:
        methods: names from :data:`METHODS`.
        fed: the federation.
        clair_cfg: CLAIR's options (defaults: no hand-set knob).
        tuned: give tunable methods their grid (False: the first setting only).
    """
    K = fed.num_clients
    out: dict[str, MethodCandidates] = {}
    res = None
    if any(m in CLAIR_METHODS or m == "svd_refine" for m in methods):
        res = clair_modules(fed.factors(), clair_cfg.with_options(refine="adaptive"))
    for m in methods:
        if m in CLAIR_METHODS:
            continue
        if m == "svd_refine":
            ranks = {n: r.rank for n, r in res.per_module.items()}
            out[m] = MethodCandidates([[c] for c in _per_client(_svd_refine(fed.deltas, ranks), K)], ["CLAIR's rank"])
            continue
        grid = baseline_grid(m, K) if tuned else baseline_grid(m, K)[:1]
        per_setting, flags = [], None
        for opts in grid:
            ests = {n: aggregate(m, d, benign=fed.benign, **opts) for n, d in fed.deltas.items()}
            per_setting.append(_per_client({n: e.estimates for n, e in ests.items()}, K))
            flags = next(iter(ests.values())).flags if flags is None else flags
        labels = [",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in o.items()) or "-"
                  for o in grid]
        out[m] = MethodCandidates([[per_setting[i][k] for i in range(len(grid))] for k in range(K)], labels,
                                  flags=flags)
    if any(m in CLAIR_METHODS for m in methods):
        family = _clair_family(fed, res, clair_cfg.clip)
        info = {"clair": res}
        shrunk = _per_client({n: r.dense_refined() for n, r in res.per_module.items()}, K)
        variants = {
            "detect_average": ([[c] for c in family[(0.0, 0.0)]], ["(0, 0)"]),
            "clair_paper": ([[c] for c in family["paper"]], ["paper (1, 0)"]),
            "clair_shrinkage": ([[c] for c in shrunk], ["shrinkage"]),
            "clair": ([[family[w][k] for w in WEIGHT_GRID] for k in range(K)] if tuned else [[c] for c in shrunk],
                      [f"({a:g}, {b:g})" for a, b in WEIGHT_GRID] if tuned else ["shrinkage"]),
        }
        for m in methods:
            if m in variants:
                cands, labels = variants[m]
                out[m] = MethodCandidates(cands, labels, flags=res.flags, info=info)
    return out
