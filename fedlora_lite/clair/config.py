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

REFINE_MODES = ("adaptive", "paper", "average", "project", "fixed")
"""How the collaborative set is refined (:mod:`fedlora_lite.clair.refine`):

* ``adaptive`` (default, ours): ``mean_C + W_k (M_k - mean_C)`` with a norm-robust mean and
  weights ``W_k = w_in U U^T + w_off (I - U U^T)`` chosen from the data (shrinkage, or the
  clients' own validation among the candidates of :data:`~fedlora_lite.clair.refine.WEIGHT_GRID` (built with
  :func:`~fedlora_lite.clair.refine.apply_family`; see :mod:`fedlora_lite.experiments.copy_task.methods`));
* ``paper`` (alias ``average``): the paper's refinement as we read it, ``U U^T M_k + (I - U U^T)
  mean_C`` with the plain mean, i.e. weights (1, 0);
* ``project``: ``U U^T M_k`` (own in-subspace part only);
* ``fixed``: the family with the given ``weights=(w_in, w_off)`` and the norm-robust mean
  ((0, 0) = detect, then average; (1, 1) = local).
"""


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
        threshold: "auto" (default, ours): the data-driven rule of
            :mod:`fedlora_lite.clair.detect` (leave-one-out residuals against a core, stable
            along a rank path); or a float in (0, 1): the paper's rule, flag client k when
            ||S_k||_F / ||M_k||_F > threshold.
        refine: one of :data:`REFINE_MODES`.
        weights: (w_in, w_off) in [0, 1]^2 for ``refine="fixed"``.
        clip: norm-robustness (ours): every client's update enters the decomposition and the
            collaborative mean with its norm clipped to ``clip`` times the median client norm
            (None: no clipping). Flags, subspace and refined updates do not depend on the
            units of the updates: the stack is always solved after division by that median.
        guard: the minimum residual ratio of ``threshold="auto"``
            (:data:`~fedlora_lite.clair.detect.DEFAULT_GUARD`).
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
    threshold: float | str = "auto"
    refine: str = "adaptive"
    weights: tuple[float, float] | None = None
    clip: float | None = 2.0
    guard: float = 1.35
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
        if isinstance(self.threshold, str):
            if self.threshold != "auto":
                raise ValueError(f"threshold must be 'auto' or a float in (0, 1), got {self.threshold!r}")
        else:
            object.__setattr__(self, "threshold", check_threshold(self.threshold))
        check_choice(self.refine, "refine", REFINE_MODES)
        if self.refine == "fixed":
            w = self.weights
            if (not isinstance(w, (tuple, list)) or len(w) != 2
                    or not all(0.0 <= check_positive(x, "weights", allow_zero=True) <= 1.0 for x in w)):
                raise ValueError(f"refine='fixed' needs weights=(w_in, w_off) with both in [0, 1], got {w!r}")
            object.__setattr__(self, "weights", (float(w[0]), float(w[1])))
        elif self.weights is not None:
            raise ValueError(f"weights is only used with refine='fixed' (refine={self.refine!r})")
        if self.clip is not None and check_positive(self.clip, "clip") < 1.0:
            raise ValueError(f"clip must be None or >= 1 (a multiple of the median client norm), got {self.clip!r}")
        if check_positive(self.guard, "guard") < 1.0:
            raise ValueError(f"guard must be >= 1, got {self.guard!r}")
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
