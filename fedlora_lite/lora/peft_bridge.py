"""LoRA mechanics with ``peft``: attach adapters, extract exact factors and ΔW, write back.

LoRA replaces a frozen weight ``W`` by ``W + s·B·A`` with ``A ∈ R^{r×in}``,
``B ∈ R^{out×r}`` and scaling ``s = alpha / r``. This module is the bridge between a
peft-wrapped model and the matrices CLAIR works on.

Module names are the dotted names inside the *base* model, e.g.
``"transformer.h.0.attn.c_attn"`` (peft's ``"base_model.model."`` prefix is dropped).

Orientation (the classic pitfall): ``nn.Linear`` stores its weight as (out, in) and
computes ``x @ W.T``; GPT-2's ``transformers`` ``Conv1D`` stores (in, out) and computes
``x @ W``. peft handles Conv1D with ``fan_in_fan_out=True`` and still keeps
``A: (r, in)``, ``B: (out, r)``, so ``s·B·A`` is (out, in) and must be *transposed*
before it is added to a Conv1D weight. Every function here takes
``orientation="base"`` (ΔW shaped like the base weight, so ``W + ΔW`` is the merged
weight) or ``orientation="out_in"`` (always the ``nn.Linear`` convention, the same for
every architecture).

Saving, loading and validating adapters received from clients lives in
:mod:`fedlora_lite.lora.adapter_io`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

from ..core.validation import check_choice, check_positive
from .factors import _ORIENTATIONS, LoraAdapter, LoraFactors

__all__ = [
    "DEFAULT_TARGETS",
    "attach_lora",
    "adapted_module_names",
    "lora_factors",
    "lora_deltas",
    "extract_adapter",
    "base_weights",
    "apply_deltas",
    "lora_parameter_count",
]

#: GPT-2 attention (``c_attn`` qkv, ``c_proj``) and MLP (``c_fc``, ``c_proj``) projections.
DEFAULT_TARGETS: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")


def _match(name: str, targets: Sequence[str]) -> bool:
    # peft's rule for a list of names: exact match or dotted suffix
    return any(name == t or name.endswith("." + t) for t in targets)


def attach_lora(
    model: torch.nn.Module,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    r: int = 4,
    alpha: float = 8.0,
    dropout: float = 0.0,
    *,
    seed: int | None = 0,
    copy_model: bool = True,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters on the named projections (peft).

    Only ``nn.Linear`` and ``transformers`` ``Conv1D`` targets are allowed;
    ``fan_in_fan_out`` is set per layer from its type (peft flips it per layer). As in
    peft, ``A`` is Kaiming-initialised and ``B = 0``, so ΔW = 0 at the start.

    Args:
        model: a plain (not yet peft-wrapped) model.
        target_modules: module-name suffixes (``"c_attn"``) or full names
            (``"transformer.h.0.attn.c_attn"``).
        r: rank.
        alpha: scaling numerator (``scaling = alpha / r``).
        dropout: LoRA dropout on the adapter input.
        seed: seeds the initialisation of ``A`` without touching the global RNG (``None``:
            use the global RNG).
        copy_model: deep-copy ``model`` first (peft injects layers *in place*; copying
            keeps one shared base usable for many clients).
        adapter_name: peft adapter name.

    Returns:
        A :class:`peft.PeftModel` whose only trainable parameters are the LoRA factors.

    Raises:
        TypeError: ``model`` is already a PeftModel.
        ValueError: bad ``r``/``alpha``/``dropout``, or no/unsupported target modules.
    """
    if isinstance(model, PeftModel):
        raise TypeError("model is already a PeftModel; pass the base model (or merge_and_unload() first)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    check_positive(alpha, "alpha")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty")
    matched = {n: m for n, m in model.named_modules() if n and _match(n, targets)}
    if not matched:
        avail = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))})
        raise ValueError(f"target_modules={targets} match no module; linear-like modules here end in {avail}")
    bad = {n: type(m).__name__ for n, m in matched.items() if not isinstance(m, (torch.nn.Linear, Conv1D))}
    if bad:
        raise ValueError(f"target_modules must name nn.Linear or Conv1D layers; got {bad}")
    is_conv = [isinstance(m, Conv1D) for m in matched.values()]
    cfg = LoraConfig(
        r=r, lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
        fan_in_fan_out=all(is_conv), bias="none",
    )
    base = copy.deepcopy(model) if copy_model else model
    with warnings.catch_warnings():
        # mixed Linear/Conv1D models: peft flips fan_in_fan_out per layer and warns each time
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        # peft calls a transformers method deprecated in v5; not actionable for users
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if seed is None:
            pm = get_peft_model(base, cfg, adapter_name=adapter_name)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                pm = get_peft_model(base, cfg, adapter_name=adapter_name)
    return pm


def _lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft PeftModel (see attach_lora), got {type(model).__name__}")
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def adapted_module_names(peft_model: PeftModel) -> list[str]:
    """Sorted base-model names of the modules carrying LoRA adapters."""
    return sorted(_lora_layers(peft_model))


