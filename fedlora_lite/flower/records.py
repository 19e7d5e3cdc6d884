"""What travels in Flower messages: LoRA adapters as ``ArrayRecord``, screening, byte counts.

Uplink (node -> server): the node's freshly trained adapter as an ``ArrayRecord`` of its
peft state dict (keys ``base_model.model.<module>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r), float32) plus a ``MetricRecord`` (examples, loss, held-out
accuracy). The server never trusts it: :func:`parse_adapter` accepts exactly the expected
keys and then runs :func:`fedlora_lite.lora.check_adapter` (ranks, shapes, finite values).

Downlink (server -> node): the node's current model update ΔW (out, in) per module, sent as
LoRA factors with one scaling s (``s·B·A = ΔW``) under the same key layout
(:func:`encode_deltas`): truncated to the LoRA rank r by SVD (``downlink="rank"``, a
standard peft adapter with ``s = alpha / r``, the uplink's size) or exactly, at the
update's numerical rank (``downlink="exact"``, ``s = 1``). An empty record means ΔW = 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from ..lora.adapter_io import AdapterError, check_adapter
from ..lora.factors import LoraAdapter, LoraFactors
from ..lora.refactor import factorize_delta

__all__ = ["ADAPTER_KEY", "CONFIG_KEY", "METRICS_KEY", "ReferenceAdapter", "adapter_record", "parse_adapter",
           "encode_deltas", "decode_deltas", "content_bytes"]

ADAPTER_KEY, CONFIG_KEY, METRICS_KEY = "adapter", "config", "metrics"
_PREFIX = "base_model.model."


def _keys(name: str) -> tuple[str, str]:
    return f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"


@dataclass(frozen=True)
class ReferenceAdapter:
    """What every uploaded adapter must look like (from the base and the LoRA settings).

    Attributes:
        names: adapted module names (sorted).
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling alpha / r).
        shapes: module -> (out_features, in_features).
        fan_in_fan_out: module -> True for a Conv1D-style base weight.
    """

    names: tuple[str, ...]
    rank: int
    alpha: float
    shapes: Mapping[str, tuple[int, int]]
    fan_in_fan_out: Mapping[str, bool]

    @classmethod
    def from_adapter(cls, adapter: LoraAdapter) -> ReferenceAdapter:
        return cls(adapter.module_names, adapter.r, adapter.alpha,
                   {n: (f.out_features, f.in_features) for n, f in adapter.factors.items()},
                   {n: f.fan_in_fan_out for n, f in adapter.factors.items()})

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def uplink_floats(self) -> int:
        """Floats in one rank-r adapter: r (in + out) per module."""
        return sum(self.rank * (o + i) for o, i in self.shapes.values())


def adapter_record(adapter: LoraAdapter) -> ArrayRecord:
    """The adapter's peft state dict as an ``ArrayRecord`` (float32 CPU arrays)."""
    return ArrayRecord({k: Array(v.detach().cpu().to(torch.float32).numpy()) for k, v in adapter.state_dict().items()})


