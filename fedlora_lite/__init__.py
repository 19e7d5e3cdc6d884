"""fedlora_lite: contamination-aware federated LoRA fine-tuning (CLAIR), as a tested
library plus a papermill/nbval notebook course.

The top level holds what a user calls; everything else is imported from its subpackage
(see ``ARCHITECTURE.md``):

* :mod:`fedlora_lite.core` — torch-only numerics (validation, seeds/devices, the
  low-rank + block-sparse solvers, the exact LoRA-factored reduction);
* :mod:`fedlora_lite.clair` — the method: rules, one fit, refinement, results;
* :mod:`fedlora_lite.federated` — aggregators, metrics, synthetic federations;
* :mod:`fedlora_lite.lora` — LoRA factors, the peft bridge, adapter I/O;
* :mod:`fedlora_lite.experiments` — one folder per experiment (``copy_task``);
* :mod:`fedlora_lite.course` — profiles, results files, notebook runner, CLI, plotting.
"""

from .clair import (
    ClairConfig,
    ClairResult,
    LambdaPath,
    MultiModuleClairResult,
    RefinedFactors,
    clair,
    clair_factored,
    clair_factored_modules,
    clair_modules,
    select_lambda,
)
from .core.decomposition import Decomposition, decompose, default_lambda
from .core.reduction import reduce_factors
from .core.runtime import environment_info, make_generator, resolve_device, set_seed
from .federated.aggregators import AggregationResult, aggregate, available_aggregators
from .federated.metrics import DetectionMetrics, detection_metrics, refinement_gain, relative_errors, sin_theta

__version__ = "0.1.0"

# The experiment entry points import transformers/peft, which is slow; they are resolved
# lazily (PEP 562) so `import fedlora_lite` stays fast for the numerical core.
_LAZY = {
    "run_copy_experiment": "experiments.copy_task",
    "ExperimentConfig": "experiments.copy_task",
    "LocalTrainingConfig": "experiments.copy_task",
    "CopyTaskConfig": "experiments.copy_task",
}

__all__ = [
    # CLAIR
    "clair", "clair_modules", "clair_factored", "clair_factored_modules", "ClairConfig",
    "ClairResult", "MultiModuleClairResult", "RefinedFactors",
    # the decomposition, lambda and the factored reduction
    "decompose", "Decomposition", "default_lambda", "select_lambda", "LambdaPath", "reduce_factors",
    # aggregation and metrics
    "aggregate", "available_aggregators", "AggregationResult",
    "detection_metrics", "DetectionMetrics", "sin_theta", "relative_errors", "refinement_gain",
    # seeds and devices
    "set_seed", "make_generator", "resolve_device", "environment_info",
    # the copy-task experiment
    *_LAZY,
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlora_lite' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
