"""The federated text-copying experiment end to end: local LoRA -> CLAIR / baselines -> evaluation.

One call, :func:`run_copy_experiment`, runs the paper's headline experiment:

1. **Local preliminary fine-tuning.** For every seed, a pool of clients is generated
   (:func:`fedlora_lite.experiments.copy_task.tasks.make_client_pool`) and each client fine-tunes its own LoRA
   adapter on its few examples, starting from the same adapter initialisation (as a
   server would broadcast it). Adapters are cached as peft/safetensors directories under
   ``<output_dir>/local_adapters/<key>/`` where ``<key>`` hashes everything that
   determines them (base weights, task, pool, seed, LoRA and optimiser settings), so a
   re-run loads instead of retraining.
2. **Reception.** Every adapter is screened like an untrusted upload
   (:func:`screen_adapters`): a client with no data, an adapter whose module names or
   ranks differ from the reference, or one with NaN/Inf weights is *excluded* from the
   federation (``on_invalid="exclude"``, the reason is recorded) or aborts the run with a
   :class:`ValueError` naming the client (``on_invalid="raise"``).
3. **Aggregation on exactly the same adapters.** CLAIR runs on the LoRA factors of every
   adapted module at once (:func:`fedlora_lite.clair.clair_factored_modules`): one
   low-rank + block-sparse fit per module, **one joint contamination decision per
   client** (block energies pooled over modules), and the refined update of every module
   for the collaborative set. The baselines (Local, FedAvg, oracle FedAvg, median,
   trimmed mean, geometric median, Krum) go through
   :func:`fedlora_lite.federated.aggregators.aggregate`, module by module, on the dense
   ΔW = (alpha / r) B A of the same adapters.
4. **Evaluation.** Each benign client's estimate is merged into the base weights
   (exact) and scored on the client's own held-out pairs: teacher-forced token accuracy
   on all of them, greedy exact match on a fixed subset (headline setting only). CLAIR's
   refined updates are also re-factorised into rank-r adapters
   (:func:`fedlora_lite.lora.deltas_to_lora_state`) and scored (``clair_rank_r``).

The contamination sweep reuses the pool: the federation with contamination fraction f
is the first ``K - round(f K)`` benign and the first ``round(f K)`` contaminated clients
of the pool, so the sweep costs no extra training.
"""

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...clair.api import clair_modules
from ...core.runtime import make_generator, resolve_device
from ...federated.aggregators import aggregate
from ...federated.metrics import detection_metrics
from ...lora.adapter_io import (
    screen_adapters,
)
from ...lora.factors import LoraAdapter, stack_deltas
from ...lora.refactor import deltas_to_lora_state
from .config import ExperimentConfig, _num_contaminated
from .evaluation import Evaluator
from .local import _base_fingerprint, _cache_key, train_local_adapters
from .checkpoint import DEFAULT_BASE_DIR, load_base
from .results import ExperimentResult
from .sequences import collate
from .tasks import FederatedCopyTask, make_client_pool

__all__ = ["run_copy_experiment"]


def _load_base(cfg: ExperimentConfig, device: torch.device):
    if cfg.pretrain is not None:
        from .pretrain import load_or_pretrain

        if cfg.output_dir is None:
            raise ValueError("pretrain needs output_dir (the pretrained base is cached there)")
        path = Path(cfg.output_dir) / "base"
        return load_or_pretrain(path, cfg.pretrain, device=device, progress=cfg.progress), path
    path = Path(cfg.base_dir) if cfg.base_dir is not None else DEFAULT_BASE_DIR
    return load_base(path, device), path


def _subset_indices(pool: FederatedCopyTask, fraction: float, K: int, excluded: Mapping[int, str]) -> list[int]:
    n_c = _num_contaminated(fraction, K)
    ben = [i for i, c in enumerate(pool.clients) if c.benign][: K - n_c]
    con = [i for i, c in enumerate(pool.clients) if not c.benign][:n_c]
    return [i for i in ben + con if i not in excluded]


