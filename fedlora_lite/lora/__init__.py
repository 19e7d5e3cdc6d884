"""LoRA as data and as peft modules: factor types, the peft bridge, re-factorisation, adapter I/O.

Imports go one way inside this subpackage: ``factors`` (plain torch) <- ``peft_bridge``
(peft models) <- ``refactor`` / ``adapter_io`` (files from clients: the trust boundary).
"""

from .adapter_io import (
    AdapterError,
    check_adapter,
    load_adapter,
    load_lora_factors,
    read_adapter,
    save_adapter,
    screen_adapters,
)
from .factors import LoraAdapter, LoraFactors, stack_deltas
from .peft_bridge import (
    DEFAULT_TARGETS,
    adapted_module_names,
    apply_deltas,
    attach_lora,
    base_weights,
    extract_adapter,
    lora_deltas,
    lora_factors,
    lora_parameter_count,
)
from .refactor import deltas_to_lora_state, factorize_delta

__all__ = [
    "LoraFactors", "LoraAdapter", "stack_deltas",
    "DEFAULT_TARGETS", "attach_lora", "adapted_module_names", "lora_factors", "lora_deltas", "extract_adapter",
    "base_weights", "apply_deltas", "lora_parameter_count",
    "factorize_delta", "deltas_to_lora_state",
    "AdapterError", "check_adapter", "screen_adapters", "load_lora_factors", "save_adapter", "read_adapter",
    "load_adapter",
]
