"""Per-method checkpoints of a Flower run, so an interrupted run resumes from its last completed round.

After every completed round a strategy writes, under
``<output_dir>/checkpoints/<fingerprint>/<method>/``:

* ``models.safetensors`` — every node's current model update ΔW (and the global one), float64,
  and the exact float32 factors last sent for each (so a resumed run sends the same bytes);
* ``state.json`` — the round number, the per-round history and the sha256 of the tensors
  file, written last and atomically (``os.replace``), so a crash mid-write leaves the
  previous checkpoint valid.

``<fingerprint>`` hashes everything that decides the trajectory
(:meth:`~fedlora_lite.flower.config.FlowerRunConfig.fingerprint`): a changed setting never
resumes a stale run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "save_round_updates", "sha256_bytes"]

_TENSORS, _STATE = "models.safetensors", "state.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Checkpoint:
    """What a strategy needs to continue.

    Attributes:
        round: last completed round.
        models: partition -> module -> ΔW (out, in) float64 (personalised strategies).
        global_model: module -> ΔW (the global / collaborative model).
        history: the per-round records so far.
        downlink: ``"global"`` or a partition (as str) -> the factors last encoded for it.
        scalings: same keys -> the scaling of those factors.
    """

    round: int
    models: dict[int, dict[str, torch.Tensor]]
    global_model: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    downlink: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scalings: dict[str, float] = field(default_factory=dict)


def save_checkpoint(directory: str | Path, ckpt: Checkpoint, meta: Mapping[str, Any]) -> Path:
    """Write ``ckpt`` atomically (tensors first, then the state that points at them)."""
    from safetensors.torch import save

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"global/{n}": t.contiguous() for n, t in ckpt.global_model.items()}
    for p, mods in ckpt.models.items():
        tensors.update({f"model/{p}/{n}": t.contiguous() for n, t in mods.items()})
    for key, arrays in ckpt.downlink.items():
        tensors.update({f"downlink/{key}/{k}": t.contiguous() for k, t in arrays.items()})
    data = save(tensors, metadata={"format": "pt"})
    tmp = path / (_TENSORS + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path / _TENSORS)
    state = {**meta, "round": ckpt.round, "history": ckpt.history, "scalings": ckpt.scalings,
             "tensors_sha256": sha256_bytes(data)}
    tmp = path / (_STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path / _STATE)
    return path


def load_checkpoint(directory: str | Path, meta: Mapping[str, Any]) -> Checkpoint | None:
    """The checkpoint in ``directory`` if it is complete and was written with the same ``meta``; else None.

    Raises:
        ValueError: a checkpoint whose tensors do not match its state file (a corrupt
            write that ``os.replace`` should have made impossible: the message says which file).
    """
    from safetensors.torch import load

    path = Path(directory)
    if not (path / _STATE).is_file() or not (path / _TENSORS).is_file():
        return None
    state = json.loads((path / _STATE).read_text())
    if any(state.get(k) != v for k, v in meta.items()):
        return None
    data = (path / _TENSORS).read_bytes()
    if sha256_bytes(data) != state.get("tensors_sha256"):
        raise ValueError(f"checkpoint {path / _TENSORS} does not match {path / _STATE} (sha256 differs); delete the folder")
    tensors = load(data)
    models: dict[int, dict[str, torch.Tensor]] = {}
    global_model: dict[str, torch.Tensor] = {}
    downlink: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        kind, rest = key.split("/", 1)
        if kind == "global":
            global_model[rest] = t
        elif kind == "model":
            p, name = rest.split("/", 1)
            models.setdefault(int(p), {})[name] = t
        else:
            owner, name = rest.split("/", 1)
            downlink.setdefault(owner, {})[name] = t
    return Checkpoint(int(state["round"]), models, global_model, list(state["history"]), downlink,
                      {k: float(v) for k, v in state.get("scalings", {}).items()})


def save_round_updates(directory: str | Path, server_round: int, partitions: list[int], adapters: list[Any],
                       parts: Mapping[str, Mapping[str, torch.Tensor] | None]) -> Path:
    """Write one round's uploads and what the rule made of them (``round_NNN_updates.safetensors``).

    Keys: ``upload/<partition>/<peft key>`` (the adapters as received) and ``<kind>/<module>``
    for each non-None entry of ``parts`` (e.g. ``estimate``, ``model``, ``center``); the
    partitions, in the order of the stacked tensors, are in the file's metadata.
    """
    from safetensors.torch import save_file

    t = {f"upload/{p}/{k}": v.contiguous() for p, a in zip(partitions, adapters) for k, v in a.state_dict().items()}
    for kind, tensors in parts.items():
        if tensors is not None:
            t.update({f"{kind}/{n}": e.contiguous() for n, e in tensors.items()})
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    out = path / f"round_{server_round:03d}_updates.safetensors"
    save_file(t, str(out), metadata={"partitions": ",".join(map(str, partitions))})
    return out
