"""CLAIR's result types: one module (:class:`ClairResult`) and a whole model (:class:`MultiModuleClairResult`).

The same field names on both paths: ``refined_updates`` is a dense (K, d, p) tensor and
``refined_factors`` a :class:`~fedlora_lite.clair.refine.RefinedFactors`; dense inputs
fill the first, LoRA factors the second (and the first too with ``return_dense=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..core.decomposition import Decomposition
from ..core.reduction import FactoredReduction
from .config import ClairConfig
from .detect import DetectionReport
from .refine import RefinedFactors

__all__ = ["ClairResult", "MultiModuleClairResult"]


class _Decision:
    """What both result types share: the config's threshold/side/refine and the flagged indices."""

    config: ClairConfig
    flags: torch.Tensor

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def side(self) -> str:
        return self.config.side

    @property
    def refine(self) -> str:
        return self.config.refine

    @property
    def flagged_clients(self) -> list[int]:
        """Indices of flagged clients."""
        return [int(i) for i in torch.nonzero(self.flags).flatten()]


@dataclass(kw_only=True)
class ClairResult(_Decision):
    """Output of :func:`fedlora_lite.clair.clair` for one module.

    Attributes:
        subspace: orthonormal basis of the shared subspace, (d, r) for ``side="column"``
            and (p, r) for ``side="row"``.
        rank: r.
        singular_values: singular values of L-hat (descending, zero-padded to min(d, K p)).
        scores: (K,) contamination scores ||S_k||_F / ||M_k||_F in [0, 1] (the module's own).
        flags: (K,) bool, True = flagged as contaminated (joint over modules in a
            :class:`MultiModuleClairResult`).
        benign: (K,) bool, the collaborative set C-hat (= ~flags).
        lam: block weight used; mu: noise weight used (None = exact form).
        config: the :class:`~fedlora_lite.clair.config.ClairConfig` of the run.
        sparse_energy, total_energy: (K,) ||S_k||_F^2 and ||M_k||_F^2 (pooled over modules
            for the joint decision).
        objective, iterations, converged: from the solver.
        shape: (d, p) of one client update in the working orientation.
        decomposition: the underlying decomposition (of the reduced blocks on the factored
            path; on the transposed blocks for ``side="row"``); None when not kept.
        reduction: the exact factored reduction (factored path only).
        refined_updates: (K, d, p) refined updates (flagged clients keep their own input),
            for dense inputs (or factors with ``return_dense=True``); None when not computed.
        refined_factors: K refined LoRA pairs (factored path only).
        refine_weights: (K, 2) the (w_in, w_off) each client's refinement used (NaN for
            flagged clients; see :mod:`fedlora_lite.clair.refine`).
        detection: how ``threshold="auto"`` decided (:class:`~fedlora_lite.clair.detect.DetectionReport`),
            None with a fixed threshold.
        scale: the median client norm the stack was normalised by.
    """

    subspace: torch.Tensor
    rank: int
    singular_values: torch.Tensor
    scores: torch.Tensor
    flags: torch.Tensor
    benign: torch.Tensor
    lam: float
    mu: float | None
    config: ClairConfig
    sparse_energy: torch.Tensor
    total_energy: torch.Tensor
    objective: float
    iterations: int
    converged: bool
    shape: tuple[int, int]
    decomposition: Decomposition | None = field(default=None, repr=False)
    reduction: FactoredReduction | None = field(default=None, repr=False)
    refined_updates: torch.Tensor | None = field(default=None, repr=False)
    refined_factors: RefinedFactors | None = field(default=None, repr=False)
    refine_weights: torch.Tensor | None = field(default=None, repr=False)
    detection: DetectionReport | None = field(default=None, repr=False)
    scale: float = 1.0

    def dense_refined(self) -> torch.Tensor:
        """The refined updates as a dense (K, d, p) tensor, whichever path produced them."""
        if self.refined_updates is not None:
            return self.refined_updates
        if self.refined_factors is not None:
            return self.refined_factors.dense()
        raise ValueError("this result holds no refined updates (a streamed module: use MultiModuleClairResult.module)")


@dataclass(kw_only=True)
class MultiModuleClairResult(_Decision):
    """Output of :func:`fedlora_lite.clair.clair_modules`: one joint decision, per-module subspaces.

    Attributes:
        per_module: module name -> :class:`ClairResult` (module scores, joint flags). For
            a mapping input every entry is complete; for a streamed source (a callable)
            entries keep only the small state (no decomposition, no refined updates) and
            :meth:`module` / :meth:`iter_refined` re-read the source to refine.
        scores: (K,) joint scores sqrt(sum_m ||S_k^m||_F^2 / sum_m ||M_k^m||_F^2) (float64, CPU).
        flags: (K,) bool joint flags (scores > threshold).
        benign: (K,) bool, ~flags.
        config: the :class:`~fedlora_lite.clair.config.ClairConfig` of the run.
        detection: the joint :class:`~fedlora_lite.clair.detect.DetectionReport` (``threshold="auto"``).
    """

    per_module: dict[str, ClairResult]
    scores: torch.Tensor
    flags: torch.Tensor
    benign: torch.Tensor
    config: ClairConfig
    detection: DetectionReport | None = field(default=None, repr=False)
    _refresh: Callable[[], Iterator[tuple[str, ClairResult]]] | None = field(default=None, repr=False)

    @property
    def streamed(self) -> bool:
        """True when refinement re-reads the source module by module."""
        return self._refresh is not None

    def iter_refined(self) -> Iterator[tuple[str, ClairResult]]:
        """(name, complete :class:`ClairResult`) per module, refined with the joint decision.

        For a streamed source this is a second pass over it: drop each module's result
        before advancing, so only one module's refined factors are alive at a time.

        Raises:
            ValueError: a streamed source yields other modules or other factors than in
                the first pass.
        """
        if self._refresh is None:
            yield from self.per_module.items()
            return
        seen = set()
        for name, res in self._refresh():
            seen.add(name)
            yield name, res
        missing = sorted(set(self.per_module) - seen)
        if missing:
            raise ValueError(f"the source did not yield modules {missing} on the second pass")

    def module(self, name: str) -> ClairResult:
        """The complete result of one module (re-reads a streamed source)."""
        if name not in self.per_module:
            raise KeyError(f"unknown module {name!r}; modules are {sorted(self.per_module)}")
        if self._refresh is None:
            return self.per_module[name]
        for n, res in self._refresh(only=name):
            if n == name:
                return res
        raise ValueError(f"the source no longer yields module {name!r}")

    def refined_updates(self) -> dict[str, torch.Tensor]:
        """Module name -> dense (K, d_m, p_m) refined updates (densifies factors: small models only)."""
        return {name: res.dense_refined() for name, res in self.iter_refined()}
