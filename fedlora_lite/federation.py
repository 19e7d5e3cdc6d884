"""The federated text-copying experiment end to end: local LoRA -> CLAIR / baselines -> evaluation.

One call, :func:`run_copy_experiment`, runs the paper's headline experiment:

1. **Local preliminary fine-tuning.** For every seed, a pool of clients is generated
   (:func:`fedlora_lite.tasks.make_client_pool`) and each client fine-tunes its own LoRA
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
   adapted module at once (:func:`fedlora_lite.factored.clair_factored_modules`): one
   low-rank + block-sparse fit per module, **one joint contamination decision per
   client** (block energies pooled over modules), and the refined update of every module
   for the collaborative set. The baselines (Local, FedAvg, oracle FedAvg, median,
   trimmed mean, geometric median, Krum) go through
   :func:`fedlora_lite.aggregation.aggregate`, module by module, on the dense
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

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import AdapterError, check_adapter, read_adapter, save_adapter
from .aggregation import aggregate, available_aggregators
from .factored import clair_factored_modules
from .lora import LoraAdapter, LoraFactors, attach_lora, deltas_to_lora_state, extract_adapter, load_lora_factors
from .metrics import detection_metrics
from .models import DEFAULT_BASE_DIR, CharTokenizer, load_base, sha256_file
from .runtime import make_generator, resolve_device
from .sequences import collate, greedy_exact_match, token_accuracy
from .tasks import CopyClient, CopyTaskConfig, FederatedCopyTask, make_client_pool
from .training import TrainConfig, train_on_pairs
from .validation import check_choice, check_fraction

__all__ = [
    "BASELINES",
    "LocalTrainingConfig",
    "ClairSettings",
    "ExperimentConfig",
    "LocalAdapters",
    "ExperimentResult",
    "train_local_adapters",
    "screen_adapters",
    "stack_deltas",
    "run_copy_experiment",
]

BASELINES: tuple[str, ...] = ("local", "fedavg", "oracle_fedavg", "median", "trimmed_mean", "geometric_median", "krum")
"""Baselines run on the same local adapters as CLAIR (names of :func:`fedlora_lite.aggregation.aggregate`)."""


def _default_task() -> CopyTaskConfig:
    return CopyTaskConfig(num_clients=10, contamination=0.3, letters="abcdefghijklmnop", num_shared=6, focus_size=6,
                          focus_mass=0.2, train_size=(2, 5), eval_size=64, length=(8, 16))


@dataclass(frozen=True)
class LocalTrainingConfig:
    """How every client fine-tunes its LoRA adapter locally.

    Attributes:
        target_modules: module-name suffixes to adapt (see :func:`fedlora_lite.lora.attach_lora`).
            Default: the MLP output projections of both blocks. A letter substitution is a
            per-token lookup-table edit, the kind of map an MLP stores; on this base,
            adapters there learn it from a few examples and average cleanly across
            clients (adapting the attention projections too adds client-specific noise).
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling alpha / r).
        steps: optimiser steps (full batch when the client has <= batch_size pairs).
        batch_size: pairs per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        init_seed: seed of the common adapter initialisation (offset by the run seed).
    """

    target_modules: tuple[str, ...] = ("mlp.c_proj",)
    rank: int = 4
    alpha: float = 8.0
    steps: int = 30
    batch_size: int = 16
    lr: float = 1e-2
    weight_decay: float = 0.0
    init_seed: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError("target_modules must be a non-empty tuple of module-name suffixes")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                           grad_clip=1.0)


@dataclass(frozen=True)
class ClairSettings:
    """CLAIR options used on the LoRA factors (see :func:`fedlora_lite.factored.clair_factored_modules`).

    Attributes:
        side: "column" shares the *output* directions of ΔW (the span of the B factors),
            "row" the input directions (span of the A factors). Every client starts from
            the same A, so input directions are shared by construction and carry little
            information about the task; output directions say *what* a client writes.
        lam: block-sparsity weight (None = the theory default, which treats the
            benign clients as exactly low-rank and flags every noisy LoRA update).
        mu: None (exact form), a positive float or "auto" (noisy form).
        rank: shared rank or "auto" (largest spectral gap of L-hat).
        max_rank: cap for rank="auto".
        threshold: flag a client when the fraction of its update (in Frobenius norm,
            pooled over modules) assigned to the block-sparse part exceeds this.
        refine: "average" or "project".
    """

    side: str = "column"
    lam: float | None = 1.0
    mu: float | str | None = None
    rank: int | str = 1
    max_rank: int | None = None
    threshold: float = 0.6
    refine: str = "average"

    def options(self) -> dict[str, Any]:
        return {"side": self.side, "lam": self.lam, "mu": self.mu, "rank": self.rank, "max_rank": self.max_rank,
                "threshold": self.threshold, "refine": self.refine}


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything :func:`run_copy_experiment` needs.

    Attributes:
        task: the federated copy task; ``task.num_clients`` is K and ``task.contamination``
            the headline contamination fraction (always part of the sweep).
        local: local LoRA fine-tuning settings.
        clair: CLAIR settings.
        seeds: one pool of clients (and one local training) per seed.
        sweep: contamination fractions evaluated on every seed's pool.
        methods: aggregators to compare; ``"clair"`` plus any of :data:`BASELINES` (or
            ``"multi_krum"``).
        method_options: per-method options for :func:`fedlora_lite.aggregation.aggregate`.
        exact_match_size: held-out pairs per benign client decoded greedily (headline
            fraction only; 0 disables).
        refactor_rank: also score CLAIR's refined updates re-factorised into adapters of
            this rank (headline fraction only; None disables).
        base_dir: checkpoint directory of the base; None = the shipped ``data/base_copy``.
        pretrain: if given, a :class:`fedlora_lite.pretrain.PretrainConfig`: the base is
            pretrained with it (cached under ``output_dir/base``) instead of loaded.
        device: "auto", "cpu", "cuda", ...
        output_dir: cache root (local adapters, pretrained base); None disables caching.
        on_invalid: "exclude" (drop invalid clients, record why) or "raise".
        progress: tqdm bars.
    """

    task: CopyTaskConfig = field(default_factory=_default_task)
    local: LocalTrainingConfig = field(default_factory=LocalTrainingConfig)
    clair: ClairSettings = field(default_factory=ClairSettings)
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    methods: tuple[str, ...] = BASELINES + ("clair",)
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"trimmed_mean": {"trim": 0.2}})
    exact_match_size: int = 16
    refactor_rank: int | None = 4
    base_dir: str | None = None
    pretrain: Any = None
    device: str = "auto"
    output_dir: str | None = None
    on_invalid: str = "exclude"
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.task, CopyTaskConfig):
            raise TypeError(f"task must be a CopyTaskConfig, got {type(self.task).__name__}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty tuple of non-negative ints, got {self.seeds!r}")
        object.__setattr__(self, "seeds", tuple(self.seeds))
        sweep = sorted({float(check_fraction(f, "sweep")) for f in self.sweep} | {float(self.task.contamination)})
        object.__setattr__(self, "sweep", tuple(sweep))
        allowed = set(available_aggregators())
        if not self.methods or any(m not in allowed for m in self.methods):
            raise ValueError(f"methods must be names from {sorted(allowed)}, got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        check_choice(self.on_invalid, "on_invalid", ("exclude", "raise"))
        if isinstance(self.exact_match_size, bool) or not isinstance(self.exact_match_size, int) or self.exact_match_size < 0:
            raise ValueError(f"exact_match_size must be a non-negative int, got {self.exact_match_size!r}")

    def pool_sizes(self) -> tuple[int, int]:
        """(benign, contaminated) clients needed so every sweep fraction can be formed."""
        n_cont = [_num_contaminated(f, self.task.num_clients) for f in self.sweep]
        return self.task.num_clients - min(n_cont), max(n_cont)


def _num_contaminated(fraction: float, K: int) -> int:
    return min(int(math.floor(fraction * K + 0.5)), K - 1)


# --------------------------------------------------------------------------- local training
@dataclass
class LocalAdapters:
    """The locally fine-tuned adapters of a client pool.

    Attributes:
        adapters: per client, a :class:`~fedlora_lite.lora.LoraAdapter` (factors on the CPU)
            or None if the client was excluded.
        excluded: client index -> reason (no data, invalid adapter).
        trained: adapters trained in this call.
        loaded: adapters read from the cache.
        cache_dir: where they are cached (None if caching is off).
    """

    adapters: list[LoraAdapter | None]
    excluded: dict[int, str]
    trained: int = 0
    loaded: int = 0
    cache_dir: Path | None = None


def _cache_key(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _base_fingerprint(model: torch.nn.Module, base_dir: Path | None) -> str:
    if base_dir is not None and (base_dir / "SHA256SUMS").is_file():
        return sha256_file(base_dir / "SHA256SUMS")
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def train_local_adapters(
    base: torch.nn.Module,
    tokenizer: CharTokenizer,
    clients: Sequence[CopyClient],
    cfg: LocalTrainingConfig,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    on_invalid: str = "exclude",
    progress: bool = False,
) -> LocalAdapters:
    """Fine-tune one LoRA adapter per client (or load it from ``cache_dir``).

    Every client starts from the same initial adapter (seed ``cfg.init_seed + seed``) and
    trains on its own pairs with its own batch-order generator. A client without training
    pairs cannot produce an update: it is excluded (``on_invalid="exclude"``) or a
    :class:`ValueError` is raised (``"raise"``).

    Args:
        base: the plain base model (not modified; a deep copy is adapted).
        tokenizer: its tokenizer.
        clients: the clients, in pool order.
        cfg: LoRA and optimiser settings.
        seed: run seed (initialisation and batch order).
        cache_dir: directory for ``client_NNN`` adapter folders (created); None = no cache.
        on_invalid: "exclude" or "raise".
        progress: tqdm bar over clients.

    Returns:
        :class:`LocalAdapters`.
    """
    check_choice(on_invalid, "on_invalid", ("exclude", "raise"))
    if not isinstance(cfg, LocalTrainingConfig):
        raise TypeError(f"cfg must be a LocalTrainingConfig, got {type(cfg).__name__}")
    cache = Path(cache_dir) if cache_dir is not None else None
    model = attach_lora(base, list(cfg.target_modules), r=cfg.rank, alpha=cfg.alpha, seed=cfg.init_seed + seed)
    init = extract_adapter(model)
    names, shapes = init.module_names, {n: (f.out_features, f.in_features) for n, f in init.factors.items()}
    out = LocalAdapters([None] * len(clients), {}, cache_dir=cache)
    it = enumerate(clients)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(clients), desc=f"local LoRA (seed {seed})", leave=False)
    for k, client in it:
        if client.num_train == 0:
            msg = f"client {k} has no training data"
            if on_invalid == "raise":
                raise ValueError(msg + "; it cannot fine-tune a local adapter")
            out.excluded[k] = "no training data"
            continue
        path = cache / f"client_{k:03d}" if cache is not None else None
        if path is not None and (path / "adapter_model.safetensors").is_file():
            try:
                adapter = read_adapter(path, name=f"client {k}")
                check_adapter(adapter, names, cfg.rank, reference_shapes=shapes, name=f"client {k}")
                out.adapters[k] = adapter
                out.loaded += 1
                continue
            except (AdapterError, OSError, ValueError) as exc:  # a corrupt cache entry is retrained
                warnings.warn(f"ignoring cached adapter of client {k}: {exc}", RuntimeWarning, stacklevel=2)
        load_lora_factors(model, init)
        gen = make_generator(seed * 100_003 + k)
        try:
            train_on_pairs(model, tokenizer, client.train, cfg.train_config(), generator=gen)
        except ValueError as exc:  # e.g. a diverged (non-finite) loss
            if on_invalid == "raise":
                raise ValueError(f"client {k}: local fine-tuning failed: {exc}") from exc
            out.excluded[k] = f"local fine-tuning failed: {exc}"
            continue
        adapter = extract_adapter(model)
        adapter = LoraAdapter({n: LoraFactors(f.A.cpu(), f.B.cpu(), f.scaling, f.fan_in_fan_out)
                               for n, f in adapter.factors.items()}, adapter.r, adapter.alpha)
        out.adapters[k] = adapter
        out.trained += 1
        if path is not None:
            save_adapter(adapter, path)
    return out


def screen_adapters(
    adapters: Sequence[LoraAdapter | Mapping[str, Any] | None],
    reference_names: Sequence[str],
    reference_rank: int,
    *,
    reference_shapes: Mapping[str, tuple[int, int]] | None = None,
    on_invalid: str = "exclude",
) -> tuple[list[int], dict[int, str]]:
    """Check received adapters against the reference before any aggregation.

    An adapter is invalid when it is missing (None: the client sent nothing), covers
    other modules than ``reference_names``, has another rank or shape, or holds NaN/Inf
    weights (:func:`fedlora_lite.adapters.check_adapter`).

    Args:
        adapters: per client, a LoraAdapter, a peft state dict, or None.
        reference_names: module names every adapter must cover exactly.
        reference_rank: the expected LoRA rank.
        reference_shapes: optional module -> (out_features, in_features).
        on_invalid: "exclude" returns the valid indices and the reasons for the others;
            "raise" raises :class:`~fedlora_lite.adapters.AdapterError` (a ValueError) at the
            first invalid adapter, naming the client and the module.

    Returns:
        (indices of valid adapters, {client index: reason}).
    """
    check_choice(on_invalid, "on_invalid", ("exclude", "raise"))
    valid: list[int] = []
    reasons: dict[int, str] = {}
    for k, adapter in enumerate(adapters):
        if adapter is None:
            if on_invalid == "raise":
                raise AdapterError(f"client {k}: no adapter received")
            reasons[k] = "no adapter received"
            continue
        try:
            check_adapter(adapter, reference_names, reference_rank, reference_shapes=reference_shapes, name=f"client {k}")
        except AdapterError as exc:
            if on_invalid == "raise":
                raise
            reasons[k] = str(exc)
            continue
        valid.append(k)
    return valid, reasons


def stack_deltas(adapters: Sequence[LoraAdapter], *, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Module name -> (K, out, in) exact updates ΔW = (alpha / r) B A of K adapters (nn.Linear orientation)."""
    if not adapters:
        raise ValueError("adapters is empty")
    names = adapters[0].module_names
    return {n: torch.stack([a.factors[n].delta("out_in", dtype) for a in adapters]) for n in names}


# --------------------------------------------------------------------------- evaluation
class _Evaluator:
    """A copy of the base whose adapted weights are overwritten with base + ΔW per evaluation."""

    def __init__(self, base: torch.nn.Module, tokenizer: CharTokenizer, names: Sequence[str], fan_in_fan_out: Mapping[str, bool]):
        import copy

        self.model = copy.deepcopy(base).eval()
        self.tokenizer = tokenizer
        self.device = next(self.model.parameters()).device
        self.modules = {n: self.model.get_submodule(n) for n in names}
        self.base_w = {n: m.weight.detach().clone() for n, m in self.modules.items()}
        self.fifo = dict(fan_in_fan_out)

    def load(self, deltas: Mapping[str, torch.Tensor] | None) -> None:
        """Set weights to base + ΔW (ΔW in out_in orientation); None restores the base."""
        with torch.no_grad():
            for n, m in self.modules.items():
                w = self.base_w[n]
                if deltas is not None:
                    d = deltas[n].T if self.fifo[n] else deltas[n]
                    w = w + d.to(device=w.device, dtype=w.dtype)
                m.weight.copy_(w)

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def token_accuracy(self, batch) -> float:
        with self._autocast():
            return float(token_accuracy(self.model, batch))

    def exact_match(self, pairs: Sequence[tuple[str, str]]) -> float:
        with self._autocast():
            return float(greedy_exact_match(self.model, self.tokenizer, [s for s, _ in pairs], [t for _, t in pairs]))


# --------------------------------------------------------------------------- results
@dataclass
class ExperimentResult:
    """Everything measured by :func:`run_copy_experiment`.

    Attributes:
        config: the configuration.
        records: one dict per (seed, contamination, method, benign client) with
            ``token_accuracy`` and ``exact_match`` (None where not measured).
        detection: one dict per (seed, contamination) with CLAIR's precision, recall, F1,
            flagged and truly contaminated clients, joint scores and kinds.
        spectra: per seed, per module: singular values of the stacked updates (output
            side) — ``local_all``, ``local_benign`` (true benign) and ``clair_refined``
            (CLAIR's collaborative set after refinement) — at the headline fraction.
        clair_ranks: per seed, per module: the shared rank CLAIR chose (headline fraction).
        excluded: per seed, client index -> reason.
        timings: seconds per stage (local training, aggregation, evaluation, total).
        cache: {"trained": n, "loaded": m} adapters over all seeds.
    """

    config: ExperimentConfig
    records: list[dict[str, Any]]
    detection: list[dict[str, Any]]
    spectra: dict[int, dict[str, dict[str, list[float]]]]
    clair_ranks: dict[int, dict[str, int]]
    excluded: dict[int, dict[int, str]]
    timings: dict[str, float]
    cache: dict[str, int]

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.records))

    def per_seed(self, metric: str = "token_accuracy", contamination: float | None = None) -> dict[str, np.ndarray]:
        """Method -> (S,) mean over benign clients of ``metric`` for each seed."""
        f = self.config.task.contamination if contamination is None else contamination
        out: dict[str, np.ndarray] = {}
        for m in self.methods:
            vals = []
            for s in self.config.seeds:
                xs = [r[metric] for r in self.records if r["method"] == m and r["seed"] == s
                      and abs(r["contamination"] - f) < 1e-9 and r[metric] is not None]
                if xs:
                    vals.append(float(np.mean(xs)))
            if vals:
                out[m] = np.array(vals)
        return out

    def table(self, contamination: float | None = None) -> list[dict[str, Any]]:
        """Rows (one per method) of mean ± std over seeds of the benign-client mean metrics."""
        acc = self.per_seed("token_accuracy", contamination)
        em = self.per_seed("exact_match", contamination)
        rows = []
        for m, v in acc.items():
            e = em.get(m)
            rows.append({"method": m, "token_accuracy_mean": float(v.mean()), "token_accuracy_std": float(v.std()),
                         "exact_match_mean": None if e is None else float(e.mean()),
                         "exact_match_std": None if e is None else float(e.std()), "seeds": int(v.size)})
        return rows

    def detection_summary(self) -> list[dict[str, Any]]:
        """Per contamination fraction: CLAIR's precision / recall / F1, mean and std over seeds."""
        rows = []
        for f in self.config.sweep:
            ds = [d for d in self.detection if abs(d["contamination"] - f) < 1e-9]
            if not ds:
                continue
            row: dict[str, Any] = {"contamination": f}
            for key in ("precision", "recall", "f1"):
                v = np.array([d[key] for d in ds])
                row[f"{key}_mean"], row[f"{key}_std"] = float(v.mean()), float(v.std())
            row["exact"] = sum(bool(d["exact"]) for d in ds)
            rows.append(row)
        return rows

    def sweep_curves(self, metric: str = "token_accuracy") -> dict[str, np.ndarray]:
        """Method -> (S, F) benign-client mean ``metric`` per seed and sweep fraction."""
        curves: dict[str, list[list[float]]] = {}
        for f in self.config.sweep:
            per = self.per_seed(metric, f)
            for m, v in per.items():
                curves.setdefault(m, []).append(list(v))
        return {m: np.array(v).T for m, v in curves.items() if len(v) == len(self.config.sweep)}


# --------------------------------------------------------------------------- the experiment
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
        res = clair_factored_modules({n: [a.factors[n] for a in adapters] for n in names}, **cfg.clair.options())
        est = {n: rf.dense() for n, rf in res.iter_refined()}
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
            evaluator = _Evaluator(base, tokenizer, reference.module_names,
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