def lora_factors(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, LoraFactors]:
    """Module name -> :class:`LoraFactors` (detached clones, on the model's device)."""
    out = {}
    for n, layer in sorted(_lora_layers(peft_model).items()):
        if adapter_name not in layer.lora_A:
            raise ValueError(f"module {n} has no adapter named {adapter_name!r} (has {list(layer.lora_A)})")
        out[n] = LoraFactors(
            A=layer.lora_A[adapter_name].weight.detach().clone(),
            B=layer.lora_B[adapter_name].weight.detach().clone(),
            scaling=float(layer.scaling[adapter_name]),
            fan_in_fan_out=bool(layer.fan_in_fan_out),
        )
    return out


def extract_adapter(peft_model: PeftModel, adapter_name: str = "default") -> LoraAdapter:
    """The model-free :class:`LoraAdapter` of a peft model (factors, r, alpha)."""
    cfg = peft_model.peft_config[adapter_name]
    return LoraAdapter(lora_factors(peft_model, adapter_name), int(cfg.r), float(cfg.lora_alpha))


def lora_deltas(
    peft_model: PeftModel,
    adapter_name: str = "default",
    *,
    orientation: str = "base",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The exact update ΔW = scaling·B·A of every adapted module.

    Args:
        peft_model: model from :func:`attach_lora` (or any peft LoRA model).
        adapter_name: which adapter.
        orientation: ``"base"`` — shaped like the base weight, so
            ``base_weight + ΔW == merged weight`` ((in, out) for Conv1D, (out, in) for
            Linear); ``"out_in"`` — always (out, in).
        dtype: compute in this dtype (default: the adapter's).

    Returns:
        Module name -> ΔW tensor, sorted by name.
    """
    return {n: f.delta(orientation, dtype) for n, f in lora_factors(peft_model, adapter_name).items()}


def _resolve(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"module {name!r} not found in {type(model).__name__}") from exc


def base_weights(model: torch.nn.Module, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Copies of the base (frozen) weights of the named modules, in their stored orientation.

    Works on a plain model or a peft model (then it reads each LoRA layer's ``base_layer``).
    ``names=None`` means every adapted module of a peft model.
    """
    if isinstance(model, PeftModel):
        layers = _lora_layers(model)
        names = sorted(layers) if names is None else list(names)
        missing = [n for n in names if n not in layers]
        if missing:
            raise ValueError(f"modules {missing} carry no LoRA adapter")
        return {n: layers[n].get_base_layer().weight.detach().clone() for n in names}
    if names is None:
        raise ValueError("names is required for a plain (non-peft) model")
    return {n: _resolve(model, n).weight.detach().clone() for n in names}


def apply_deltas(
    model: torch.nn.Module,
    deltas: Mapping[str, torch.Tensor],
    *,
    orientation: str = "base",
    inplace: bool = False,
) -> torch.nn.Module:
    """Merge updates into a plain model's weights: ``W_name <- W_name + ΔW_name``.

    Args:
        model: plain model (not a PeftModel: call ``merge_and_unload()`` or pass the base).
        deltas: module name -> ΔW, as returned by :func:`lora_deltas` or refined by CLAIR.
        orientation: how ``deltas`` are laid out (``"base"`` or ``"out_in"``).
        inplace: modify ``model`` itself; default works on a deep copy.

    Returns:
        The updated model.

    Raises:
        ValueError: unknown module name, shape mismatch, or non-finite ΔW.
    """
    if isinstance(model, PeftModel):
        raise TypeError("apply_deltas needs a plain model; use peft_model.merge_and_unload() or the original base")
    check_choice(orientation, "orientation", _ORIENTATIONS)
    if not isinstance(deltas, Mapping):
        raise TypeError(f"deltas must be a mapping module name -> tensor, got {type(deltas).__name__}")
    target = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for n, d in deltas.items():
            mod = _resolve(target, n)
            if not isinstance(mod, (torch.nn.Linear, Conv1D)):
                raise ValueError(f"module {n!r} is a {type(mod).__name__}, not nn.Linear/Conv1D")
            d = torch.as_tensor(d)
            if orientation == "out_in" and isinstance(mod, Conv1D):
                d = d.T
            if tuple(d.shape) != tuple(mod.weight.shape):
                raise ValueError(
                    f"delta for {n!r} has shape {tuple(d.shape)} but the weight is {tuple(mod.weight.shape)} "
                    f"(orientation={orientation!r}; Conv1D weights are (in, out))"
                )
            if not torch.isfinite(d).all():
                raise ValueError(f"delta for {n!r} contains NaN or Inf")
            mod.weight.add_(d.to(device=mod.weight.device, dtype=mod.weight.dtype))
    return target



def lora_parameter_count(peft_model: PeftModel) -> dict[str, int]:
    """``{"lora": trainable LoRA parameters, "base": frozen base parameters}``."""
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    seen, base = set(), 0
    for n, p in peft_model.named_parameters():
        if "lora_" in n or id(p) in seen:
            continue
        seen.add(id(p))
        base += p.numel()
    return {"lora": lora, "base": base}

