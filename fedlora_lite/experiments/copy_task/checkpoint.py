"""The pretrained base on disk: safetensors weights, config, tokenizer and checksums.

A base (see :mod:`~fedlora_lite.experiments.copy_task.pretrain`) is stored as three small
files plus checksums::

    <dir>/model.safetensors   fp32 weights (safetensors, never pickle)
    <dir>/config.json         {"model": ModelConfig fields, "pretraining": {...}}
    <dir>/tokenizer.json      CharTokenizer table
    <dir>/SHA256SUMS          sha256 of the three files above (``sha256sum -c`` format)

:func:`load_base` verifies the checksums before building anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2LMHeadModel

from ...core.runtime import resolve_device
from .model import ModelConfig, build_model
from .tokenizer import CharTokenizer

__all__ = ["BaseCheckpoint", "DEFAULT_BASE_DIR", "save_base", "load_base", "verify_checksums", "sha256_file"]

#: Where the shipped pretrained base lives (``data/base_copy`` at the repository root).
DEFAULT_BASE_DIR = Path(__file__).resolve().parents[3] / "data" / "base_copy"

_WEIGHTS, _CONFIG, _TOKENIZER, _SUMS = "model.safetensors", "config.json", "tokenizer.json", "SHA256SUMS"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(sums_file: str | Path) -> dict[str, str]:
    """Check every ``<sha256>  <relative path>`` line of a ``sha256sum`` file.

    Returns:
        Mapping relative path -> sha256 (all verified).

    Raises:
        FileNotFoundError: the sums file or a listed file is missing.
        ValueError: a line is malformed or a checksum does not match (names the file).
    """
    sums_file = Path(sums_file)
    if not sums_file.is_file():
        raise FileNotFoundError(f"checksum file {sums_file} not found")
    out: dict[str, str] = {}
    for n, line in enumerate(sums_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{sums_file}:{n}: expected '<sha256>  <path>', got {line!r}")
        digest, rel = parts[0].lower(), parts[1].strip().lstrip("*")
        target = sums_file.parent / rel
        if not target.is_file():
            raise FileNotFoundError(f"{sums_file}:{n}: listed file {target} is missing")
        actual = sha256_file(target)
        if actual != digest:
            raise ValueError(f"checksum mismatch for {target}: expected {digest}, got {actual}")
        out[rel] = digest
    return out


def save_base(
    model: GPT2LMHeadModel,
    tokenizer: CharTokenizer,
    cfg: ModelConfig,
    path: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save a base model as safetensors + JSON config + tokenizer + SHA256SUMS.

    Args:
        model: a (non-peft) model built by :func:`build_model`.
        tokenizer: its tokenizer.
        cfg: its config.
        path: output directory (created).
        metadata: JSON-serialisable facts stored under ``"pretraining"`` in config.json.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    if not isinstance(model, GPT2LMHeadModel):
        raise TypeError(f"model must be a GPT2LMHeadModel (merge or unload adapters first), got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # the LM head is tied to the token embedding: store it once
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    # a single metadata key: safetensors writes metadata in hash-map order, and more keys
    # would make the bytes (and the checksum) differ from run to run
    save_file(state, str(path / _WEIGHTS), metadata={"format": "pt"})
    cfg_json = {"model": asdict(cfg), "tied_weights": {"lm_head.weight": "transformer.wte.weight"}, "pretraining": metadata or {}}
    (path / _CONFIG).write_text(json.dumps(cfg_json, indent=1, sort_keys=True) + "\n")
    tokenizer.save(path / _TOKENIZER)
    lines = [f"{sha256_file(path / f)}  {f}" for f in (_WEIGHTS, _CONFIG, _TOKENIZER)]
    (path / _SUMS).write_text("\n".join(lines) + "\n")
    return path


@dataclass
class BaseCheckpoint:
    """What :func:`load_base` returns (also unpackable as ``model, tokenizer, cfg``)."""

    model: GPT2LMHeadModel
    tokenizer: CharTokenizer
    config: ModelConfig
    metadata: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.config))


def load_base(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    verify: bool = True,
) -> BaseCheckpoint:
    """Load a base written by :func:`save_base` (default: the shipped ``data/base_copy``).

    Args:
        path: checkpoint directory; ``None`` means :data:`DEFAULT_BASE_DIR`.
        device: where to put the model (``"auto"`` allowed).
        verify: check ``SHA256SUMS`` before loading (recommended; the checkpoint may have
            been downloaded or edited).

    Returns:
        :class:`BaseCheckpoint` ``(model, tokenizer, config)`` with the model in eval mode.

    Raises:
        FileNotFoundError: the directory or a file is missing.
        ValueError: checksum mismatch or inconsistent files.
    """
    from safetensors.torch import load_file

    path = Path(DEFAULT_BASE_DIR if path is None else path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"base checkpoint directory {path} not found; create it with `python -m fedlora_lite.experiments.copy_task.pretrain --out {path}`"
        )
    if verify:
        verify_checksums(path / _SUMS)
    cfg_json = json.loads((path / _CONFIG).read_text())
    cfg = ModelConfig.from_dict(cfg_json["model"])
    tokenizer = CharTokenizer.load(path / _TOKENIZER)
    model = build_model(cfg, tokenizer, seed=0, device="cpu")
    state = load_file(str(path / _WEIGHTS))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # non-persistent buffers (e.g. attention masks) may legitimately be absent
    missing = [k for k in missing if k in dict(model.named_parameters())]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match ModelConfig: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    return BaseCheckpoint(model.to(resolve_device(device)).eval(), tokenizer, cfg, cfg_json.get("pretraining", {}))
