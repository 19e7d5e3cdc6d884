"""fedlora_lite: contamination-aware federated LoRA fine-tuning (CLAIR), as a tested
library plus a papermill/nbval notebook course.

The public API is re-exported here; see the README for a tour.
"""

from .clair import ClairResult, MultiModuleClairResult, choose_rank, clair, clair_modules, estimate_mu, refine_updates
from .decomposition import (
    Decomposition,
    LambdaPath,
    decompose,
    decomposition_objective,
    default_lambda,
    select_lambda,
)
from .aggregation import AGGREGATORS, AggregationResult, aggregate, available_aggregators, krum_scores
from .metrics import (
    DetectionMetrics,
    RefinementGain,
    detection_metrics,
    principal_angle_sines,
    refinement_gain,
    relative_errors,
    sin_theta,
)
from .runtime import environment_info, make_generator, resolve_device, set_seed
from .simulate import (
    CONTAMINATION_KINDS,
    RegressionFederation,
    UpdateFederation,
    expected_ols_error,
    fit_local,
    least_squares,
    make_regression_federation,
    make_update_federation,
    ols_noise_level,
)

from .factored import (
    AUTO_RANK_HINT_MIN,
    FactoredClairResult,
    FactoredModuleSummary,
    FactoredReduction,
    RefinedFactors,
    SyntheticLora,
    FactoredModulesResult,
    clair_factored,
    clair_factored_modules,
    random_lora_factors,
    reduce_factors,
    truncate_factors,
)
from .plotting import plot_client_scores, plot_phase_transition, plot_singular_values, plot_sweep
from .reporting import PROFILES, ProfileConfig, load_results, save_results, select_profile

__version__ = "0.1.0"

# The transformer side (transformers, peft, papermill) is heavy to import; its public names
# are re-exported lazily (PEP 562) so `import fedlora_lite` stays fast for the
# linear-algebra core.
_LAZY = {
    "models": ("CharTokenizer", "ModelConfig", "BaseCheckpoint", "build_model", "count_parameters",
               "max_target_length", "save_base", "load_base", "verify_checksums", "DEFAULT_BASE_DIR"),
    "sequences": ("SequenceBatch", "encode_prompt", "encode_pair", "collate", "sequence_loss", "token_accuracy",
                  "greedy_decode", "greedy_exact_match"),
    "training": ("TrainConfig", "TrainHistory", "train_on_pairs"),
    "pretrain": ("PretrainConfig", "PretrainResult", "pretrain", "load_or_pretrain"),
    "lora": ("DEFAULT_TARGETS", "LoraFactors", "LoraAdapter", "attach_lora", "adapted_module_names", "lora_factors",
             "lora_deltas", "extract_adapter", "base_weights", "apply_deltas", "factorize_delta",
             "deltas_to_lora_state", "lora_parameter_count"),
    "adapters": ("AdapterError", "check_adapter", "load_lora_factors", "save_adapter", "read_adapter", "load_adapter"),
    "tasks": ("CopyTaskConfig", "CopyClient", "FederatedCopyTask", "make_copy_task", "make_client_pool",
              "random_derangement", "apply_substitution"),
    "federation": ("BASELINES", "LocalTrainingConfig", "ClairSettings", "ExperimentConfig", "ExperimentResult",
                   "LocalAdapters", "train_local_adapters", "screen_adapters", "stack_deltas", "run_copy_experiment"),
    "runner": ("RunReport", "discover_notebooks", "run_notebooks", "refresh_notebooks", "strip_notebook_metadata"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlora_lite' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))
