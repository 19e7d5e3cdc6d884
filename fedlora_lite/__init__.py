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

__version__ = "0.1.0"
