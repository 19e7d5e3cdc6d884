"""CLAIR's options in one place: :class:`ClairConfig`, used by every entry point.

:func:`fedlora_lite.clair.clair`, :func:`fedlora_lite.clair.clair_modules`,
``aggregate("clair", ...)`` and the experiments all take a ``ClairConfig`` (or its field
names as keywords), so an option is defined, documented and validated once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.reduction import SIDES
from ..core.validation import check_choice, check_positive
from .rules import check_threshold

__all__ = ["ClairConfig", "REFINE_MODES"]

REFINE_MODES = ("average", "project")
"""``average``: own in-subspace part + collaborative average off the subspace (the paper's
refinement as we read it); ``project``: own in-subspace part only."""


def _check_int(value: Any, name: str, *, allow_none: bool = True, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an int >= {minimum}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ClairConfig:
    """Every CLAIR option (see ``docs/CLAIR.md`` for the programs and rules).

    Attributes:
        rank: shared rank r, or "auto" to choose it from L-hat's spectrum
            (:func:`~fedlora_lite.clair.rules.choose_rank`).
        lam: block-sparsity weight; None -> :func:`~fedlora_lite.core.decomposition.default_lambda`
            (or pick one with :func:`~fedlora_lite.clair.select_lambda`).
        mu: None = exact form (noiseless model); > 0 = noisy form, mu of the order of the
            noise's spectral norm; "auto" = noisy form with mu from
            :func:`~fedlora_lite.clair.rules.estimate_mu` (exact form first, then the noise
            level of its benign residual).
        side: "column" (shared output subspace, Theta_k = U V_k^T) or "row" (shared input
            subspace, Theta_k = W_k U^T).
        threshold: flag client k when ||S_k||_F / ||M_k||_F > threshold; in (0, 1).
        refine: one of :data:`REFINE_MODES`.
        max_rank: largest rank "auto" may choose.
        max_iter, tol: solver iteration cap and tolerance (None = the solver's default for
            the dtype).
        svd_rank_hint: rank hint of the randomized singular value thresholding; "auto" =
            off for dense updates, max r_k for factored problems of at least
            :data:`~fedlora_lite.clair.fit.AUTO_RANK_HINT_MIN` on their smaller side.
    """

    rank: int | str = "auto"
    lam: float | None = None
    mu: float | str | None = None
    side: str = "column"
    threshold: float = 0.5
    refine: str = "average"
    max_rank: int | None = None
    max_iter: int = 5000
    tol: float | None = None
    svd_rank_hint: int | str | None = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.rank, str):
            if self.rank != "auto":
                raise ValueError(f"rank must be a positive int or 'auto', got {self.rank!r}")
        else:
            _check_int(self.rank, "rank", allow_none=False)
        if self.lam is not None:
            check_positive(self.lam, "lam")
        if isinstance(self.mu, str):
            if self.mu != "auto":
                raise ValueError(f"mu must be None, a positive float or 'auto', got {self.mu!r}")
        elif self.mu is not None:
            check_positive(self.mu, "mu")
        check_choice(self.side, "side", SIDES)
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        check_choice(self.refine, "refine", REFINE_MODES)
        _check_int(self.max_rank, "max_rank")
        _check_int(self.max_iter, "max_iter", allow_none=False)
        if self.tol is not None:
            check_positive(self.tol, "tol")
        if self.svd_rank_hint != "auto":
            _check_int(self.svd_rank_hint, "svd_rank_hint")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """Names of the options (the keywords every CLAIR entry point accepts)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def with_options(self, **options: Any) -> ClairConfig:
        """A copy with some options replaced; unknown names raise a TypeError listing the valid ones."""
        unknown = sorted(set(options) - set(self.fields()))
        if unknown:
            raise TypeError(f"unknown CLAIR options {unknown}; valid options are {list(self.fields())}")
        return dataclasses.replace(self, **options) if options else self

    @classmethod
    def resolve(cls, config: ClairConfig | None, options: dict[str, Any]) -> ClairConfig:
        """``config`` (default ``ClairConfig()``) with ``options`` applied."""
        if config is None:
            config = cls()
        elif not isinstance(config, ClairConfig):
            raise TypeError(f"config must be a ClairConfig or None, got {type(config).__name__}")
        return config.with_options(**options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (for results files and cache keys)."""
        return dataclasses.asdict(self)
