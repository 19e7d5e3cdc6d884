"""Attack x aggregator x fraction grids: cached, resumable cells and the per-cell evaluation.

:func:`run_grid` evaluates a list of parameter cells, storing each finished cell as
``<cache_dir>/<key>.json`` where ``key`` hashes the cell's parameters (plus anything else
that determines it, ``context=``); a re-run loads the finished cells and computes only the
missing ones, with a progress bar. :func:`evaluate_aggregators` runs several aggregators
on the same (possibly multi-module) contaminated updates, giving every robust rule the true
number of byzantine clients as its assumed f (the convention of ByzFL's benchmark), and
:func:`regression_cell` scores them on a synthetic regression federation.
:func:`cell_means`, :func:`worst_case` and :func:`breakdown_fraction` turn the rows into
heatmaps, the worst case over attacks per aggregator (the way ByzFL's benchmark ranks
rules) and the contamination at which a rule stops beating Local.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.validation import check_fraction, check_positive
from .aggregators import aggregate
from .attacks import attack
from .lowrank import factor_updates, truncate_updates
from .metrics import detection_metrics, relative_errors
from .result import check_f

__all__ = ["cell_key", "run_grid", "assumed_f_options", "contaminate_modules", "evaluate_aggregators", "regression_cell",
           "cell_means", "worst_case", "breakdown_fraction"]

_F_BOUNDS = {"krum": "krum", "multi_krum": "krum", "bulyan": "bulyan", "mda": "majority"}


def cell_key(params: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> str:
    """16 hex digits of the SHA-256 of the cell's parameters and context (JSON, sorted keys)."""
    payload = {"params": dict(params), "context": dict(context or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_grid(cells: Iterable[Mapping[str, Any]], evaluate: Callable[[Mapping[str, Any]], Mapping[str, Any]],
             cache_dir: str | Path | None, *, context: Mapping[str, Any] | None = None, progress: bool = True,
             desc: str = "grid") -> list[dict[str, Any]]:
    """Evaluate every cell once, caching results on disk; finished cells are skipped on a re-run.

    Args:
        cells: parameter dicts (JSON-serialisable values).
        evaluate: cell -> JSON-serialisable result mapping.
        cache_dir: folder for ``<key>.json`` files (created); None disables caching.
        context: settings shared by all cells that change their results (sizes, seeds,
            versions): part of every key, so a changed setting never reuses stale cells.
        progress: tqdm bar over the cells.

    Returns:
        One ``{**cell, **result}`` dict per cell, in order.
    """
    cells = [dict(c) for c in cells]
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    it: Iterable[dict[str, Any]] = cells
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cells, desc=desc)
    out = []
    for cell in it:
        path = cache / f"{cell_key(cell, context)}.json" if cache is not None else None
        result = None
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored.get("params") == json.loads(json.dumps(cell, default=str)):
                    result = stored["result"]
            except (OSError, ValueError, KeyError):  # a torn or foreign file: recompute the cell
                result = None
        if result is None:
            result = dict(evaluate(cell))
            if path is not None:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"params": cell, "context": context, "result": result}, default=str))
                tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cell
        out.append({**cell, **result})
    return out


def assumed_f_options(method: str, K: int, num_byzantine: int) -> dict[str, Any]:
    """Options telling a rule that ``num_byzantine`` clients are byzantine (capped at what the rule tolerates).

    f for Krum, Multi-Krum, Bulyan, MDA and NNM compositions; ``trim = f / K`` for the
    trimmed mean (below 1/2). Other rules get no option.
    """
    pre, _, final = method.rpartition("+")
    opts: dict[str, Any] = {}
    if final in _F_BOUNDS or pre:
        bounds = [_F_BOUNDS[final]] if final in _F_BOUNDS else []
        bounds += ["majority"] if pre else []
        opts["f"] = min(check_f(None, K, bound=b) for b in bounds) if num_byzantine else 0
        opts["f"] = min(opts["f"], num_byzantine)
    if final == "trimmed_mean":
        opts["trim"] = min(num_byzantine / K, (math.ceil(K / 2) - 1) / K)
    return opts


