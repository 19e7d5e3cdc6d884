"""CLAIR's entry points: :func:`clair` (one module) and :func:`clair_modules` (a whole model).

Both take dense updates OR LoRA factor pairs and dispatch to the factored path themselves
(:mod:`fedlora_lite.clair.fit`); options come as a :class:`~fedlora_lite.clair.config.ClairConfig`
and/or its field names as keywords.

Pipeline for K client updates M_k (d x p) (``docs/CLAIR.md``):

1. decompose the stacked M = [M_1, ..., M_K] into low-rank L + block-sparse S;
2. shared subspace U-hat = leading left singular vectors of L-hat; the rank is given or
   chosen from L-hat's spectrum;
3. contamination score of client k = ||S_k||_F / ||M_k||_F; flag when it exceeds the
   threshold (jointly over modules in :func:`clair_modules`: block energies pooled);
4. refinement of every unflagged client (:mod:`fedlora_lite.clair.refine`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..core.reduction import is_factor_pair
from .config import ClairConfig
from .fit import ModuleFit, Problem, dense_problem, factored_problem, fit_problem
from .detect import DetectionReport, auto_flags
from .refine import (
    RefinedFactors,
    apply_family,
    family_weights,
    gram,
    refine_factors,
    refine_updates,
    robust_mean_weights,
    shrinkage_weights,
    effective_sizes,
)
from .results import ClairResult, MultiModuleClairResult
from .rules import scores_and_flags

__all__ = ["clair", "clair_modules", "clair_factored", "clair_factored_modules", "is_factor_input"]

Source = Callable[[], Iterable[tuple[str, Any]]]


def is_factor_input(updates: Any) -> bool:
    """True when ``updates`` is a sequence of LoRA pairs (B_k, A_k) (or objects with ``.A``/``.B``)."""
    if isinstance(updates, (torch.Tensor, np.ndarray, str, bytes)) or not isinstance(updates, Sequence):
        return False
    return len(updates) > 0 and is_factor_pair(updates[0])


def _problem(updates: Any, name: str, cfg: ClairConfig, scaling: Any, kind: str) -> Problem:
    factored = is_factor_input(updates) if kind == "auto" else kind == "factors"
    if factored:
        return factored_problem(updates, name, cfg.side, scaling)
    if scaling is not None:
        raise ValueError("scaling applies to LoRA factor pairs only; multiply dense updates by it yourself")
    return dense_problem(updates, name, cfg.side)


def _refine(problem: Problem, fit: ModuleFit, cfg: ClairConfig, benign: torch.Tensor,
            return_dense: bool) -> tuple[torch.Tensor | None, RefinedFactors | None, torch.Tensor]:
    """The refined updates (dense or factors) and the (K, 2) weights (w_in, w_off) used."""
    K, U = problem.num_clients, fit.subspace
    if not bool(benign.any()):
        warnings.warn(f"{problem.name}: every client was flagged; returning the local updates unrefined "
                      "(lower lam or raise threshold if this is unexpected)", RuntimeWarning, stacklevel=4)
        local = problem.stack.clone() if problem.stack is not None else None
        rf = None if local is not None else refine_factors(problem.pairs, U, benign, "paper", name=problem.name,
                                                           transposed=cfg.side == "row")
        if local is not None and cfg.side == "row":
            local = local.transpose(1, 2).contiguous()
        return local, rf, torch.full((K, 2), float("nan"), dtype=torch.float64)
    mode = cfg.refine
    if mode == "project":
        W = torch.tensor([[1.0, 0.0]] * K, dtype=torch.float64)
        mean_w = torch.zeros(K, dtype=torch.float64)
    elif mode in ("paper", "average"):
        W = family_weights("paper", K)
        mean_w = benign.double().cpu() / float(benign.sum())
    else:
        mean_w = robust_mean_weights(problem.norms, benign, cfg.clip)
        if mode == "fixed":
            W = family_weights("fixed", K, cfg.weights)
        else:
            items = problem.pairs if problem.factored else list(problem.stack)
            G, G_in = gram(items, U)
            d_eff, p_eff = effective_sizes(problem.solver_blocks, benign)
            W = torch.tensor([shrinkage_weights(G, G_in, benign, mean_w, fit.rank, d_eff, p_eff)] * K,
                             dtype=torch.float64)
    W = torch.where(benign.cpu().view(K, 1), W, torch.full_like(W, float("nan")))
    if problem.factored:
        rf = refine_factors(problem.pairs, U, benign, "project" if mode == "project" else "family",
                            weights=torch.nan_to_num(W, nan=1.0), mean_weights=mean_w, transposed=cfg.side == "row",
                            name=problem.name)
        return (rf.dense() if return_dense else None), rf, W
    M = problem.stack
    if mode == "project":
        dense = refine_updates(M, U, benign, "project")
    else:
        mean = torch.einsum("k,kdp->dp", mean_w.to(M), M)
        dense = apply_family(M, U, benign, torch.nan_to_num(W, nan=1.0).to(M), mean)
    if cfg.side == "row":
        dense = dense.transpose(1, 2).contiguous()
    return dense, None, W


def _result(fit: ModuleFit, cfg: ClairConfig, scores: torch.Tensor, flags: torch.Tensor, *,
            problem: Problem | None = None, return_dense: bool = False, keep: bool = True,
            detection: DetectionReport | None = None) -> ClairResult:
    """Assemble a :class:`ClairResult`; refined with the given flags when ``problem`` is given."""
    benign = ~flags
    refined_updates = refined_factors = weights = None
    if problem is not None:
        refined_updates, refined_factors, weights = _refine(problem, fit, cfg, benign, return_dense)
    return ClairResult(subspace=fit.subspace, rank=fit.rank, singular_values=fit.singular_values, scores=scores,
                       flags=flags, benign=benign, lam=fit.lam, mu=fit.mu, config=cfg, sparse_energy=fit.sparse_sq,
                       total_energy=fit.total_sq, objective=fit.objective, iterations=fit.iterations,
                       converged=fit.converged, shape=fit.shape, decomposition=fit.decomposition if keep else None,
                       reduction=problem.reduction if keep and problem is not None else None,
                       refined_updates=refined_updates, refined_factors=refined_factors, refine_weights=weights,
                       detection=detection, scale=fit.scale)


def _decide(fits: list[ModuleFit], cfg: ClairConfig,
            blocks: Callable[[], Iterable[list[torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor, DetectionReport | None]:
    """Joint scores (energies pooled over modules) and flags: the paper's fixed threshold or the auto rule."""
    sparse = sum(f.sparse_sq.double().cpu() for f in fits)
    total = sum(f.total_sq.double().cpu() for f in fits)
    if cfg.threshold != "auto":
        scores, flags = scores_and_flags(sparse, total, cfg.threshold)
        return scores, flags, None
    scores, _ = scores_and_flags(sparse, total, 0.5)
    K = int(scores.numel())
    n_core = K - K // 2
    room = min(min(f.block_rows, sum(sorted(f.block_widths)[: n_core - 1])) for f in fits)
    floor = 1e-3 if fits[0].subspace.dtype == torch.float32 else 1e-6
    report = auto_flags(blocks, scores, room=room, guard=cfg.guard, floor=floor)
    return scores, report.flags, report


