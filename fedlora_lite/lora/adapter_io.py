"""Saving, loading and validating LoRA adapters — the trust boundary with clients.

An adapter on disk uses peft's layout: ``adapter_config.json`` (a peft ``LoraConfig``)
and ``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight``
(r, in) and ``...lora_B.weight`` (out, r). Adapters may come from untrusted clients, so

* only ``.safetensors`` is read — pickle-based ``adapter_model.bin`` is refused; the files
  themselves are read defensively (regular files inside the folder, size caps, strict
  config types, the safetensors header checked before decoding:
  :mod:`fedlora_lite.lora.adapter_files`), and ranks and shapes are checked against the
  tensors and the base model before anything is allocated;
* :func:`check_adapter` compares module names, ranks and shapes with a reference and
  rejects NaN/Inf, raising :class:`AdapterError` (a ``ValueError``) that names the
  adapter (e.g. ``"client 3"``) and the module. Whether a bad client is excluded or the
  run aborts is decided by the caller (:func:`screen_adapters`).

Directories written by :func:`save_adapter` also load with
``peft.PeftModel.from_pretrained(base, path)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ..core.validation import check_choice
from .adapter_files import (
    DEFAULT_MAX_WEIGHTS_BYTES,
    MAX_CONFIG_BYTES,
    AdapterError,
    parse_lora_config,
    read_member,
    safetensors_header,
)
from .factors import LoraAdapter, LoraFactors
from .peft_bridge import _lora_layers, attach_lora, extract_adapter, lora_factors

__all__ = ["AdapterError", "check_adapter", "screen_adapters", "load_lora_factors", "save_adapter", "read_adapter",
           "load_adapter"]

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight$")
_CONFIG_FILE, _WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class _Shape:
    """A stand-in tensor with a shape only: lets the key checks run on a safetensors header."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape, self.ndim = shape, len(shape)


def _as_factor_pairs(state: Any, name: str) -> dict[str, dict[str, torch.Tensor]]:
    if isinstance(state, LoraAdapter):
        return {n: {"A": f.A, "B": f.B} for n, f in state.factors.items()}
    if isinstance(state, PeftModel):
        return {n: {"A": f.A, "B": f.B} for n, f in lora_factors(state).items()}
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a LoraAdapter, PeftModel or state dict, got {type(state).__name__}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in state.items():
        if isinstance(val, LoraFactors):
            pairs[key] = {"A": val.A, "B": val.B}
            continue
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterError(f"{name}: unexpected key {key!r} (only lora_A/lora_B weights are accepted)")
        if not isinstance(val, (torch.Tensor, _Shape)):
            raise AdapterError(f"{name}: value of {key!r} is a {type(val).__name__}, not a tensor")
        slot = pairs.setdefault(m["mod"], {})
        if m["ab"] in slot:
            raise AdapterError(f"{name}: module {m['mod']!r} has two lora_{m['ab']} weights")
        slot[m["ab"]] = val
    return pairs


def check_adapter(
    state: Any,
    reference_names: Sequence[str],
    reference_ranks: int | Mapping[str, int],
    *,
    reference_shapes: Mapping[str, tuple[int, int]] | None = None,
    name: str = "adapter",
) -> None:
    """Validate a received adapter before anything is computed from it.

    Args:
        state: a :class:`LoraAdapter`, a PeftModel, a mapping name -> :class:`LoraFactors`,
            or a peft state dict (``...<module>.lora_A[.adapter].weight`` keys).
        reference_names: the module names every adapter must cover, exactly.
        reference_ranks: the expected rank, for all modules or per module.
        reference_shapes: optional module -> (out_features, in_features).
        name: label used in error messages (e.g. ``"client 3"``).

    Raises:
        AdapterError: missing/unexpected modules, a missing A or B, rank or shape mismatch,
            non-floating or non-finite weights. The message names ``name`` and the module.
    """
    pairs = _as_factor_pairs(state, name)
    ref = set(reference_names)
    missing, extra = sorted(ref - set(pairs)), sorted(set(pairs) - ref)
    if missing or extra:
        raise AdapterError(f"{name}: module names do not match the reference: missing {missing}, unexpected {extra}")
    for mod, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{name}: module {mod!r} lacks lora_{'A' if 'A' not in ab else 'B'}")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{name}: module {mod!r} has inconsistent factor shapes A{tuple(A.shape)}, B{tuple(B.shape)}")
        want = reference_ranks[mod] if isinstance(reference_ranks, Mapping) else reference_ranks
        if A.shape[0] != want:
            raise AdapterError(f"{name}: module {mod!r} has rank {A.shape[0]}, expected {want}")
        if reference_shapes is not None and (B.shape[0], A.shape[1]) != tuple(reference_shapes[mod]):
            raise AdapterError(
                f"{name}: module {mod!r} maps {A.shape[1]} -> {B.shape[0]} features, expected {tuple(reference_shapes[mod])[::-1]}"
            )
        for label, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point():
                raise AdapterError(f"{name}: module {mod!r} {label} has dtype {t.dtype}, expected floating point")
            if not torch.isfinite(t).all():
                raise AdapterError(f"{name}: module {mod!r} {label} contains NaN or Inf")


