"""Synthetic LoRA uploads and Flower reply messages for strategy tests (no training, no engine)."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora_lite.flower.records import ADAPTER_KEY, METRICS_KEY, ReferenceAdapter, adapter_record
from fedlora_lite.lora import LoraAdapter, LoraFactors

REFERENCE = ReferenceAdapter(names=("blk.a", "blk.b"), rank=2, alpha=4.0, shapes={"blk.a": (8, 6), "blk.b": (5, 7)},
                             fan_in_fan_out={"blk.a": False, "blk.b": False})


def server_identity() -> None:
    """Messages read the creating process's identity (a ServerApp process has one)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def random_adapters(K: int, seed: int = 0, *, shared: float = 1.0, reference: ReferenceAdapter = REFERENCE,
                    outliers: tuple[int, ...] = ()) -> list[LoraAdapter]:
    """K rank-r adapters: a common B direction plus noise (outliers get a large unrelated B)."""
    g = torch.Generator().manual_seed(seed)
    common = {n: torch.randn(o, reference.rank, generator=g) for n, (o, i) in reference.shapes.items()}
    A0 = {n: torch.randn(reference.rank, i, generator=g) for n, (o, i) in reference.shapes.items()}
    out = []
    for k in range(K):
        f = {}
        for n, (o, i) in reference.shapes.items():
            B = shared * common[n] + 0.1 * torch.randn(o, reference.rank, generator=g)
            if k in outliers:
                B = 5.0 * torch.randn(o, reference.rank, generator=g)
            A = A0[n] + 0.05 * torch.randn(reference.rank, i, generator=g)
            f[n] = LoraFactors(A=A.float(), B=B.float(), scaling=reference.scaling)
        out.append(LoraAdapter(f, reference.rank, reference.alpha))
    return out


def instruction(node_id: int, server_round: int = 1, message_type: str = MessageType.TRAIN) -> Message:
    server_identity()
    return Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), dst_node_id=node_id,
                   message_type=message_type)


def reply(node_id: int, partition: int, record: ArrayRecord | None, examples: int = 4, *, metrics: dict | None = None,
          array_key: str = ADAPTER_KEY) -> Message:
    """A node's train reply carrying ``record`` and its metrics."""
    content = RecordDict()
    if record is not None:
        content[array_key] = record
    m = {"num-examples": examples, "train-loss": 0.5, "accuracy-local": 0.9, "partition-id": partition}
    content[METRICS_KEY] = MetricRecord(m if metrics is None else metrics)
    return Message(content, reply_to=instruction(node_id))


def replies_for(adapters: list[LoraAdapter], examples: list[int] | None = None, first_node: int = 100) -> list[Message]:
    examples = examples or [4] * len(adapters)
    return [reply(first_node + k, k, adapter_record(a), examples[k]) for k, a in enumerate(adapters)]


def flat_record(adapter: LoraAdapter) -> ArrayRecord:
    """The adapter's whole exact update ΔW (all modules, sorted) as one vector: what Flower's strategies would see."""
    vec = torch.cat([adapter.factors[n].delta("out_in", torch.float64).reshape(-1) for n in sorted(adapter.factors)])
    return ArrayRecord([vec.numpy()])


def flower_replies(adapters: list[LoraAdapter], examples: list[int] | None = None) -> list[Message]:
    examples = examples or [4] * len(adapters)
    return [Message(RecordDict({"arrays": flat_record(a), "metrics": MetricRecord({"num-examples": examples[k]})}),
                    reply_to=instruction(100 + k)) for k, a in enumerate(adapters)]