def contaminate_modules(name: str, updates: Mapping[str, torch.Tensor], benign: torch.Tensor, *, seed: int = 0,
                        lora_rank: int | None = None, **options: Any) -> dict[str, torch.Tensor]:
    """Replace the clients with ``benign[k] == False`` by byzantine updates, module by module.

    Args:
        name: attack name; updates: module -> (K, d_m, p_m) honest updates; benign: (K,) mask.
        seed: the attack's randomness (one derived generator per module).
        lora_rank: if given, every byzantine update is replaced by its best rank-``lora_rank``
            approximation: what a byzantine client can send as a rank-r LoRA adapter.
        **options: the attack's options (e.g. ``rank=`` for ``"clair_adaptive"``, so that its
            search already accounts for the truncation).

    Returns:
        module -> (K, d_m, p_m) updates with the byzantine rows replaced.
    """
    bad = ~benign
    f = int(bad.sum())
    out = {}
    for j, (module, M) in enumerate(updates.items()):
        X = M.clone()
        if f:
            B = attack(name, M[benign.to(M.device)], f, generator=torch.Generator().manual_seed(seed * 1_000_003 + j),
                       **options)
            X[bad.to(M.device)] = B if lora_rank is None else truncate_updates(B, lora_rank)
        out[module] = X
    return out


def evaluate_aggregators(updates: torch.Tensor | Mapping[str, torch.Tensor], benign: torch.Tensor,
                         methods: Sequence[str], *, options: Mapping[str, Mapping[str, Any]] | None = None,
                         assumed_f: bool = True, lora_rank: int | None = None,
                         ) -> dict[str, tuple[Any, torch.Tensor | None]]:
    """Run several aggregators on the same updates: name -> (estimates, flags).

    Args:
        updates: (K, d, p) updates, or module -> (K, d_m, p_m); CLAIR then decides jointly
            over modules (:func:`fedlora_lite.clair.clair_modules`), the others aggregate
            module by module.
        benign: (K,) true benign mask (used for ``oracle_fedavg`` and the assumed f).
        methods: aggregator names (``"clair"`` included).
        options: per-method options (override the assumed-f ones).
        assumed_f: give the robust rules f = number of byzantine clients.
        lora_rank: the updates are rank-r LoRA updates (r = ``lora_rank``): CLAIR then gets
            their exact factors (:func:`~fedlora_lite.federated.lowrank.factor_updates`) and
            takes its factored path (same answer, much faster); a ValueError if an update
            has a larger rank.

    Returns:
        name -> (estimates: (K, d, p) or module -> (K, d_m, p_m), flags (K,) or None).
    """
    single = isinstance(updates, torch.Tensor)
    mods = {"_": updates} if single else dict(updates)
    K = benign.shape[0]
    n_byz = int((~benign).sum())
    out: dict[str, tuple[Any, torch.Tensor | None]] = {}
    for method in methods:
        opts = dict(assumed_f_options(method, K, n_byz)) if assumed_f else {}
        opts.update((options or {}).get(method, {}))
        if method == "clair" and (not single or lora_rank is not None):
            from ..clair.api import clair_modules  # local import: the solver is only needed here

            res = clair_modules(mods if lora_rank is None else factor_updates(mods, lora_rank), **opts)
            est = {n: r.dense_refined() for n, r in res.iter_refined()}
            out[method] = (est["_"] if single else est, res.flags)
            continue
        est, flags = {}, None
        for n, M in mods.items():
            r = aggregate(method, M, benign=benign, **opts)
            est[n] = r.estimates
            flags = r.flags if flags is None else (flags | r.flags if r.flags is not None else flags)
        out[method] = (est["_"] if single else est, flags)
    return out


