"""CLAIR, the method: rules, one fit for dense and LoRA-factored updates, refinement, results.

Inside this subpackage imports go ``config``/``rules`` <- ``fit`` <- ``refine`` <- ``results``
<- ``api``; everything rests on :mod:`fedlora_lite.core` (the solvers and the exact
factored reduction), nothing here knows about peft, experiments or the course.
"""

from .api import clair, clair_factored, clair_factored_modules, clair_modules, is_factor_input
from .config import REFINE_MODES, ClairConfig
from .fit import AUTO_RANK_HINT_MIN
from .lambda_path import LambdaPath, select_lambda
from .refine import RefinedFactors, refine_factors, refine_updates
from .results import ClairResult, MultiModuleClairResult
from .rules import choose_rank, estimate_mu, scores_and_flags

__all__ = [
    "clair", "clair_modules", "clair_factored", "clair_factored_modules", "is_factor_input",
    "ClairConfig", "REFINE_MODES", "AUTO_RANK_HINT_MIN",
    "LambdaPath", "select_lambda",
    "RefinedFactors", "refine_updates", "refine_factors",
    "ClairResult", "MultiModuleClairResult",
    "choose_rank", "estimate_mu", "scores_and_flags",
]