def clair(updates: Any, config: ClairConfig | None = None, *, scaling: Any = None, return_dense: bool = False,
          progress: bool = False, **options: Any) -> ClairResult:
    """Run CLAIR on K client updates of one module, dense or as LoRA factors.

    Args:
        updates: K dense matrices of equal shape (d, p) — torch tensors (CPU or CUDA) or
            numpy arrays, float32/float64 — or a (K, d, p) tensor; OR K LoRA pairs
            (B_k (d x r_k), A_k (r_k x p)) (ranks may differ; objects with ``.B``/``.A``/
            ``.scaling`` such as :class:`fedlora_lite.lora.LoraFactors` too), which take the
            exact factored path: one thin QR plus a problem of size q x sum r_k, the same
            answer as on the dense products. K >= 3.
        config: a :class:`~fedlora_lite.clair.config.ClairConfig` (default: ``ClairConfig()``).
        scaling: LoRA scaling alpha/r per client (float or K floats) multiplied into B_k;
            factor input only.
        return_dense: factor input: also return the dense (K, d, p) refined updates.
        progress: tqdm bar over solver iterations.
        **options: any :class:`~fedlora_lite.clair.config.ClairConfig` field (rank, lam,
            mu, side, threshold, refine, max_rank, max_iter, tol, svd_rank_hint),
            overriding ``config``.

    Returns:
        A :class:`~fedlora_lite.clair.results.ClairResult` (tensors on the input's device,
        in its dtype).
    """
    return _clair(updates, ClairConfig.resolve(config, options), "auto", scaling, return_dense, progress)


def _clair(updates: Any, cfg: ClairConfig, kind: str, scaling: Any, return_dense: bool, progress: bool) -> ClairResult:
    factored = is_factor_input(updates) if kind == "auto" else kind == "factors"
    problem = _problem(updates, "factors" if factored else "updates", cfg, scaling, "factors" if factored else "dense")
    fit = fit_problem(problem, cfg, progress=progress)
    scores, flags, report = _decide([fit], cfg, lambda: [problem.solver_blocks])
    return _result(fit, cfg, scores, flags, problem=problem, return_dense=return_dense, detection=report)


def clair_factored(factors: Any, config: ClairConfig | None = None, *, scaling: Any = None, return_dense: bool = False,
                   progress: bool = False, **options: Any) -> ClairResult:
    """:func:`clair` with ``factors`` always read as LoRA pairs (``clair`` itself dispatches by input type)."""
    return _clair(factors, ClairConfig.resolve(config, options), "factors", scaling, return_dense, progress)


