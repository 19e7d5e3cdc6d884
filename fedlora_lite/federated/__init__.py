"""Federated aggregation around CLAIR: baseline aggregators, metrics, synthetic federations.

The aggregators CLAIR is compared with (one ``aggregate`` interface, robust rules and
pre-aggregations included), LoRA-aware aggregation of factors (``aggregate_lora``),
Byzantine attacks (``attack`` / ``contaminate``), the metrics, synthetic federations
(dense updates, linear regression, LoRA factors), and cached attack grids
(:mod:`fedlora_lite.federated.grid`).
"""

from .aggregators import (
    AGGREGATORS,
    AggregationResult,
    aggregate,
    available_aggregators,
    krum_scores,
)
from .attacks import ATTACKS, alie_z, attack, available_attacks, contaminate, label_flip_task
from .attacks_adaptive import AdaptiveAttack, clair_adaptive_search
from .lowrank import best_rank_factors, factor_updates, truncate_updates
from .lora_aggregation import LORA_AGGREGATORS, LoraAggregationResult, aggregate_lora, available_lora_aggregators
from .metrics import (
    DetectionMetrics,
    RefinementGain,
    detection_metrics,
    principal_angle_sines,
    refinement_gain,
    relative_errors,
    sin_theta,
)
from .regression import (
    RegressionFederation,
    expected_ols_error,
    fit_local,
    least_squares,
    make_regression_federation,
    ols_noise_level,
)
from .robust import PREAGGREGATORS, nnm
from .rpca import RobustPCA, robust_pca
from .synthetic import CONTAMINATION_KINDS, UpdateFederation, make_update_federation
from .synthetic_lora import SyntheticLora, random_lora_factors

__all__ = [
    "AGGREGATORS", "AggregationResult", "aggregate", "available_aggregators", "krum_scores",
    "DetectionMetrics", "RefinementGain", "detection_metrics", "principal_angle_sines", "refinement_gain",
    "relative_errors", "sin_theta",
    "CONTAMINATION_KINDS", "RegressionFederation", "UpdateFederation", "expected_ols_error", "fit_local",
    "least_squares", "make_regression_federation", "make_update_federation", "ols_noise_level",
    "SyntheticLora", "random_lora_factors",
    "ATTACKS", "AdaptiveAttack", "alie_z", "attack", "available_attacks", "clair_adaptive_search", "contaminate",
    "label_flip_task",
    "LORA_AGGREGATORS", "LoraAggregationResult", "aggregate_lora", "available_lora_aggregators",
    "PREAGGREGATORS", "nnm", "RobustPCA", "robust_pca",
    "best_rank_factors", "factor_updates", "truncate_updates",
]
