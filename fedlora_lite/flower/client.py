"""The ClientApp: one node of the federated copy task, training LoRA locally with peft.

A node knows only its partition id (``context.node_config["partition-id"]``, set by the
simulation engine or by ``flower-supernode --node-config``) and the run config. From them
it rebuilds its own data exactly as the in-process experiment does
(:func:`~fedlora_lite.experiments.copy_task.make_client_pool` with the run seed: node p holds
client p; the last ``round(contamination K)`` partitions are contaminated, kinds in turn).

It answers three message types:

* ``query`` — who it is (partition id, number of partitions): the server's directory;
* ``train`` — merge the received update ΔW into the shipped base (exact), attach a fresh
  LoRA adapter from the run's common initialisation, fine-tune it on the node's pairs
  (:func:`~fedlora_lite.experiments.copy_task.train_on_pairs`, the same seeds as
  :func:`~fedlora_lite.experiments.copy_task.train_local_adapters` in round 1), and reply
  with the new adapter (the round's update) and metrics: ``num-examples``, ``train-loss``,
  ``accuracy-local`` (held-out token accuracy of base + ΔW + the new adapter);
* ``evaluate`` — held-out token accuracy of base + the received ΔW (``accuracy``), with
  ``benign`` (ground truth, bookkeeping for the results only: no strategy reads it).

Merging and re-initialising every round (rather than continuing one adapter) keeps every
upload a rank-r update from a common starting point, which is what CLAIR decomposes, while
the model a node holds may have any rank (FLoRA-style stacking, arXiv:2409.05976).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..core.runtime import make_generator
from ..experiments.copy_task.checkpoint import load_base
from ..experiments.copy_task.evaluation import Evaluator
from ..experiments.copy_task.sequences import collate
from ..experiments.copy_task.tasks import CopyTaskConfig, FederatedCopyTask, make_client_pool
from ..experiments.copy_task.training import train_on_pairs
from ..lora.factors import LoraAdapter, LoraFactors
from ..lora.peft_bridge import apply_deltas, attach_lora, extract_adapter
from .config import FlowerRunConfig
from .records import ADAPTER_KEY, CONFIG_KEY, METRICS_KEY, ReferenceAdapter, adapter_record, decode_deltas

__all__ = ["make_client_app", "client_app", "node_partition", "batch_seed", "reference_adapter", "node_pool"]


def batch_seed(seed: int, partition: int, server_round: int) -> int:
    """Seed of node ``partition``'s batch order in ``server_round`` (round 1 = the in-process one)."""
    return seed * 100_003 + partition + 7_919 * (server_round - 1)


@functools.lru_cache(maxsize=4)
def _base(base_dir: str | None):
    return load_base(base_dir, "cpu")


@functools.lru_cache(maxsize=8)
def _init(base_dir: str | None, local_json: str, seed: int) -> LoraAdapter:
    local = json.loads(local_json)
    model = attach_lora(_base(base_dir).model, local["target_modules"], r=local["rank"], alpha=local["alpha"],
                        seed=local["init_seed"] + seed)
    a = extract_adapter(model)
    return LoraAdapter({n: LoraFactors(f.A.cpu(), f.B.cpu(), f.scaling, f.fan_in_fan_out) for n, f in a.factors.items()},
                       a.r, a.alpha)


def _local_json(cfg: FlowerRunConfig) -> str:
    return str(cfg.to_run_config()["local"])


def reference_adapter(cfg: FlowerRunConfig) -> ReferenceAdapter:
    """The layout every adapter of the run has (modules, rank, shapes), from the base and ``cfg.local``."""
    return ReferenceAdapter.from_adapter(_init(cfg.base_dir, _local_json(cfg), cfg.seed))


@functools.lru_cache(maxsize=8)
def _pool(task_json: str, num_benign: int, num_contaminated: int, seed: int) -> FederatedCopyTask:
    task = json.loads(task_json)
    for key in ("kinds", "train_size", "length", "word_length"):
        task[key] = tuple(task[key])
    return make_client_pool(CopyTaskConfig(**task), num_benign, num_contaminated, make_generator(seed))


def node_pool(cfg: FlowerRunConfig) -> FederatedCopyTask:
    """All K clients of the run (node p holds ``node_pool(cfg).clients[p]``)."""
    n_c = cfg.num_contaminated
    return _pool(cfg.to_run_config()["task"], cfg.num_nodes - n_c, n_c, cfg.seed)


@functools.lru_cache(maxsize=4)
def _evaluator(base_dir: str | None, local_json: str, seed: int) -> Evaluator:
    base = _base(base_dir)
    init = _init(base_dir, local_json, seed)
    return Evaluator(base.model, base.tokenizer, init.module_names, {n: f.fan_in_fan_out for n, f in init.factors.items()})


def node_partition(context: Context, cfg: FlowerRunConfig) -> int:
    """The node's partition id, checked against the run (``num-partitions`` must equal K)."""
    nc = context.node_config
    if "partition-id" not in nc:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config 'partition-id=<p> num-partitions=<K>'")
    p, n = int(nc["partition-id"]), int(nc.get("num-partitions", cfg.num_nodes))
    if n != cfg.num_nodes or not 0 <= p < n:
        raise ValueError(f"node config partition-id={p}, num-partitions={n} does not fit a run with {cfg.num_nodes} nodes")
    return p


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _accuracy(cfg: FlowerRunConfig, partition: int, deltas: dict[str, torch.Tensor]) -> float:
    ev = _evaluator(cfg.base_dir, _local_json(cfg), cfg.seed)
    client = node_pool(cfg).clients[partition]
    ev.load(deltas)
    with torch.no_grad():
        return ev.token_accuracy(collate(ev.tokenizer, client.eval, device=ev.device))


