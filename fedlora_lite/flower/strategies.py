"""The strategies: CLAIR (personalised) and the baselines (global), all on exact LoRA products.

Every rule sees the round's uploads as exact per-module updates ΔW_k = scaling·B_k·A_k
(never A and B averaged separately) and returns an *increment* that is added to the
model(s) the nodes hold (:class:`~fedlora_lite.flower.strategy.LoraStrategy`):

=====================  ====================================================================
``fedavg``             mean of the ΔW_k, weighted by examples (``weighted=True``)
``median``             coordinate-wise median            (same vectors as Flower's ``FedMedian``)
``trimmed_mean``       coordinate-wise trimmed mean       (Flower's ``FedTrimmedAvg``)
``geometric_median``   Weiszfeld on the whole update
``krum``               the most central update            (Flower's ``Krum``)
``multi_krum``         mean of the m most central         (Flower's ``MultiKrum``)
``detect_average``     CLAIR's flags, then FedAvg of the unflagged (a global model; ours)
``clair``              CLAIR with the given ``ClairConfig``: one refined update per node
``clair_paper``        CLAIR with the paper's refinement (:func:`~fedlora_lite.flower.config.paper_clair_config`)
=====================  ====================================================================

The global rules go through :func:`fedlora_lite.federated.aggregate` on the concatenation
of all modules' ΔW (one vector per node, as Flower's strategies see a model), so Krum's
distances and the geometric median are computed on the whole update. CLAIR goes through
:func:`fedlora_lite.clair.clair_modules` on the LoRA factors (exact factored path, one
joint decision per node) — the same call as the in-process experiment.

Flagged nodes. Global rules send every node the same model (a flagged node is only left
out of the average). CLAIR follows ``flagged_policy``: ``own`` — the node keeps its own
update (what ``ClairResult.refined_updates`` holds for it), ``collaborative`` — it gets the
collaborative set's mean refined update, ``unchanged`` — its model stays as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..clair.api import clair_modules
from ..clair.config import ClairConfig
from ..core.validation import check_choice
from ..federated.aggregators import aggregate
from .config import FLAGGED_POLICIES, FlowerRunConfig, paper_clair_config
from ..lora.factors import LoraFactors
from .records import ReferenceAdapter
from .strategy import Combined, LoraStrategy, RoundUpdates

__all__ = ["TARGETS", "GlobalLoraStrategy", "DetectThenAverage", "ClairStrategy", "build_strategy", "method_clair_config",
           "flatten_updates"]

_GLOBAL = ("fedavg", "median", "trimmed_mean", "geometric_median", "krum", "multi_krum")


def flatten_updates(deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Module -> (K, out, in) as one (K, D, 1) stack (modules in sorted order), for whole-model rules."""
    return torch.cat([deltas[n].reshape(deltas[n].shape[0], -1) for n in sorted(deltas)], dim=1).unsqueeze(-1)


def _unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n in sorted(like):
        shape = like[n].shape[1:]
        size = int(torch.tensor(shape).prod())
        out[n] = vector[i: i + size].reshape(shape).to(torch.float64)
        i += size
    return out