def regression_cell(local: torch.Tensor, truth: torch.Tensor, attack_name: str, fraction: float, methods: Sequence[str],
                    *, seed: int = 0, attack_options: Mapping[str, Any] | None = None,
                    options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """One grid cell on a regression federation: attack the local estimates, aggregate, score the benign clients.

    ``round(fraction * K)`` clients at seeded positions send the attack's updates instead of
    their local estimates; every method's benign-client error is the mean relative error
    ``||est_k - Theta_k|| / ||Theta_k||`` over the benign clients, and its detection (for
    methods that flag) precision / recall / false-positive rate against the byzantine set.

    Returns:
        ``{"error": {method: float}, "precision": {...}, "recall": {...}, "fpr": {...},
        "local_error": float, "num_byzantine": int}`` (detection only for methods that flag).
    """
    from .attacks import contaminate

    check_fraction(fraction, "fraction")
    X, benign = contaminate(attack_name, local, fraction, generator=torch.Generator().manual_seed(seed),
                            **dict(attack_options or {}))
    results = evaluate_aggregators(X, benign, methods, options=options)
    out: dict[str, Any] = {"error": {}, "precision": {}, "recall": {}, "fpr": {}, "num_byzantine": int((~benign).sum())}
    out["local_error"] = float(relative_errors(local[benign], truth[benign]).mean())
    for method, (est, flags) in results.items():
        out["error"][method] = float(relative_errors(est[benign], truth[benign]).mean())
        if flags is not None:
            dm = detection_metrics(flags.cpu(), (~benign).cpu())
            out["precision"][method], out["recall"][method] = dm.precision, dm.recall
            out["fpr"][method] = dm.fpr
    return out


def cell_means(rows: Sequence[Mapping[str, Any]], metric: str, *, by: Sequence[str] = ("attack", "fraction"),
               ) -> dict[str, dict[tuple[Any, ...], float]]:
    """method -> {(row[by[0]], row[by[1]], ...): mean of ``row[metric][method]``} over the other keys (e.g. seeds).

    Args:
        rows: :func:`run_grid` output whose results hold ``metric`` as a method -> value mapping.
        metric: e.g. ``"error"``, ``"accuracy"``, ``"recall"``.
        by: the cell keys to keep; the rows are averaged over everything else.
    """
    sums: dict[str, dict[tuple[Any, ...], list[float]]] = {}
    for row in rows:
        if metric not in row:
            raise ValueError(f"metric must be one of the row's result keys, got {metric!r}; a row has {sorted(row)}")
        key = tuple(row[b] for b in by)
        for method, value in row[metric].items():
            sums.setdefault(method, {}).setdefault(key, []).append(float(value))
    return {m: {k: sum(v) / len(v) for k, v in cells.items()} for m, cells in sums.items()}


def worst_case(means: Mapping[str, Mapping[tuple[Any, Any], float]], *, higher_is_worse: bool = True,
               ) -> dict[str, dict[Any, tuple[float, Any]]]:
    """method -> {fraction: (worst value over the attacks, that attack)}: ByzFL's benchmark ranking.

    Args:
        means: :func:`cell_means` output keyed by (attack, fraction).
        higher_is_worse: True for errors, False for accuracies.
    """
    out: dict[str, dict[Any, tuple[float, Any]]] = {}
    for method, cells in means.items():
        per: dict[Any, tuple[float, Any]] = {}
        for (attack_name, fraction), value in cells.items():
            worse = fraction not in per or (value > per[fraction][0] if higher_is_worse else value < per[fraction][0])
            if worse:
                per[fraction] = (value, attack_name)
        out[method] = dict(sorted(per.items()))
    return out


def breakdown_fraction(means: Mapping[str, Mapping[tuple[Any, Any], float]], method: str, reference: str = "local", *,
                       higher_is_worse: bool = True, margin: float = 0.0) -> tuple[float, Any] | None:
    """Smallest fraction at which some attack makes ``method`` worse than ``reference`` in the same cell.

    Args:
        means: :func:`cell_means` output keyed by (attack, fraction).
        method, reference: names in ``means`` (default reference: Local, no collaboration).
        higher_is_worse: True for errors, False for accuracies.
        margin: "worse" means worse by more than this (in the metric's units), so evaluation
            noise is not read as a breakdown.

    Returns:
        ``(fraction, attack)`` of the first such cell (the attack with the largest excess at
        that fraction), or None if the method is never worse. With Local as the reference this
        is the contamination beyond which collaborating under that method hurts the benign
        clients, against the worst tested attack (our operational breakdown point; the
        classical one, where the error becomes unbounded, needs an unbounded attack).
    """
    for name in (method, reference):
        if name not in means:
            raise ValueError(f"method and reference must be keys of means, got {name!r}; known: {sorted(means)}")
    margin = check_positive(margin, "margin", allow_zero=True)
    sign = 1.0 if higher_is_worse else -1.0
    by_fraction: dict[Any, list[tuple[float, Any]]] = {}
    for (attack_name, fraction), value in means[method].items():
        if (attack_name, fraction) in means[reference]:
            excess = sign * (value - means[reference][(attack_name, fraction)])
            by_fraction.setdefault(fraction, []).append((excess, attack_name))
    for fraction in sorted(by_fraction):
        excess, attack_name = max(by_fraction[fraction], key=lambda t: t[0])
        if excess > margin:
            return fraction, attack_name
    return None
