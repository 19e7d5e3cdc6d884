"""Federated aggregation around CLAIR: baseline aggregators, metrics, synthetic federations.

The aggregators CLAIR is compared with (one ``aggregate`` interface), the metrics, and
synthetic federations (dense updates, linear regression, LoRA factors).
"""

from .aggregators import (
    AGGREGATORS,
    AggregationResult,
    aggregate,
    available_aggregators,
    krum_scores,
)
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
from .synthetic import CONTAMINATION_KINDS, UpdateFederation, make_update_federation
from .synthetic_lora import SyntheticLora, random_lora_factors

__all__ = [
    "AGGREGATORS", "AggregationResult", "aggregate", "available_aggregators", "krum_scores",
    "DetectionMetrics", "RefinementGain", "detection_metrics", "principal_angle_sines", "refinement_gain",
    "relative_errors", "sin_theta",
    "CONTAMINATION_KINDS", "RegressionFederation", "UpdateFederation", "expected_ols_error", "fit_local",
    "least_squares", "make_regression_federation", "make_update_federation", "ols_noise_level",
    "SyntheticLora", "random_lora_factors",
]
