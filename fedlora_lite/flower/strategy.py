"""The round machinery every LoRA strategy shares, on Flower's own ``FedAvg`` / ``Strategy`` classes.

:class:`LoraStrategy` subclasses :class:`flwr.serverapp.strategy.FedAvg` (and so
``Strategy``) and keeps its contract: ``configure_train`` -> ``aggregate_train`` ->
``configure_evaluate`` -> ``aggregate_evaluate`` per round, run by ``start``. What it adds:

* **a directory** node id -> partition id, learned with one ``query`` message the first
  time a node is seen (node ids change between deployments; partition ids do not);
* **one model per node**: every node's current update ΔW, sent with its own message
  (personalised strategies) or one global ΔW for all (global strategies), encoded by
  :func:`~fedlora_lite.flower.records.encode_deltas`;
* **screening** of every reply before anything is computed from it: error replies,
  wrong keys, wrong ranks or shapes, NaN/Inf, missing metrics and stragglers are
  excluded and recorded with the reason; a round with fewer than ``min_replies`` valid
  replies keeps every model and says so;
* **deterministic sampling** (``fraction_train`` < 1: partial participation) seeded by
  (seed, round), identical for every method of a run;
* **accounting**: bytes down and up per phase and round, as Flower counts a record's
  bytes (``count_bytes``);
* **checkpoints and resume** (:mod:`~fedlora_lite.flower.checkpoint`): ``start`` continues
  from the last completed round.

Subclasses implement :meth:`LoraStrategy.combine` (see :mod:`fedlora_lite.flower.strategies`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log

from ..lora.adapter_io import AdapterError
from ..lora.factors import LoraAdapter, stack_deltas
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint, save_round_updates
from .records import ADAPTER_KEY, CONFIG_KEY, METRICS_KEY, ReferenceAdapter, content_bytes, encode_deltas, parse_adapter

__all__ = ["RoundUpdates", "Combined", "LoraStrategy"]


@dataclass
class RoundUpdates:
    """The valid uploads of one round, sorted by partition.

    Attributes:
        partitions: (K,) partition ids.
        adapters: K :class:`~fedlora_lite.lora.LoraAdapter` (rank r, float32).
        deltas: module -> (K, out, in) exact products scaling·B·A, float64.
        examples: (K,) training examples per node, float64.
        held: per node, the model it trained from as the factors it was sent, module ->
            (A, B, scaling) with ``scaling·B·A`` its ΔW; None = the untouched base.
    """

    partitions: list[int]
    adapters: list[LoraAdapter]
    deltas: dict[str, torch.Tensor]
    examples: torch.Tensor
    held: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None] = field(default_factory=list)


@dataclass
class Combined:
    """What a rule makes of a round.

    Attributes:
        center: module -> (out, in) one update for every node (global rules), or None.
        estimates: module -> (K, out, in) one update per participant, added to its model (personalised rules).
        models: module -> (K, out, in) each participant's new model (personalised rules that
            aggregate models rather than the round's updates), or None.
        flags: (K,) bool, True = treated as contaminated; None if the rule makes no such decision.
        scores: (K,) contamination scores, or None.
        info: JSON-friendly diagnostics.
    """

    center: dict[str, torch.Tensor] | None = None
    estimates: dict[str, torch.Tensor] | None = None
    models: dict[str, torch.Tensor] | None = None
    flags: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class LoraStrategy(FedAvg):
    """Base of the federated LoRA strategies (see the module docstring).

    Args:
        reference: the run's adapter layout (what every upload must look like).
        method: name recorded in the history.
        downlink: ``"rank"`` or ``"exact"`` (:data:`~fedlora_lite.flower.config.DOWNLINKS`).
        fraction_train: fraction of connected nodes sampled per round.
        min_replies: fewest valid replies to aggregate (>= 3).
        min_available_nodes: nodes to wait for before a round (at most ``timeout``).
        seed: sampling seed.
        checkpoint_dir: where to checkpoint each completed round (None = no checkpoints).
        checkpoint_meta: what a checkpoint must match to be resumed (e.g. the config fingerprint).
        resume: continue from a matching checkpoint.
        evaluate_base: evaluate the untouched base on every node as round 0.
        save_updates: also write each round's uploads and estimates to ``checkpoint_dir``.
    """

    personalised: bool = False

    def __init__(self, *, reference: ReferenceAdapter, method: str, downlink: str = "rank", fraction_train: float = 1.0,
                 min_replies: int = 3, min_available_nodes: int = 3, seed: int = 0, checkpoint_dir: str | Path | None = None,
                 checkpoint_meta: dict[str, Any] | None = None, resume: bool = True, evaluate_base: bool = True,
                 save_updates: bool = False) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=1.0, min_train_nodes=min_replies,
                         min_evaluate_nodes=1, min_available_nodes=min_available_nodes, arrayrecord_key=ADAPTER_KEY,
                         configrecord_key=CONFIG_KEY)
        if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 3:
            raise ValueError(f"min_replies must be an int >= 3 (the aggregators need 3 updates), got {min_replies!r}")
        self.reference, self.method, self.downlink = reference, method, downlink
        self.min_replies, self.seed = min_replies, seed
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_meta = {"method": method, **(checkpoint_meta or {})}
        self.resume, self.evaluate_base, self.save_updates = resume, evaluate_base, save_updates
        self.directory: dict[int, int] = {}
        zero = {n: torch.zeros(*reference.shapes[n], dtype=torch.float64) for n in reference.names}
        self.global_model: dict[str, torch.Tensor] = zero
        self.models: dict[int, dict[str, torch.Tensor]] = {}
        self.history: list[dict[str, Any]] = []
        self.timeout = 600.0
        self._encoded: dict[int | None, tuple[ArrayRecord, float, dict[str, int]]] = {}
        self._round: dict[str, Any] = {}
        self._sent: dict[str, list[int]] = {}
        self._new_round(0)

    # ------------------------------------------------------------------ the rule
    def combine(self, updates: RoundUpdates) -> Combined:  # pragma: no cover - abstract
        """Aggregate one round's valid uploads (implemented by every concrete strategy)."""
        raise NotImplementedError

    def summary(self) -> None:
        log(INFO, "\t├──> %s (fedlora_lite): downlink=%s, min replies=%d", self.method, self.downlink, self.min_replies)
        super().summary()

    # ------------------------------------------------------------------ models
    def model_of(self, partition: int) -> dict[str, torch.Tensor]:
        """Node ``partition``'s current update ΔW (out, in) per module (a node not seen yet gets the global one)."""
        if self.personalised and partition in self.models:
            return self.models[partition]
        return self.global_model

    def _set_model(self, partition: int | None, deltas: dict[str, torch.Tensor]) -> None:
        record, scaling, sent = encode_deltas(deltas, self.reference, self.downlink)
        ranks = {n: int(record[f"base_model.model.{n}.lora_A.weight"].shape[0]) if len(record) else 0
                 for n in self.reference.names}
        self._encoded[partition] = (record, scaling, ranks)
        if partition is None:
            self.global_model = sent
        else:
            self.models[partition] = sent

    def held_factors(self, partition: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:
        """The model node ``partition`` holds, as the factors it was sent: module -> (A, B, scaling); None = base."""
        record, scaling, ranks = self._downlink(partition)
        if not len(record):
            return None
        return {n: (torch.from_numpy(record[f"base_model.model.{n}.lora_A.weight"].numpy().copy()),
                    torch.from_numpy(record[f"base_model.model.{n}.lora_B.weight"].numpy().copy()), scaling)
                for n in self.reference.names}

    def _downlink(self, partition: int) -> tuple[ArrayRecord, float, dict[str, int]]:
        key = partition if (self.personalised and partition in self.models) else None
        if key not in self._encoded:
            self._set_model(key, self.model_of(partition))
        return self._encoded[key]

    # ------------------------------------------------------------------ nodes
    def _query(self, grid: Grid, node_ids: list[int], server_round: int) -> None:
        queries = [Message(RecordDict({CONFIG_KEY: ConfigRecord({"server-round": server_round})}), dst_node_id=i,
                           message_type=MessageType.QUERY) for i in node_ids]
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            if reply.has_error():
                log(WARNING, "node %s did not say who it is: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            self._learn(reply.metadata.src_node_id, reply.content.config_records.get(CONFIG_KEY, ConfigRecord()))

    def _learn(self, node_id: int, record: Any) -> int | None:
        """The partition of ``node_id``: from the directory, else from the record's ``partition-id``."""
        if node_id in self.directory:
            return self.directory[node_id]
        p = None if record is None else record.get("partition-id")
        if isinstance(p, bool) or not isinstance(p, int) or p < 0 or p in self.directory.values():
            return None
        self.directory[node_id] = p
        return p

    def _nodes(self, grid: Grid, server_round: int) -> list[tuple[int, int | None]]:
        """(node id, partition or None) of the connected nodes, in partition order.

        A node's partition is learned from its first reply. Nodes are asked up front (one
        ``query`` message) only when it matters before they reply: when sampling a fraction
        of them, or when a personalised strategy already holds per-node models (a resumed run).
        """
        deadline = time.monotonic() + self.timeout
        while len(list(grid.get_node_ids())) < self.min_available_nodes and time.monotonic() < deadline:
            time.sleep(0.5)
        ids = sorted(grid.get_node_ids())
        if not ids:
            raise RuntimeError(f"no node connected within {self.timeout:.0f} s; is any SuperNode running?")
        unknown = [i for i in ids if i not in self.directory]
        if unknown and (self.fraction_train < 1.0 or (self.personalised and self.models)):
            self._query(grid, unknown, server_round)
        nodes = [(i, self.directory.get(i)) for i in ids]
        return sorted(nodes, key=lambda t: (t[1] is None, -1 if t[1] is None else t[1], t[0]))

    def _sample(self, nodes: list[tuple[int, int | None]], server_round: int) -> list[tuple[int, int | None]]:
        size = min(len(nodes), max(math.ceil(self.fraction_train * len(nodes)), self.min_replies))
        if size >= len(nodes):
            return nodes
        rng = random.Random(self.seed * 1_000_003 + server_round)  # same nodes for every method of a run
        return [nodes[j] for j in sorted(rng.sample(range(len(nodes)), size))]

    def _messages(self, nodes: list[tuple[int, int | None]], server_round: int, message_type: str, config: ConfigRecord,
                  phase: str) -> list[Message]:
        out, nbytes = [], 0
        for node_id, p in nodes:
            record, scaling, _ = self._downlink(p)
            cfg = ConfigRecord({**dict(config), "server-round": server_round, "delta-scaling": float(scaling),
                                "method": self.method})
            msg = Message(RecordDict({ADAPTER_KEY: record, CONFIG_KEY: cfg}), dst_node_id=node_id,
                          message_type=message_type, group_id=str(server_round))
            nbytes += content_bytes(msg)
            out.append(msg)
        self._sent[phase] = [i for i, _ in nodes]
        self._round["bytes"][f"{phase}_down"] = nbytes
        return out

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One message per sampled node carrying that node's model."""
        if self._round.get("round") != server_round:
            self._new_round(server_round)
        sampled = self._sample(self._nodes(grid, server_round), server_round)
        self._round["sampled"] = [p for _, p in sampled if p is not None]
        self._round["sampled_nodes"] = len(sampled)
        log(INFO, "configure_train: %s sampled %d nodes", self.method, len(sampled))
        return self._messages(sampled, server_round, MessageType.TRAIN, config, "train")

    def _screen(self, replies: Iterable[Message], phase: str) -> tuple[list[tuple[int, Message]], dict[str, str]]:
        valid, excluded, nbytes, seen = [], {}, 0, set()
        for msg in replies:
            nbytes += content_bytes(msg)
            node = msg.metadata.src_node_id
            seen.add(node)
            metrics = None if msg.has_error() else msg.content.metric_records.get(METRICS_KEY)
            p = self._learn(node, metrics)
            label = f"node {node}" if p is None else str(p)
            if msg.has_error():
                excluded[label] = f"error reply: {(msg.error.reason or '')[-300:]}"
                continue
            n = None if metrics is None else metrics.get("num-examples")
            if p is None or isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
                excluded[label] = (f"metrics record {METRICS_KEY!r} lacks a positive 'num-examples'" if p is not None
                                   else "the reply names no valid, unclaimed 'partition-id'")
                continue
            valid.append((p, msg))
        for node in self._sent.get(phase, []):
            if node not in seen:
                p = self.directory.get(node)
                excluded[f"node {node}" if p is None else str(p)] = "no reply within the round timeout"
        self._round["bytes"][f"{phase}_up"] = nbytes
        return sorted(valid, key=lambda t: t[0]), excluded

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the uploads, rebuild exact ΔW = scaling·B·A, combine, update every node's model."""
        valid, excluded = self._screen(replies, "train")
        parts, adapters, train = [], [], {}
        for p, msg in valid:
            try:
                adapters.append(parse_adapter(msg.content, self.reference, f"partition {p}"))
            except AdapterError as exc:
                excluded[str(p)] = str(exc)
                continue
            parts.append(p)
            m = msg.content.metric_records[METRICS_KEY]
            train[str(p)] = {k: float(m[k]) for k in ("num-examples", "train-loss", "accuracy-local") if k in m}
        rec = self._round
        rec.update(participants=parts, excluded=dict(sorted(excluded.items())), train=train, flagged=None, scores=None)
        if excluded:
            log(INFO, "aggregate_train: %s excluded %s", self.method, rec["excluded"])  # recorded in the history
        if len(parts) < self.min_replies:
            rec.update(aggregated=False, note=f"{len(parts)} valid replies < min_replies={self.min_replies}: models kept")
            return None, None
        examples = torch.tensor([train[str(p)]["num-examples"] for p in parts], dtype=torch.float64)
        updates = RoundUpdates(parts, adapters, stack_deltas(adapters, dtype=torch.float64), examples,
                               [self.held_factors(p) for p in parts])
        t0 = time.perf_counter()
        out = self.combine(updates)
        rec["seconds"]["aggregate"] = time.perf_counter() - t0
        if out.flags is not None:
            rec["flagged"] = [p for p, f in zip(parts, out.flags.tolist()) if f]
        if out.scores is not None:
            rec["scores"] = {str(p): round(float(s), 6) for p, s in zip(parts, out.scores.tolist())}
        rec["info"] = out.info
        if self.save_updates and self.checkpoint_dir is not None:
            save_round_updates(self.checkpoint_dir, server_round, updates.partitions, updates.adapters,
                               {"estimate": out.estimates, "model": out.models, "center": out.center})
        self._apply(updates, out)
        rec["aggregated"] = True
        rec["downlink_rank"] = {str(p): self._downlink(p)[2] for p in sorted({*parts, *self.models})}
        w = examples / examples.sum()
        metrics = {k: float(sum(wi * train[str(p)][k] for wi, p in zip(w.tolist(), parts)))
                   for k in ("train-loss", "accuracy-local") if all(k in train[str(p)] for p in parts)}
        return self._encoded.get(None, (ArrayRecord(),))[0], MetricRecord(metrics)

    def _apply(self, updates: RoundUpdates, out: Combined) -> None:
        if out.center is not None:
            self._set_model(None, {n: self.global_model[n] + out.center[n] for n in self.reference.names})
            return
        assert out.estimates is not None or out.models is not None, "a rule returns a center, estimates or models"
        for j, p in enumerate(updates.partitions):
            if out.models is not None:
                self._set_model(p, {n: out.models[n][j].to(torch.float64) for n in self.reference.names})
                continue
            prev = self.model_of(p)
            self._set_model(p, {n: prev[n] + out.estimates[n][j].to(torch.float64) for n in self.reference.names})
        if out.flags is not None and bool((~out.flags).any()):
            keep = [j for j, f in enumerate(out.flags.tolist()) if not f]
            self._set_model(None, {n: torch.stack([self.models[updates.partitions[j]][n] for j in keep]).mean(0)
                                   for n in self.reference.names})

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Every connected node evaluates its own current model on its held-out pairs."""
        return self._messages(self._nodes(grid, server_round), server_round, MessageType.EVALUATE, config, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-node held-out accuracy; the benign mean is what the run reports."""
        valid, excluded = self._screen(replies, "evaluate")
        acc, benign = {}, {}
        for p, msg in valid:
            m = msg.content.metric_records[METRICS_KEY]
            if "accuracy" in m:
                acc[str(p)], benign[str(p)] = float(m["accuracy"]), int(m.get("benign", 1))
        self._round.update(accuracy=acc, benign=benign, evaluate_excluded=dict(sorted(excluded.items())))
        ben = [a for p, a in acc.items() if benign[p]]
        con = [a for p, a in acc.items() if not benign[p]]
        self._round["accuracy_benign"] = sum(ben) / len(ben) if ben else None
        self._round["accuracy_contaminated"] = sum(con) / len(con) if con else None
        out = {k: v for k, v in (("accuracy-benign", self._round["accuracy_benign"]),
                                 ("accuracy-contaminated", self._round["accuracy_contaminated"])) if v is not None}
        return MetricRecord(out) if out else None

    # ------------------------------------------------------------------ the loop
    def _new_round(self, server_round: int) -> None:
        self._round = {"round": server_round, "bytes": {"train_down": 0, "train_up": 0, "evaluate_down": 0,
                                                        "evaluate_up": 0}, "seconds": {}}
        self._sent = {}

    def _checkpoint(self) -> Checkpoint:
        down, scal = {}, {}
        for key, (record, scaling, _) in self._encoded.items():
            owner = "global" if key is None else str(key)
            down[owner] = {k: torch.from_numpy(record[k].numpy().copy()) for k in record.keys()}
            scal[owner] = scaling
        return Checkpoint(self.history[-1]["round"], self.models, self.global_model, self.history, down, scal)

    def _restore(self) -> int:
        if self.checkpoint_dir is None or not self.resume:
            return 0
        ckpt = load_checkpoint(self.checkpoint_dir, self.checkpoint_meta)
        if ckpt is None:
            return 0
        self.models, self.history, self._encoded = ckpt.models, ckpt.history, {}
        self.global_model = {n: ckpt.global_model[n] for n in self.reference.names}
        for owner, arrays in ckpt.downlink.items():  # resend exactly the factors an uninterrupted run would send
            record = ArrayRecord({k: Array(t.numpy()) for k, t in arrays.items()})
            ranks = {n: int(arrays[f"base_model.model.{n}.lora_A.weight"].shape[0]) if arrays else 0
                     for n in self.reference.names}
            self._encoded[None if owner == "global" else int(owner)] = (record, ckpt.scalings[owner], ranks)
        log(INFO, "%s: resuming after round %d (checkpoint %s)", self.method, ckpt.round, self.checkpoint_dir)
        return ckpt.round

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Any = None) -> Result:
        """Run rounds ``first .. num_rounds`` (first = 1, or the round after a resumed checkpoint).

        Same arguments as :meth:`flwr.serverapp.strategy.Strategy.start`; ``initial_arrays``
        is ignored (every node starts from the base, ΔW = 0) and ``timeout`` bounds every
        phase, including the wait for nodes. Returns Flower's :class:`Result` (global
        arrays, aggregated metrics per round); the full per-node record is ``self.history``.
        """
        self.timeout = float(timeout)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        done = self._restore()
        if done == 0 and self.evaluate_base:
            self._new_round(0)
            replies = grid.send_and_receive(self.configure_evaluate(0, ArrayRecord(), evaluate_config, grid), timeout=timeout)
            self.aggregate_evaluate(0, replies)
            self.history.append(self._round)
        for server_round in range(done + 1, num_rounds + 1):
            log(INFO, "[%s ROUND %s/%s]", self.method, server_round, num_rounds)
            self._new_round(server_round)
            t0 = time.perf_counter()
            replies = grid.send_and_receive(self.configure_train(server_round, ArrayRecord(), train_config, grid),
                                            timeout=timeout)
            arrays, metrics = self.aggregate_train(server_round, replies)
            self._round["seconds"]["train"] = time.perf_counter() - t0
            if arrays is not None:
                result.arrays = arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            t0 = time.perf_counter()
            replies = grid.send_and_receive(self.configure_evaluate(server_round, ArrayRecord(), evaluate_config, grid),
                                            timeout=timeout)
            ev = self.aggregate_evaluate(server_round, replies)
            self._round["seconds"]["evaluate"] = time.perf_counter() - t0
            if ev is not None:
                result.evaluate_metrics_clientapp[server_round] = ev
            self.history.append(self._round)
            if self.checkpoint_dir is not None:
                save_checkpoint(self.checkpoint_dir, self._checkpoint(), self.checkpoint_meta)
        return result