def load_lora_factors(
    peft_model: PeftModel,
    adapter: LoraAdapter | Mapping[str, LoraFactors],
    adapter_name: str = "default",
    *,
    name: str = "adapter",
) -> PeftModel:
    """Write factors into a peft model's LoRA layers (in place), after :func:`check_adapter`.

    If an adapter's scaling differs from the layer's, ``B`` is rescaled so that the layer
    computes exactly ``adapter.scaling · B · A``.
    """
    factors = adapter.factors if isinstance(adapter, LoraAdapter) else dict(adapter)
    layers = _lora_layers(peft_model)
    ranks = {n: int(layers[n].r[adapter_name]) for n in layers}
    shapes = {n: (int(layers[n].out_features), int(layers[n].in_features)) for n in layers}
    check_adapter(factors, sorted(layers), ranks, reference_shapes=shapes, name=name)
    with torch.no_grad():
        for n, f in factors.items():
            layer = layers[n]
            wA, wB = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            wA.copy_(f.A.to(device=wA.device, dtype=wA.dtype))
            ratio = float(f.scaling) / float(layer.scaling[adapter_name])
            wB.copy_((f.B.to(torch.float64) * ratio).to(device=wB.device, dtype=wB.dtype))
    return peft_model


def save_adapter(adapter: PeftModel | LoraAdapter, path: str | Path, adapter_name: str = "default") -> Path:
    """Save an adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` (peft layout).

    The directory can be read back by :func:`read_adapter` / :func:`load_adapter`, and also
    by ``peft.PeftModel.from_pretrained(base, path)``.
    """
    from safetensors.torch import save_file

    if isinstance(adapter, PeftModel):
        adapter = extract_adapter(adapter, adapter_name)
    if not isinstance(adapter, LoraAdapter):
        raise TypeError(f"adapter must be a PeftModel or LoraAdapter, got {type(adapter).__name__}")
    scal = {n: f.scaling for n, f in adapter.factors.items()}
    if any(abs(s - adapter.alpha / adapter.r) > 1e-12 * max(1.0, abs(s)) for s in scal.values()):
        raise ValueError("every module's scaling must equal alpha / r to be saved in peft format")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    adapter.lora_config().save_pretrained(str(path))
    # one metadata key only, as peft writes it (more keys are serialised in random order)
    save_file(adapter.state_dict(), str(path / _WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def read_adapter(path: str | Path, *, name: str | None = None, max_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES) -> LoraAdapter:
    """Read an adapter directory written by :func:`save_adapter` (or peft), without a model.

    The folder is client data (:mod:`fedlora_lite.lora.adapter_files`): both files must be
    regular files inside it (links leaving it, FIFOs and devices are refused), the config at
    most 1 MiB and strictly typed, the weights at most ``max_bytes``. Only
    ``adapter_model.safetensors`` is accepted — pickle-based ``.bin`` files are refused.
    The safetensors header is checked before any tensor is decoded: 2-D floating-point
    ``lora_A`` (r, in) / ``lora_B`` (out, r) pairs with the config's ``r`` and
    ``in, out >= 1``. Then the values must be finite, and ``scaling * r * max|B| * max|A|``
    must stay below float32's largest value, so ΔW = scaling·B·A cannot overflow. Checking
    against a reference model is :func:`check_adapter`'s (or :func:`load_adapter`'s) job.

    Args:
        path: the adapter folder.
        name: label for error messages (default: the path), e.g. ``"client 3"``.
        max_bytes: largest weights file accepted (default 4 GiB).

    Raises:
        FileNotFoundError: no such folder, or no weights file in it.
        AdapterError: anything wrong with the files or their content (a ``ValueError``).
    """
    from safetensors.torch import load as load_safetensors

    path = Path(path)
    label = name or str(path)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    if not path.is_dir():
        raise FileNotFoundError(f"{label}: adapter directory {path} not found")
    if not os.path.lexists(path / _WEIGHTS_FILE) and os.path.lexists(path / "adapter_model.bin"):
        raise AdapterError(f"{label}: only safetensors adapters are accepted; refusing pickle file adapter_model.bin")
    try:
        cfg = parse_lora_config(read_member(path, _CONFIG_FILE, MAX_CONFIG_BYTES, label), label, _CONFIG_FILE)
    except FileNotFoundError as exc:
        raise AdapterError(f"{label}: cannot read {_CONFIG_FILE}: {exc}") from exc
    data = read_member(path, _WEIGHTS_FILE, max_bytes, label)
    header = safetensors_header(data, label, _WEIGHTS_FILE)
    shapes = {k: tuple(e["shape"]) for k, e in header.items()}
    pairs = _as_factor_pairs({k: _Shape(s) for k, s in shapes.items()}, label)  # key checks before decoding
    if not pairs:
        raise AdapterError(f"{label}: {_WEIGHTS_FILE} holds no LoRA weights")
    for mod, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{label}: module {mod!r} lacks lora_{'A' if 'A' not in ab else 'B'}")
        (ra, n_in), (n_out, rb) = ab["A"].shape, ab["B"].shape
        if ra != cfg.r or rb != cfg.r:
            raise AdapterError(f"{label}: module {mod!r} has factors A{(ra, n_in)}, B{(n_out, rb)}; "
                               f"expected rank r={cfg.r} from {_CONFIG_FILE}")
        if n_in == 0 or n_out == 0:
            raise AdapterError(f"{label}: module {mod!r} has empty factors A{(ra, n_in)}, B{(n_out, rb)}")
    try:
        state = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{label}: {_WEIGHTS_FILE} is not a readable safetensors file ({exc})") from exc
    del data
    if {k: tuple(v.shape) for k, v in state.items()} != shapes:
        raise AdapterError(f"{label}: {_WEIGHTS_FILE} decodes to other tensors than its header lists")
    check_adapter(state, sorted(pairs), cfg.r, name=label)
    scaling = cfg.lora_alpha / cfg.r
    factors = {}
    for n, ab in sorted(_as_factor_pairs(state, label).items()):
        bound = scaling * cfg.r * float(ab["B"].abs().max()) * float(ab["A"].abs().max())
        if not bound < _FLOAT32_MAX:
            raise AdapterError(f"{label}: module {n!r}: scaling*r*max|B|*max|A| = {bound:.3g} would overflow ΔW in float32")
        factors[n] = LoraFactors(A=ab["A"], B=ab["B"], scaling=scaling, fan_in_fan_out=cfg.fan_in_fan_out)
    return LoraAdapter(factors, cfg.r, cfg.lora_alpha)


def _module_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of an nn.Linear or Conv1D, else None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return int(module.out_features), int(module.in_features)
    if isinstance(module, Conv1D):
        return int(module.weight.shape[1]), int(module.weight.shape[0])  # Conv1D stores (in, out)
    return None


def load_adapter(
    base_model: torch.nn.Module,
    path: str | Path,
    *,
    name: str | None = None,
    copy_model: bool = True,
    max_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES,
) -> PeftModel:
    """Attach a saved adapter to a base model: read (safetensors only), validate, load.

    Every module, rank and shape is checked against ``base_model`` *before* LoRA layers are
    attached (attaching allocates ``r x (in + out)`` per module): the modules must exist and
    be ``nn.Linear`` / ``Conv1D``, the factors must map the module's in -> out features, and
    ``r <= min(in, out)`` (a larger rank cannot raise the rank of ΔW; it only costs memory).

    Args:
        base_model: the plain base model the adapter was trained on.
        path: directory from :func:`save_adapter`.
        name: label for error messages (default: the path).
        copy_model: deep-copy the base first (default; peft modifies it in place).
        max_bytes: largest weights file accepted (see :func:`read_adapter`).

    Returns:
        A :class:`peft.PeftModel` computing exactly the saved adapter.

    Raises:
        AdapterError: the adapter's files are unsafe, or its modules/ranks/shapes don't fit
            ``base_model``, or its weights are not finite.
    """
    adapter = read_adapter(path, name=name, max_bytes=max_bytes)
    label = name or str(path)
    modules = dict(base_model.named_modules())
    unknown = [n for n in adapter.module_names if n not in modules]
    if unknown:
        raise AdapterError(f"{label}: modules {unknown} do not exist in the base model")
    shapes = {}
    for n in adapter.module_names:
        shapes[n] = _module_shape(modules[n])
        if shapes[n] is None:
            raise AdapterError(f"{label}: module {n!r} is a {type(modules[n]).__name__}, not nn.Linear/Conv1D")
        if adapter.r > min(shapes[n]):
            raise AdapterError(f"{label}: rank r={adapter.r} exceeds min(out, in) = {min(shapes[n])} of module {n!r}")
    check_adapter(adapter, adapter.module_names, adapter.r, reference_shapes=shapes, name=label)
    pm = attach_lora(base_model, list(adapter.module_names), r=adapter.r, alpha=adapter.alpha, copy_model=copy_model, seed=0)
    load_lora_factors(pm, adapter, name=label)
    return pm


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
    weights (:func:`fedlora_lite.lora.adapter_io.check_adapter`).

    Args:
        adapters: per client, a LoraAdapter, a peft state dict, or None.
        reference_names: module names every adapter must cover exactly.
        reference_rank: the expected LoRA rank.
        reference_shapes: optional module -> (out_features, in_features).
        on_invalid: "exclude" returns the valid indices and the reasons for the others;
            "raise" raises :class:`~fedlora_lite.lora.adapter_io.AdapterError` (a ValueError) at the
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