def _received(message: Message, cfg: FlowerRunConfig) -> dict[str, torch.Tensor]:
    content = message.content
    record = content.array_records.get(ADAPTER_KEY, ArrayRecord())
    config = content.config_records.get(CONFIG_KEY, ConfigRecord())
    return decode_deltas(record, float(config.get("delta-scaling", 1.0)), reference_adapter(cfg))


def _inject_fault(record: ArrayRecord, adapter: LoraAdapter, kind: str | None) -> ArrayRecord:
    """A deliberately malformed reply (the server must exclude and record it, never crash)."""
    if kind is None:
        return record
    name = adapter.module_names[0]
    if kind == "crash":
        raise RuntimeError("injected fault: this node crashes while training")
    if kind == "nan":
        bad = {n: LoraFactors(f.A.clone(), f.B.clone(), f.scaling, f.fan_in_fan_out) for n, f in adapter.factors.items()}
        bad[name].A[0, 0] = float("nan")
        return adapter_record(LoraAdapter(bad, adapter.r, adapter.alpha))
    if kind == "rank":
        bad = {n: LoraFactors(torch.cat([f.A, torch.zeros(1, f.in_features)]), torch.cat([f.B, torch.zeros(f.out_features, 1)], 1),
                              f.scaling, f.fan_in_fan_out) for n, f in adapter.factors.items()}
        return adapter_record(LoraAdapter(bad, adapter.r + 1, adapter.alpha))
    out = ArrayRecord({k: v for k, v in record.items()})  # "keys": one factor renamed
    key = f"base_model.model.{name}.lora_B.weight"
    out[key.replace("lora_B", "lora_C")] = out.pop(key)
    return out


def _train(message: Message, context: Context, cfg: FlowerRunConfig) -> Message:
    p = node_partition(context, cfg)
    config = message.content.config_records.get(CONFIG_KEY, ConfigRecord())
    server_round = int(config.get("server-round", 1))
    with _threads(cfg.threads):
        base = _base(cfg.base_dir)
        client = node_pool(cfg).clients[p]
        received = _received(message, cfg)
        merged = apply_deltas(base.model, received, orientation="out_in")
        lc = cfg.local
        model = attach_lora(merged, list(lc.target_modules), r=lc.rank, alpha=lc.alpha, seed=lc.init_seed + cfg.seed,
                            copy_model=False)
        history = train_on_pairs(model, base.tokenizer, client.train, lc.train_config(),
                                 generator=make_generator(batch_seed(cfg.seed, p, server_round)))
        trained = extract_adapter(model)
        adapter = LoraAdapter({n: LoraFactors(f.A.cpu(), f.B.cpu(), f.scaling, f.fan_in_fan_out)
                               for n, f in trained.factors.items()}, trained.r, trained.alpha)
        local = {n: received[n] + adapter.factors[n].delta("out_in", torch.float64) for n in received}
        acc = _accuracy(cfg, p, local)
    record = _inject_fault(adapter_record(adapter), adapter, cfg.faults.get(p))
    metrics = MetricRecord({"num-examples": client.num_train, "train-loss": float(history.final_loss),
                            "accuracy-local": float(acc), "partition-id": p})
    return Message(RecordDict({ADAPTER_KEY: record, METRICS_KEY: metrics}), reply_to=message)


def _evaluate(message: Message, context: Context, cfg: FlowerRunConfig) -> Message:
    p = node_partition(context, cfg)
    with _threads(cfg.threads):
        acc = _accuracy(cfg, p, _received(message, cfg))
    client = node_pool(cfg).clients[p]
    metrics = MetricRecord({"num-examples": len(client.eval), "accuracy": float(acc), "benign": int(client.benign),
                            "partition-id": p})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=message)


def _query(message: Message, context: Context, cfg: FlowerRunConfig) -> Message:
    p = node_partition(context, cfg)
    info = ConfigRecord({"partition-id": p, "num-partitions": cfg.num_nodes})
    return Message(RecordDict({CONFIG_KEY: info}), reply_to=message)


def make_client_app(config: FlowerRunConfig | None = None) -> ClientApp:
    """A ClientApp for the federated copy task.

    Args:
        config: the run's settings when the app object is handed to the simulation engine
            directly; the run config (``context.run_config``) overrides any key it sets.

    Returns:
        A :class:`flwr.clientapp.ClientApp` with ``train``, ``evaluate`` and ``query`` handlers.
    """
    app = ClientApp()

    def resolve(context: Context) -> FlowerRunConfig:
        return FlowerRunConfig.from_run_config(context.run_config, base=config)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return _train(message, context, resolve(context))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return _evaluate(message, context, resolve(context))

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return _query(message, context, resolve(context))

    return app


client_app = make_client_app()
"""The ClientApp a deployment runs (``fedlora_lite.flower.client:client_app``), configured by the run config."""
