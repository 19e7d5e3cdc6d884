"""The federated text-copying experiment end to end: local LoRA -> CLAIR / baselines -> evaluation.

One call, :func:`run_copy_experiment`, runs one regime of the paper's headline experiment:

1. **Local preliminary fine-tuning** (:mod:`~fedlora_lite.experiments.copy_task.local`): for
   every seed a pool of clients (:func:`~fedlora_lite.experiments.copy_task.tasks.make_client_pool`)
   fine-tunes one LoRA adapter each on its few examples, from the same broadcast
   initialisation; adapters are cached under ``output_dir`` keyed by everything that
   determines them.
2. **Reception**: every adapter is screened like an untrusted upload
   (:func:`fedlora_lite.lora.screen_adapters`); invalid clients are excluded (reason recorded)
   or abort the run (``on_invalid="raise"``).
3. **Methods on exactly the same adapters** (:mod:`~fedlora_lite.experiments.copy_task.methods`):
   each method gives every client one candidate update, or up to a fixed budget of
   candidates that the client chooses from on its own validation pairs.
4. **Evaluation**: each benign client's chosen estimate is scored on its held-out pairs,
   teacher-forced token accuracy for all (one batched forward pass per client through
   :meth:`~fedlora_lite.experiments.copy_task.evaluation.Evaluator.token_accuracies`), greedy
   exact match for a few methods at the headline fraction.

The contamination sweep reuses the pool: the federation with contamination fraction f
is the first ``K - round(f K)`` benign and the first ``round(f K)`` contaminated clients
of the pool, so the sweep costs no extra training.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...core.runtime import make_generator, resolve_device
from ...federated.metrics import detection_metrics
from ...lora.adapter_io import screen_adapters
from ...lora.factors import stack_deltas
from ...lora.refactor import deltas_to_lora_state
from .checkpoint import DEFAULT_BASE_DIR, load_base
from .config import ExperimentConfig, _num_contaminated
from .evaluation import Evaluator
from .local import _base_fingerprint, _cache_key, train_local_adapters
from .methods import Federation, MethodCandidates, method_candidates
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


def _prepare_seed(cfg: ExperimentConfig, seed: int, base: torch.nn.Module, tokenizer: Any, base_fp: str,
                  timings: dict[str, float], cache_stats: dict[str, int]) -> tuple[FederatedCopyTask, Any, dict[int, str]]:
    """One seed's client pool, its local adapters (trained or loaded) and the excluded clients."""
    n_ben, n_con = cfg.pool_sizes()
    pool = make_client_pool(cfg.task, n_ben, n_con, make_generator(seed))
    cache_dir = None
    if cfg.output_dir is not None:
        key = _cache_key({"base": base_fp, "task": cfg.task.to_dict(), "pool": [n_ben, n_con], "seed": seed,
                          "local": asdict(cfg.local), "version": 2})
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
    return pool, local, dict(sorted({**reasons, **local.excluded}.items()))


def _federation(pool: FederatedCopyTask, local: Any, seed: int, fraction: float, cfg: ExperimentConfig,
                excluded: Mapping[int, str]) -> Federation | None:
    idx = _subset_indices(pool, fraction, cfg.task.num_clients, excluded)
    if len(idx) < 3:
        raise ValueError(f"seed {seed}, contamination {fraction}: only {len(idx)} valid clients left (need >= 3)")
    benign = torch.tensor([pool.clients[i].benign for i in idx])
    if not bool(benign.any()):
        return None
    adapters = [local.adapters[i] for i in idx]
    return Federation(seed, fraction, idx, adapters, benign, stack_deltas(adapters))


def _choose(evaluator: Evaluator, batch: Any, outputs: Mapping[str, MethodCandidates], k: int) -> dict[str, int]:
    """Each method's candidate index for client k: the best validation accuracy (first on ties)."""
    flat = [(m, i) for m, out in outputs.items() if len(out.candidates[k]) > 1 for i in range(len(out.candidates[k]))]
    chosen = {m: 0 for m in outputs}
    if not flat or batch is None:
        return chosen
    accs = evaluator.token_accuracies(batch, [outputs[m].candidates[k][i] for m, i in flat])
    best: dict[str, tuple[float, int]] = {}
    for (m, i), a in zip(flat, accs):
        if m not in best or a > best[m][0] + 1e-12:
            best[m] = (a, i)
    chosen.update({m: i for m, (_, i) in best.items()})
    return chosen


def _detection_record(fed: Federation, pool: FederatedCopyTask, method: str, out: MethodCandidates) -> dict[str, Any]:
    dm = detection_metrics(out.flags, ~fed.benign)
    rec = {"seed": fed.seed, "contamination": fed.fraction, "method": method, "precision": dm.precision,
           "recall": dm.recall, "f1": dm.f1, "exact": dm.exact, "clients": fed.indices,
           "flagged": [fed.indices[j] for j in torch.nonzero(out.flags).flatten().tolist()],
           "contaminated": [i for i in fed.indices if not pool.clients[i].benign],
           "kinds": [pool.clients[i].kind for i in fed.indices]}
    res = out.info.get("clair")
    if res is not None:
        rec["scores"] = [round(float(s), 4) for s in res.scores]
        if res.detection is not None:
            rec["residual_ratio"] = round(res.detection.ratio, 4)
    return rec


