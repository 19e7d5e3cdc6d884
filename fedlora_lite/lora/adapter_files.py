"""Reading an adapter folder sent by a client without trusting it: files, sizes, config, header.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (peft's
layout). Everything in it is client data, so before any tensor is allocated:

* each file must be a *regular* file of at most a given size: FIFOs, devices, sockets and
  directories are refused (a FIFO would block the server forever, ``/dev/zero`` would
  exhaust its memory); a symbolic link is followed only when its target stays inside the
  folder. Files are opened once, non-blocking and without following links, and checked
  on the open descriptor, so the file that is checked is the file that is read;
* the config must be UTF-8 JSON whose top level is an object, with strictly typed fields
  (:func:`parse_lora_config`);
* the safetensors header is decoded and checked (dtypes, 2-D shapes, offsets inside the
  file, sizes that match the shapes) by :func:`safetensors_header` before
  ``safetensors.torch.load`` decodes the data, so memory stays bounded by the file size.

Every problem raises :class:`AdapterError` (a ``ValueError``) naming the adapter.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AdapterError",
    "LoraFileConfig",
    "MAX_CONFIG_BYTES",
    "DEFAULT_MAX_WEIGHTS_BYTES",
    "MAX_LORA_ALPHA",
    "read_member",
    "parse_lora_config",
    "safetensors_header",
]

MAX_CONFIG_BYTES = 1 << 20
"""Largest ``adapter_config.json`` accepted (peft writes about 1 KB)."""

DEFAULT_MAX_WEIGHTS_BYTES = 4 << 30
"""Default cap on ``adapter_model.safetensors`` (4 GiB: a rank-64 adapter of a 70B model is ~1.6 GB)."""

MAX_LORA_ALPHA = 1e6
"""Largest ``lora_alpha`` accepted; real adapters use 1-1024, larger values only make ΔW overflow."""

# safetensors dtype names that are floating point, with their sizes in bytes
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


class AdapterError(ValueError):
    """A LoRA adapter does not match the expected modules/ranks/shapes, is not finite, or its files are unsafe."""


@dataclass(frozen=True)
class LoraFileConfig:
    """The fields of ``adapter_config.json`` this package uses, after validation."""

    r: int
    lora_alpha: float
    fan_in_fan_out: bool


def read_member(folder: Path, filename: str, max_bytes: int, label: str) -> bytes:
    """The bytes of ``folder/filename``, a regular file inside ``folder`` of at most ``max_bytes``.

    Raises:
        FileNotFoundError: the file does not exist.
        AdapterError: it is a link leaving the folder, not a regular file, too large, or unreadable.
    """
    path = folder / filename
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}: {path} not found") from None
    except OSError as exc:
        raise AdapterError(f"{label}: cannot inspect {filename}: {exc}") from exc
    if stat.S_ISLNK(info.st_mode):
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(Path(os.path.realpath(folder))):
            raise AdapterError(f"{label}: {filename} is a link to {target}, outside the adapter folder; refused")
        path = target
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise AdapterError(f"{label}: cannot open {filename}: {exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AdapterError(f"{label}: {filename} is not a regular file (a FIFO, device, socket or folder); refused")
        if info.st_size > max_bytes:
            raise AdapterError(f"{label}: {filename} has {info.st_size} bytes, more than the limit of {max_bytes}")
        chunks, total = [], 0
        while total <= max_bytes:  # read to EOF, but never more than the cap (the file may grow)
            chunk = os.read(fd, min(1 << 24, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise AdapterError(f"{label}: cannot read {filename}: {exc}") from exc
    finally:
        os.close(fd)
    if total > max_bytes:
        raise AdapterError(f"{label}: {filename} is larger than the limit of {max_bytes} bytes")
    return b"".join(chunks)


def _strict_bool(cfg: dict[str, Any], key: str, label: str, filename: str) -> bool:
    value = cfg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterError(f"{label}: {key} in {filename} must be true or false, got {value!r}")
    return value


def parse_lora_config(data: bytes, label: str, filename: str = "adapter_config.json") -> LoraFileConfig:
    """Validate a peft LoRA config given as bytes.

    Rules: UTF-8 JSON object; ``peft_type == "LORA"``; ``r`` an int >= 1; ``lora_alpha`` a
    finite number in (0, :data:`MAX_LORA_ALPHA`]; ``fan_in_fan_out``, ``use_dora`` and
    ``use_rslora`` real booleans (``"false"`` is not false); DoRA, rsLoRA and per-module
    ``rank_pattern`` / ``alpha_pattern`` are not supported.
    """
    try:
        cfg = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterError(f"{label}: {filename} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, deep nesting
        raise AdapterError(f"{label}: cannot read {filename}: not valid JSON ({str(exc)[:200]})") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"{label}: {filename} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{label}: peft_type is {str(cfg.get('peft_type'))[:80]!r}, expected 'LORA'")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{label}: invalid r={str(r)[:80]} in {filename}: expected an int >= 1")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
            or not 0 < alpha <= MAX_LORA_ALPHA):
        raise AdapterError(f"{label}: invalid lora_alpha={str(alpha)[:80]} in {filename}: expected a finite number "
                           f"in (0, {MAX_LORA_ALPHA:g}]")
    fan_in_fan_out = _strict_bool(cfg, "fan_in_fan_out", label, filename)
    dora, rslora = _strict_bool(cfg, "use_dora", label, filename), _strict_bool(cfg, "use_rslora", label, filename)
    patterns = [cfg.get("rank_pattern"), cfg.get("alpha_pattern")]
    if any(p is not None and not isinstance(p, dict) for p in patterns):
        raise AdapterError(f"{label}: rank_pattern / alpha_pattern in {filename} must be objects")
    if dora or rslora or any(patterns):
        raise AdapterError(f"{label}: DoRA, rsLoRA and per-module rank/alpha patterns are not supported")
    return LoraFileConfig(r=r, lora_alpha=float(alpha), fan_in_fan_out=fan_in_fan_out)


def safetensors_header(data: bytes, label: str, filename: str = "adapter_model.safetensors") -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, checked against the file itself.

    Returns:
        tensor name -> ``{"dtype": str, "shape": [rows, cols], "data_offsets": [begin, end]}``
        (``__metadata__`` dropped); only 2-D floating-point tensors are accepted.

    Raises:
        AdapterError: truncated file, header that is not a JSON object, a non-float dtype,
            a shape that is not two non-negative ints, offsets outside the data, or a byte
            size that does not match the shape.
    """
    bad = f"{label}: {filename} is not a readable safetensors file"
    if len(data) < 8:
        raise AdapterError(f"{bad} (only {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise AdapterError(f"{bad} (header length {n} does not fit a file of {len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterError(f"{bad} (header is not UTF-8 JSON: {str(exc)[:200]})") from exc
    if not isinstance(header, dict):
        raise AdapterError(f"{bad} (header is not a JSON object)")
    header.pop("__metadata__", None)
    size = len(data) - 8 - n
    for key, entry in header.items():
        where = f"{label}: tensor {key[:200]!r} in {filename}"
        if not isinstance(entry, dict):
            raise AdapterError(f"{bad} (entry {key[:200]!r} is not an object)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"{where} has dtype {str(dtype)[:20]!r}, expected one of {sorted(_FLOAT_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise AdapterError(f"{where} has shape {str(shape)[:80]}, expected two non-negative ints")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= size):
            raise AdapterError(f"{bad} (tensor {key[:200]!r} has data offsets {str(offsets)[:80]} outside the data)")
        if offsets[1] - offsets[0] != shape[0] * shape[1] * _FLOAT_DTYPES[dtype]:
            raise AdapterError(f"{bad} (tensor {key[:200]!r}: {offsets[1] - offsets[0]} bytes for shape {shape})")
    return header
