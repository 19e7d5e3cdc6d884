"""Local preliminary fine-tuning: one LoRA adapter per client, cached on disk, screened on receipt.

Every client starts from the same adapter initialisation (as a server would broadcast it)
and fine-tunes on its own few examples. Adapters are cached as peft/safetensors folders
under ``<output_dir>/local_adapters/<key>/`` where ``<key>`` hashes everything that
determines them (base weights, task, pool, seed, LoRA and optimiser settings), so a re-run
loads instead of retraining; a corrupt cache entry is retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...core.runtime import make_generator
from ...core.validation import check_choice
from ...lora.adapter_io import (
    AdapterError,
    check_adapter,
    load_lora_factors,
    read_adapter,
    save_adapter,
)
from ...lora.factors import LoraAdapter, LoraFactors
from ...lora.peft_bridge import attach_lora, extract_adapter
from .config import LocalTrainingConfig
from .checkpoint import sha256_file
from .tokenizer import CharTokenizer
from .tasks import CopyClient
from .training import train_on_pairs

__all__ = ["LocalAdapters", "train_local_adapters"]


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


def _discard(path: Path) -> None:
    """Remove a corrupt cache entry (a folder, or whatever sits at its name)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


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
        if path is not None and os.path.lexists(path):
            try:
                adapter = read_adapter(path, name=f"client {k}")
                check_adapter(adapter, names, cfg.rank, reference_shapes=shapes, name=f"client {k}")
                out.adapters[k] = adapter
                out.loaded += 1
                continue
            except (AdapterError, OSError, ValueError) as exc:  # a corrupt cache entry is retrained
                warnings.warn(f"ignoring cached adapter of client {k}: {exc}", RuntimeWarning, stacklevel=2)
                _discard(path)  # never write into a broken entry (it may hold a FIFO or a dangling link)
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


