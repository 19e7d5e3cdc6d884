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
from .runtime import environment_info, make_generator, resolve_device, set_seed

__version__ = "0.1.0"