def _estimates(method: str, deltas: Mapping[str, torch.Tensor], adapters: Sequence[LoraAdapter], benign: torch.Tensor,
               cfg: ExperimentConfig) -> tuple[dict[str, torch.Tensor], Any]:
    """Per-module (K, out, in) estimates of one method, plus CLAIR's result object (else None)."""
    if method == "clair":
        names = adapters[0].module_names
        res = clair_modules({n: [a.factors[n] for a in adapters] for n in names}, cfg.clair)
        est = {n: r.dense_refined() for n, r in res.iter_refined()}
        return est, res
    opts = dict(cfg.method_options.get(method, {}))
    return {n: aggregate(method, d, benign=benign, **opts).estimates for n, d in deltas.items()}, None


def run_copy_experiment(cfg: ExperimentConfig) -> ExperimentResult:
    """Run the federated copy experiment (see the module docstring) and return every metric.

    Args:
        cfg: an :class:`ExperimentConfig`.

    Returns:
        An :class:`ExperimentResult`.

    Raises:
        ValueError: bad configuration, too few valid clients after exclusion, or (with
            ``on_invalid="raise"``) an invalid client.
    """
    if not isinstance(cfg, ExperimentConfig):
        raise TypeError(f"cfg must be an ExperimentConfig, got {type(cfg).__name__}")
    t_start = time.perf_counter()
    timings = {"local_training": 0.0, "aggregation": 0.0, "evaluation": 0.0}
    device = resolve_device(cfg.device)
    (base, tokenizer, _), base_path = _load_base(cfg, device)
    base_fp = _base_fingerprint(base, base_path if cfg.pretrain is None else None)
    K = cfg.task.num_clients
    n_ben, n_con = cfg.pool_sizes()
    headline = float(cfg.task.contamination)
    records: list[dict[str, Any]] = []
    detection: list[dict[str, Any]] = []
    spectra: dict[int, dict[str, dict[str, list[float]]]] = {}
    clair_ranks: dict[int, dict[str, int]] = {}
    excluded_all: dict[int, dict[int, str]] = {}
    cache_stats = {"trained": 0, "loaded": 0}
    evaluator = None
    seeds = cfg.seeds
    if cfg.progress:
        from tqdm.auto import tqdm

        seeds = tqdm(seeds, desc="seeds")
    for seed in seeds:
        pool = make_client_pool(cfg.task, n_ben, n_con, make_generator(seed))
        cache_dir = None
        if cfg.output_dir is not None:
            key = _cache_key({"base": base_fp, "task": cfg.task.to_dict(), "pool": [n_ben, n_con], "seed": seed,
                              "local": asdict(cfg.local), "version": 1})
            cache_dir = Path(cfg.output_dir) / "local_adapters" / key
        t0 = time.perf_counter()
        local = train_local_adapters(base, tokenizer, pool.clients, cfg.local, seed=seed, cache_dir=cache_dir,
                                     on_invalid=cfg.on_invalid, progress=cfg.progress)
        timings["local_training"] += time.perf_counter() - t0
        cache_stats["trained"] += local.trained
        cache_stats["loaded"] += local.loaded
        reference = next((a for a in local.adapters if a is not None), None)
        if reference is None:
            raise ValueError(f"seed {seed}: no client produced a valid adapter")
        shapes = {n: (f.out_features, f.in_features) for n, f in reference.factors.items()}
        _, reasons = screen_adapters(local.adapters, reference.module_names, cfg.local.rank, reference_shapes=shapes,
                                     on_invalid=cfg.on_invalid)
        excluded = {**reasons, **local.excluded}
        excluded_all[seed] = dict(sorted(excluded.items()))
        if evaluator is None:
            evaluator = Evaluator(base, tokenizer, reference.module_names,
                                   {n: f.fan_in_fan_out for n, f in reference.factors.items()})
        batches = {k: collate(tokenizer, c.eval, device=device) for k, c in enumerate(pool.clients) if c.benign}
        local_acc: dict[int, float] = {}
        for f in cfg.sweep:
            idx = _subset_indices(pool, f, K, excluded)
            if len(idx) < 3:
                raise ValueError(f"seed {seed}, contamination {f}: only {len(idx)} valid clients left (need >= 3)")
            adapters = [local.adapters[i] for i in idx]
            benign = torch.tensor([pool.clients[i].benign for i in idx])
            if not bool(benign.any()):
                continue
            deltas = stack_deltas(adapters)
            is_head = abs(f - headline) < 1e-9
            for method in cfg.methods:
                t0 = time.perf_counter()
                est, res = _estimates(method, deltas, adapters, benign, cfg)
                timings["aggregation"] += time.perf_counter() - t0
                if res is not None:
                    dm = detection_metrics(res.flags, ~benign)
                    detection.append({"seed": seed, "contamination": f, "precision": dm.precision, "recall": dm.recall,
                                      "f1": dm.f1, "exact": dm.exact, "clients": idx,
                                      "flagged": [idx[j] for j in res.flagged_clients],
                                      "contaminated": [i for i in idx if not pool.clients[i].benign],
                                      "scores": [round(float(s), 4) for s in res.scores],
                                      "kinds": [pool.clients[i].kind for i in idx]})
                    if is_head:
                        clair_ranks[seed] = {n: s.rank for n, s in res.per_module.items()}
                        spectra[seed] = _spectra(deltas, est, benign, res.benign)
                t0 = time.perf_counter()
                variants = [(method, est)]
                if method == "clair" and is_head and cfg.refactor_rank is not None:
                    variants.append((f"clair_rank{cfg.refactor_rank}",
                                     _refactored(est, evaluator.fifo, cfg.refactor_rank, cfg.local.alpha)))
                for name, est_v in variants:
                    for j, i in enumerate(idx):
                        if not pool.clients[i].benign:
                            continue
                        if name == "local" and i in local_acc:
                            acc = local_acc[i]
                        else:
                            evaluator.load({n: e[j] for n, e in est_v.items()})
                            acc = evaluator.token_accuracy(batches[i])
                            if name == "local":
                                local_acc[i] = acc
                        em = None
                        if is_head and cfg.exact_match_size > 0:
                            evaluator.load({n: e[j] for n, e in est_v.items()})
                            em = evaluator.exact_match(pool.clients[i].eval[: cfg.exact_match_size])
                        records.append({"seed": seed, "contamination": f, "method": name, "client": i,
                                        "kind": pool.clients[i].kind, "token_accuracy": acc, "exact_match": em})
                timings["evaluation"] += time.perf_counter() - t0
        # the untouched base, for reference (headline clients only)
        t0 = time.perf_counter()
        evaluator.load(None)
        for i in _subset_indices(pool, headline, K, excluded):
            if pool.clients[i].benign:
                em = evaluator.exact_match(pool.clients[i].eval[: cfg.exact_match_size]) if cfg.exact_match_size else None
                records.append({"seed": seed, "contamination": headline, "method": "base", "client": i, "kind": "benign",
                                "token_accuracy": evaluator.token_accuracy(batches[i]), "exact_match": em})
        timings["evaluation"] += time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return ExperimentResult(cfg, records, detection, spectra, clair_ranks, excluded_all, timings, cache_stats)


def _spectra(deltas: Mapping[str, torch.Tensor], refined: Mapping[str, torch.Tensor], benign: torch.Tensor,
             collaborative: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    def sv(stack: torch.Tensor) -> list[float]:
        if stack.shape[0] == 0:
            return []
        return [float(x) for x in torch.linalg.svdvals(torch.cat(list(stack), dim=1))]

    out = {}
    coll = collaborative.to(torch.bool).cpu()
    for n, d in deltas.items():
        out[n] = {"local_all": sv(d), "local_benign": sv(d[benign]), "clair_refined": sv(refined[n][coll])}
    return out


def _refactored(est: Mapping[str, torch.Tensor], fifo: Mapping[str, bool], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """CLAIR's refined updates of every client re-factorised into a rank-``rank`` adapter and expanded again."""
    K = next(iter(est.values())).shape[0]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in est}
    for k in range(K):
        adapter = deltas_to_lora_state({n: e[k] for n, e in est.items()}, rank, alpha=alpha, orientation="out_in",
                                       fan_in_fan_out=dict(fifo))
        for n, d in adapter.deltas("out_in", torch.float64).items():
            out[n].append(d)
    return {n: torch.stack(v) for n, v in out.items()}