def run_copy_experiment(cfg: ExperimentConfig) -> ExperimentResult:
    """Run one regime of the federated copy experiment (see the module docstring).

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
    headline = float(cfg.task.contamination)
    records: list[dict[str, Any]] = []
    detection: list[dict[str, Any]] = []
    spectra: dict[int, dict[str, dict[str, list[float]]]] = {}
    clair_ranks: dict[int, dict[str, int]] = {}
    paths: dict[int, dict[str, Any]] = {}
    excluded_all: dict[int, dict[int, str]] = {}
    cache_stats = {"trained": 0, "loaded": 0}
    evaluator = None
    seeds: Sequence[int] = cfg.seeds
    if cfg.progress:
        from tqdm.auto import tqdm

        seeds = tqdm(seeds, desc="seeds")
    for seed in seeds:
        pool, local, excluded = _prepare_seed(cfg, seed, base, tokenizer, base_fp, timings, cache_stats)
        excluded_all[seed] = excluded
        if evaluator is None:
            ref = next(a for a in local.adapters if a is not None)
            evaluator = Evaluator(base, tokenizer, ref.module_names, {n: f.fan_in_fan_out for n, f in ref.factors.items()})
        test = {k: collate(tokenizer, c.eval, device=device) for k, c in enumerate(pool.clients) if c.benign}
        val = {k: collate(tokenizer, c.val, device=device) for k, c in enumerate(pool.clients) if c.benign and c.val}
        local_acc: dict[int, float] = {}  # a client's own update scores the same in every federation
        for f in cfg.sweep:
            fed = _federation(pool, local, seed, f, cfg, excluded)
            if fed is None:
                continue
            is_head = abs(f - headline) < 1e-9
            t0 = time.perf_counter()
            methods = cfg.methods if is_head or cfg.sweep_methods is None else cfg.sweep_methods
            outputs = method_candidates(methods, fed, cfg.clair, cfg.tuned)
            timings["aggregation"] += time.perf_counter() - t0
            for m, out in outputs.items():
                if out.flags is not None and (m == "clair" or m in ("krum", "multi_krum")):
                    detection.append(_detection_record(fed, pool, m, out))
            clair_out = outputs.get("clair")
            if is_head and clair_out is not None:
                res = clair_out.info["clair"]
                clair_ranks[seed] = {n: r.rank for n, r in res.per_module.items()}
                if res.detection is not None:
                    rep = res.detection
                    paths[seed] = {"ranks": rep.ranks, "residuals": rep.residuals.tolist(), "run": rep.run,
                                   "ratio": rep.ratio, "guard": rep.guard, "flags": res.flags.tolist(),
                                   "scores": res.scores.tolist(), "contaminated": (~fed.benign).tolist()}
                spectra[seed] = _spectra(fed.deltas, {n: r.dense_refined() for n, r in res.per_module.items()},
                                         fed.benign, res.benign)
            t0 = time.perf_counter()
            records += _evaluate(fed, pool, outputs, evaluator, test, val, cfg, is_head, local_acc)
            timings["evaluation"] += time.perf_counter() - t0
        # the untouched base, for reference (headline clients only)
        evaluator.load(None)
        for i in _subset_indices(pool, headline, cfg.task.num_clients, excluded):
            if pool.clients[i].benign:
                em = (evaluator.exact_match(pool.clients[i].eval[: cfg.exact_match_size])
                      if cfg.exact_match_size else None)
                records.append({"seed": seed, "contamination": headline, "method": "base", "client": i,
                                "kind": "benign", "token_accuracy": evaluator.token_accuracy(test[i]),
                                "exact_match": em, "choice": "-"})
    timings["total"] = time.perf_counter() - t_start
    return ExperimentResult(cfg, records, detection, spectra, clair_ranks, excluded_all, timings, cache_stats, paths)


def _evaluate(fed: Federation, pool: FederatedCopyTask, outputs: Mapping[str, MethodCandidates], evaluator: Evaluator,
              test: Mapping[int, Any], val: Mapping[int, Any], cfg: ExperimentConfig, is_head: bool,
              local_acc: dict[int, float]) -> list[dict[str, Any]]:
    """Records (one per method and benign client) of one federation."""
    records = []
    names = list(outputs)
    for j, i in enumerate(fed.indices):
        if not pool.clients[i].benign:
            continue
        chosen = _choose(evaluator, val.get(i), outputs, j)
        picks = {m: outputs[m].candidates[j][chosen[m]] for m in names}
        extra = {}
        if is_head and cfg.refactor_rank is not None and "clair" in picks:
            extra[f"clair_rank{cfg.refactor_rank}"] = _refactored_one(picks["clair"], evaluator.fifo, cfg.refactor_rank,
                                                                     cfg.local.alpha)
        labels = names + list(extra)
        todo = [m for m in labels if not (m == "local" and i in local_acc)]
        cand = {**picks, **extra}
        got = dict(zip(todo, evaluator.token_accuracies(test[i], [cand[m] for m in todo])))
        if "local" in got:
            local_acc[i] = got["local"]
        accs = [got[m] if m in got else local_acc[i] for m in labels]
        for m, acc in zip(labels, accs):
            em = None
            if is_head and cfg.exact_match_size > 0 and m in cfg.exact_match_methods:
                evaluator.load(cand[m])
                em = evaluator.exact_match(pool.clients[i].eval[: cfg.exact_match_size])
            choice = outputs[m].labels[chosen[m]] if m in outputs else "refactored"
            records.append({"seed": fed.seed, "contamination": fed.fraction, "method": m, "client": i,
                            "kind": pool.clients[i].kind, "token_accuracy": acc, "exact_match": em, "choice": choice})
    return records


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


def _refactored_one(est: Mapping[str, torch.Tensor], fifo: Mapping[str, bool], rank: int,
                    alpha: float) -> dict[str, torch.Tensor]:
    """One client's refined updates re-factorised into a rank-``rank`` adapter and expanded again."""
    adapter = deltas_to_lora_state(dict(est), rank, alpha=alpha, orientation="out_in", fan_in_fan_out=dict(fifo))
    return adapter.deltas("out_in", torch.float64)