def _jsonable(info: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in info.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist() if v.numel() <= 64 else None
        if isinstance(v, (int, float, str, bool, list)) or v is None:
            out[k] = v
    return out


class GlobalLoraStrategy(LoraStrategy):
    """A global rule of :func:`fedlora_lite.federated.aggregate` on the whole-model exact updates.

    Args:
        aggregator: ``fedavg``, ``median``, ``trimmed_mean``, ``geometric_median``, ``krum`` or ``multi_krum``.
        weighted: FedAvg weights the updates by the nodes' example counts.
        options: the aggregator's options (``trim``, ``f``, ``m``, ...).
        **kwargs: :class:`~fedlora_lite.flower.strategy.LoraStrategy` arguments.
    """

    personalised = False

    def __init__(self, aggregator: str, *, weighted: bool = True, options: Mapping[str, Any] | None = None, **kwargs: Any):
        check_choice(aggregator, "aggregator", _GLOBAL)
        super().__init__(method=kwargs.pop("method", aggregator), **kwargs)
        self.aggregator, self.weighted, self.options = aggregator, weighted, dict(options or {})

    def combine(self, updates: RoundUpdates) -> Combined:
        opts = dict(self.options)
        if self.aggregator == "fedavg" and self.weighted:
            opts["weights"] = updates.examples
        res = aggregate(self.aggregator, flatten_updates(updates.deltas), **opts)
        return Combined(center=_unflatten(res.estimates[0, :, 0], updates.deltas), flags=res.flags,
                        info=_jsonable(res.info))


TARGETS = ("model", "update")
"""What CLAIR decomposes each round: ``model`` — every participant's would-be model (the model
it holds plus its new update, exact LoRA factors ``[s_h B_h, s B_k] [A_h; A_k]``); ``update`` —
the round's updates alone. Both are the in-process computation in round 1 (every node holds
the base)."""


def _pairs(updates: RoundUpdates, target: str) -> dict[str, list[LoraFactors]]:
    names = updates.adapters[0].module_names
    out: dict[str, list[LoraFactors]] = {n: [] for n in names}
    for a, held in zip(updates.adapters, updates.held or [None] * len(updates.adapters)):
        for n in names:
            f = a.factors[n]
            if target == "update" or held is None:
                out[n].append(f)
                continue
            A_h, B_h, s_h = held[n]
            A = torch.cat([A_h.to(torch.float64), f.A.to(torch.float64)])
            B = torch.cat([s_h * B_h.to(torch.float64), f.scaling * f.B.to(torch.float64)], dim=1)
            out[n].append(LoraFactors(A=A, B=B, scaling=1.0, fan_in_fan_out=f.fan_in_fan_out))
    if target == "model" and any(h is not None for h in updates.held):  # one dtype for the whole stack
        out = {n: [LoraFactors(f.A.double(), f.B.double(), f.scaling, f.fan_in_fan_out) for f in fs] for n, fs in out.items()}
    return out


def _clair_fit(updates: RoundUpdates, config: ClairConfig, target: str = "update"):
    return clair_modules(_pairs(updates, target), config)


def _clair_info(res) -> dict[str, Any]:
    return {"rank": {n: int(r.rank) for n, r in res.per_module.items()},
            "lam": {n: float(r.lam) for n, r in res.per_module.items()}}


class DetectThenAverage(LoraStrategy):
    """CLAIR's contamination flags, then (weighted) FedAvg of the unflagged nodes' exact updates (ours).

    A global model: every node, flagged or not, receives the same average. With fewer
    than 3 unflagged nodes the mean is taken directly; with none the round changes nothing.
    ``target`` (:data:`TARGETS`) is what the flags are computed on.
    """

    personalised = False

    def __init__(self, clair_config: ClairConfig | None = None, *, weighted: bool = True, target: str = "model",
                 **kwargs: Any):
        super().__init__(method=kwargs.pop("method", "detect_average"), **kwargs)
        self.clair_config = ClairConfig() if clair_config is None else clair_config
        self.weighted, self.target = weighted, check_choice(target, "target", TARGETS)

    def combine(self, updates: RoundUpdates) -> Combined:
        res = _clair_fit(updates, self.clair_config, self.target)
        flags = res.flags.cpu().to(torch.bool)
        keep = ~flags
        flat = flatten_updates(updates.deltas)
        w = updates.examples if self.weighted else torch.ones_like(updates.examples)
        if int(keep.sum()) >= 3:
            center = aggregate("fedavg", flat[keep], weights=w[keep]).estimates[0, :, 0]
        elif bool(keep.any()):
            center = (w[keep, None] * flat[keep, :, 0]).sum(0) / w[keep].sum()
        else:
            center = torch.zeros_like(flat[0, :, 0])
        return Combined(center=_unflatten(center, updates.deltas), flags=flags, scores=res.scores,
                        info={**_clair_info(res), "averaged": int(keep.sum())})


class ClairStrategy(LoraStrategy):
    """CLAIR as a personalised Flower strategy: each node gets its own refined model.

    Args:
        clair_config: every CLAIR option (default ``ClairConfig()``), passed through unchanged.
        flagged_policy: what a flagged node receives (:data:`~fedlora_lite.flower.config.FLAGGED_POLICIES`).
        target: what CLAIR decomposes each round (:data:`TARGETS`). ``model`` (default):
            the participants' would-be models, so CLAIR compares whole models from the
            base as in the one-shot setting it was designed for and each benign node's new
            model is its refined model; ``update``: the round's updates alone, refined and
            added to each node's model (late in training the benign updates shrink to noise,
            which a scale-free score cannot tell from contamination).
        **kwargs: :class:`~fedlora_lite.flower.strategy.LoraStrategy` arguments.

    Communication: the uplink is one rank-r adapter, r (in + out) floats per module. The
    refined model of a benign node has rank up to r + min(|C| r, in, out) after one round
    (own in-subspace part plus the collaborative average off the subspace) and may grow to
    min(in, out) over rounds, so ``downlink="exact"`` sends up to min(in, out) (in + out)
    floats per module and node, while ``downlink="rank"`` (default) re-factorises to rank r
    by truncated SVD and costs what the uplink costs (Eckart–Young: the best rank-r
    approximation). Either way the downlink is one message per node: CLAIR cannot broadcast.
    """

    personalised = True

    def __init__(self, clair_config: ClairConfig | None = None, *, flagged_policy: str = "own", target: str = "model",
                 **kwargs: Any):
        super().__init__(method=kwargs.pop("method", "clair"), **kwargs)
        self.clair_config = ClairConfig() if clair_config is None else clair_config
        self.flagged_policy = check_choice(flagged_policy, "flagged_policy", FLAGGED_POLICIES)
        self.target = check_choice(target, "target", TARGETS)

    def combine(self, updates: RoundUpdates) -> Combined:
        res = _clair_fit(updates, self.clair_config, self.target)
        est = {n: r.dense_refined().to(torch.float64).cpu() for n, r in res.iter_refined()}
        flags = res.flags.cpu().to(torch.bool)
        if self.target == "model":  # the nodes' models before this round (flagged "unchanged" nodes keep them)
            before = {n: torch.stack([self.model_of(p)[n] for p in updates.partitions]) for n in est}
        if bool(flags.any()) and self.flagged_policy != "own":
            for n, e in est.items():
                if self.flagged_policy == "collaborative" and bool((~flags).any()):
                    e[flags] = e[~flags].mean(0)
                else:  # "unchanged" (or nobody left to learn from)
                    e[flags] = before[n][flags] if self.target == "model" else 0.0
        info = {**_clair_info(res), "target": self.target}
        if self.target == "model":
            return Combined(models=est, flags=flags, scores=res.scores, info=info)
        return Combined(estimates=est, flags=flags, scores=res.scores, info=info)


def method_clair_config(method: str, cfg: FlowerRunConfig) -> ClairConfig:
    """The :class:`~fedlora_lite.clair.ClairConfig` a CLAIR-based method of ``cfg`` runs with."""
    options = {k: v for k, v in cfg.method_options.get(method, {}).items() if k != "target"}
    return (paper_clair_config(cfg.clair) if method == "clair_paper" else cfg.clair).with_options(**options)


def build_strategy(method: str, cfg: FlowerRunConfig, reference: ReferenceAdapter, *,
                   checkpoint_dir: str | Path | None = None, save_updates: bool = False) -> LoraStrategy:
    """The strategy named ``method`` with the run's settings.

    Args:
        method: one of :data:`~fedlora_lite.flower.config.METHODS`.
        cfg: the run.
        reference: the run's adapter layout.
        checkpoint_dir: this method's checkpoint folder (None = none).
        save_updates: write each round's uploads and estimates next to the checkpoints.
    """
    common = dict(reference=reference, downlink=cfg.downlink, fraction_train=cfg.fraction_train,
                  min_replies=cfg.min_replies, min_available_nodes=cfg.num_nodes, seed=cfg.seed,
                  checkpoint_dir=checkpoint_dir, checkpoint_meta={"fingerprint": cfg.fingerprint()},
                  resume=cfg.resume, evaluate_base=cfg.evaluate_base, save_updates=save_updates)
    options = dict(cfg.method_options.get(method, {}))
    if method in _GLOBAL:
        return GlobalLoraStrategy(method, weighted=cfg.weighted, options=options, **common)
    target = options.get("target", "model")
    if method == "detect_average":
        return DetectThenAverage(method_clair_config(method, cfg), weighted=cfg.weighted, target=target, **common)
    if method in ("clair", "clair_paper"):
        return ClairStrategy(method_clair_config(method, cfg), flagged_policy=cfg.flagged_policy, target=target,
                             method=method, **common)
    raise ValueError(f"method must be one of {_GLOBAL + ('detect_average', 'clair', 'clair_paper')}, got {method!r}")
