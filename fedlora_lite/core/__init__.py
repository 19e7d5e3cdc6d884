"""Torch-only numerics with no CLAIR policy: solvers, proximal maps, the factored reduction.

Input validation, seeds and devices, the proximal maps, the low-rank + block-sparse solvers
and the exact LoRA-factored reduction.

Nothing in ``core`` imports from the rest of the package.
"""

from .decomposition import Decomposition, decompose, decomposition_objective, default_lambda, numerical_rank
from .prox import block_frobenius_norms, block_soft_threshold, singular_value_threshold
from .reduction import FactoredReduction, reduce_factors, truncate_factors
from .runtime import environment_info, make_generator, resolve_device, set_seed
from .solvers import SolverOptions, SolverRun

__all__ = [
    "Decomposition", "decompose", "decomposition_objective", "default_lambda", "numerical_rank",
    "block_frobenius_norms", "block_soft_threshold", "singular_value_threshold",
    "FactoredReduction", "reduce_factors", "truncate_factors",
    "environment_info", "make_generator", "resolve_device", "set_seed",
    "SolverOptions", "SolverRun",
]