def _record_tensors(record: ArrayRecord, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for key in record.keys():
        try:
            arr = record[key].numpy()
        except Exception as exc:  # a corrupt or foreign serialisation
            raise AdapterError(f"{name}: array {key!r} cannot be decoded ({exc})") from exc
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
            raise AdapterError(f"{name}: array {key!r} has dtype {getattr(arr, 'dtype', type(arr))}, expected floating point")
        out[key] = torch.from_numpy(np.array(arr, copy=True))
    return out


def parse_adapter(content: RecordDict, reference: ReferenceAdapter, name: str) -> LoraAdapter:
    """The adapter in a node's reply, checked against ``reference``.

    Raises:
        AdapterError: no or several ``ArrayRecord``s, other keys than the reference's
            ``lora_A``/``lora_B`` weights, another rank or shape, non-float or non-finite values.
    """
    records = content.array_records
    if set(records.keys()) != {ADAPTER_KEY}:
        raise AdapterError(f"{name}: expected one ArrayRecord {ADAPTER_KEY!r}, got {sorted(records.keys())}")
    state = _record_tensors(records[ADAPTER_KEY], name)
    expected = {k for n in reference.names for k in _keys(n)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise AdapterError(f"{name}: adapter keys do not match: missing {missing[:4]}, unexpected {extra[:4]}")
    check_adapter(state, reference.names, reference.rank, reference_shapes=dict(reference.shapes), name=name)
    factors = {}
    for n in reference.names:
        ka, kb = _keys(n)
        factors[n] = LoraFactors(A=state[ka], B=state[kb], scaling=reference.scaling,
                                 fan_in_fan_out=reference.fan_in_fan_out[n])
    return LoraAdapter(factors, reference.rank, reference.alpha)


def _numerical_rank(delta: torch.Tensor) -> int:
    s = torch.linalg.svdvals(delta.to(torch.float64))
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(delta.shape) * torch.finfo(torch.float64).eps
    return int((s > tol).sum())


def encode_deltas(deltas: Mapping[str, torch.Tensor], reference: ReferenceAdapter, mode: str
                  ) -> tuple[ArrayRecord, float, dict[str, torch.Tensor]]:
    """A node's model update as a downlink record.

    Args:
        deltas: module -> ΔW (out, in).
        reference: the run's LoRA layout (rank, alpha, orientation).
        mode: ``"rank"`` (truncated SVD to rank r, scaling alpha / r) or ``"exact"``
            (the numerical rank of each ΔW, scaling 1).

    Returns:
        ``(record, scaling, sent)``: the record (empty when every ΔW is 0), the scaling s,
        and module -> the float64 ΔW the node reconstructs from the float32 factors (what
        the server must take as the node's model from now on).
    """
    if all(not bool(torch.any(d != 0)) for d in deltas.values()):
        return ArrayRecord(), 1.0, {n: torch.zeros_like(d, dtype=torch.float64) for n, d in deltas.items()}
    record = ArrayRecord()
    scaling = reference.scaling if mode == "rank" else 1.0
    sent = {}
    for n in sorted(deltas):
        d = deltas[n].to(torch.float64)
        rank = min(reference.rank, *d.shape) if mode == "rank" else max(_numerical_rank(d), 1)
        f, _ = factorize_delta(d, rank, scaling=scaling, orientation="out_in")
        A, B = f.A.to(torch.float32), f.B.to(torch.float32)
        ka, kb = _keys(n)
        record[ka], record[kb] = Array(A.numpy()), Array(B.numpy())
        sent[n] = (B.to(torch.float64) @ A.to(torch.float64)) * scaling
    return record, scaling, sent


def decode_deltas(record: ArrayRecord, scaling: float, reference: ReferenceAdapter, name: str = "server"
                  ) -> dict[str, torch.Tensor]:
    """Module -> float64 ΔW (out, in) of a downlink record (missing modules are 0).

    Raises:
        AdapterError: unknown keys, unpaired factors, wrong shapes or non-finite values.
    """
    state = _record_tensors(record, name)
    known = {k: n for n in reference.names for k in _keys(n)}
    unknown = sorted(set(state) - set(known))
    if unknown:
        raise AdapterError(f"{name}: unexpected keys in the downlink adapter {unknown[:4]}")
    out = {}
    for n in reference.names:
        o, i = reference.shapes[n]
        ka, kb = _keys(n)
        if ka not in state and kb not in state:
            out[n] = torch.zeros(o, i, dtype=torch.float64)
            continue
        if ka not in state or kb not in state:
            raise AdapterError(f"{name}: module {n!r} lacks one of its factors")
        A, B = state[ka].to(torch.float64), state[kb].to(torch.float64)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or (B.shape[0], A.shape[1]) != (o, i):
            raise AdapterError(f"{name}: module {n!r} factors A{tuple(A.shape)}, B{tuple(B.shape)} do not map {i} -> {o}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(f"{name}: module {n!r} contains NaN or Inf")
        out[n] = (B @ A) * float(scaling)
    return out


def content_bytes(message: Message) -> int:
    """Bytes of a message's records, as Flower counts them (``count_bytes`` of every record)."""
    if message.has_error():
        return 0
    c = message.content
    return sum(r.count_bytes() for group in (c.array_records, c.metric_records, c.config_records)
               for r in group.values())