def clair_modules(updates_by_module: Mapping[str, Any] | Source, config: ClairConfig | None = None, *,
                  scaling: Any = None, progress: bool = False, **options: Any) -> MultiModuleClairResult:
    """CLAIR on every adapted module of a model with one contamination decision per client.

    Each module is decomposed on its own (its own lam default, subspace and rank). The
    joint score pools the block energies over modules,
    ``sqrt(sum_m ||S_k^m||^2 / sum_m ||M_k^m||^2)``, i.e. the fraction of client k's whole
    update that no module's shared subspace explains: pooling energies (rather than
    averaging per-module scores) weights a module by how much of the update it carries, so
    a near-empty module cannot veto a decision. All modules are then refined with the same
    collaborative set.

    Args:
        updates_by_module: module name -> K client updates of that module (dense or LoRA
            pairs, as in :func:`clair`; each module's d_m x p_m may differ, K must agree);
            or a zero-argument callable returning a fresh iterable of (name, updates) each
            time it is called (e.g. a generator function loading one module at a time from
            disk). A callable is streamed: the first pass keeps only small per-module state,
            refinement re-reads it (:meth:`MultiModuleClairResult.iter_refined`), so peak
            memory is one module's data however many modules the model has.
        config, scaling, **options: as in :func:`clair`, applied to every module.
        progress: tqdm bar over modules.

    Returns:
        A :class:`~fedlora_lite.clair.results.MultiModuleClairResult`.
    """
    cfg = ClairConfig.resolve(config, options)
    if isinstance(updates_by_module, Mapping):
        if len(updates_by_module) == 0:
            raise ValueError("updates_by_module must be a non-empty mapping of module name -> client updates")
        mapping = updates_by_module
        source: Source = lambda: mapping.items()  # noqa: E731
        streamed = False
    elif callable(updates_by_module):
        source, streamed = updates_by_module, True
    else:
        raise TypeError("updates_by_module must be a mapping name -> updates or a callable returning (name, updates) "
                        f"pairs, got {type(updates_by_module).__name__}")
    items: Iterable[tuple[str, Any]] = source()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="CLAIR modules", total=len(updates_by_module) if not streamed else None)
    fits: dict[str, ModuleFit] = {}
    problems: dict[str, Problem] = {}
    K = None
    for name, ups in items:
        if name in fits:
            raise ValueError(f"module {name!r} appears twice")
        problem = _problem(ups, f"updates_by_module[{name!r}]", cfg, scaling, "auto")
        if K is not None and problem.num_clients != K:
            raise ValueError(f"updates_by_module[{name!r}] has {problem.num_clients} clients, expected {K}")
        K = problem.num_clients
        fit = fit_problem(problem, cfg)
        if streamed:
            fit.decomposition = None  # keep only the small state of a streamed module
        else:
            problems[name] = problem
        fits[name] = fit
        del problem, fit
    if not fits:
        raise ValueError("updates_by_module yielded no module")

    def reread(check: bool = True) -> Iterator[tuple[str, Problem]]:
        for name, ups in source():
            if name not in fits:
                raise ValueError(f"module {name!r} was not seen in the first pass")
            problem = _problem(ups, f"updates_by_module[{name!r}]", cfg, scaling, "auto")
            problem.normalise(cfg.clip)
            ref = fits[name].norms
            if check and (len(problem.norms) != len(ref) or not torch.allclose(problem.norms, ref, rtol=1e-3,
                                                                              atol=1e-300 + 1e-6 * float(ref.max()))):
                raise ValueError(f"updates_by_module[{name!r}]: the data differ from the first pass (a source must "
                                 "replay the same data)")
            yield name, problem

    def solver_blocks() -> Iterator[list[torch.Tensor]]:
        if not streamed:
            return (p.solver_blocks for p in problems.values())
        return (p.solver_blocks for _, p in reread())

    scores, flags, report = _decide(list(fits.values()), cfg, solver_blocks)

    def module_result(name: str, problem: Problem | None, *, keep: bool) -> ClairResult:
        fit = fits[name]
        m_scores, _ = scores_and_flags(fit.sparse_sq, fit.total_sq, 0.5)
        return _result(fit, cfg, m_scores, flags.to(fit.subspace.device), problem=problem, keep=keep,
                       detection=report)

    if not streamed:
        per_module = {n: module_result(n, p, keep=True) for n, p in problems.items()}
        return MultiModuleClairResult(per_module=per_module, scores=scores, flags=flags, benign=~flags, config=cfg,
                                      detection=report)

    def replay(only: str | None = None) -> Iterator[tuple[str, ClairResult]]:
        for name, problem in reread():
            if only is None or name == only:
                yield name, module_result(name, problem, keep=False)

    # first-pass summaries: no decomposition and no refinement kept
    per_module = {n: module_result(n, None, keep=False) for n in fits}
    return MultiModuleClairResult(per_module=per_module, scores=scores, flags=flags, benign=~flags, config=cfg,
                                  detection=report, _refresh=replay)


clair_factored_modules = clair_modules
"""Alias of :func:`clair_modules` (which dispatches LoRA factors to the factored path itself)."""
