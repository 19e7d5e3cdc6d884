"""Independent reference implementations for the cross-checks: Flower's aggregation functions and ByzFL.

ByzFL's top-level ``import byzfl`` pulls its federated framework, which imports a
torchvision that does not match the CPU torch here; :func:`byzfl_modules` registers a bare
parent package so ``byzfl.aggregators`` and ``byzfl.attacks`` import on their own.

``python -m tests.federated.reference_impls`` prints the cross-check table (our value vs the
reference's on the same seeded inputs).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import torch


def byzfl_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(byzfl.aggregators, byzfl.attacks) without running byzfl/__init__.py."""
    if "byzfl" not in sys.modules:
        spec = importlib.util.find_spec("byzfl")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("byzfl is not installed: pip install -e '.[test]'")
        stub = types.ModuleType("byzfl")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = stub
    return importlib.import_module("byzfl.aggregators"), importlib.import_module("byzfl.attacks")


def flower_aggregate() -> types.ModuleType:
    """flwr.server.strategy.aggregate (the pure functions behind Flower's strategies)."""
    return importlib.import_module("flwr.server.strategy.aggregate")


def seeded_updates(K: int = 11, d: int = 5, p: int = 4, seed: int = 0, outliers: int = 2) -> torch.Tensor:
    """(K, d, p) float64 updates: a cluster plus ``outliers`` far, distinct clients."""
    g = torch.Generator().manual_seed(seed)
    M = 1.0 + 0.3 * torch.randn(K, d, p, generator=g, dtype=torch.float64)
    for j in range(outliers):
        M[j] = -5.0 * (j + 1) + torch.randn(d, p, generator=g, dtype=torch.float64)
    return M


def to_flower(M: torch.Tensor, examples=None) -> list:
    """Flower's ``results``: [([layer], num_examples)] with one layer per client."""
    examples = [1] * M.shape[0] if examples is None else examples
    return [([M[k].numpy().copy()], int(n)) for k, n in enumerate(examples)]


def cross_check_table() -> list[tuple[str, float, float, float]]:
    """(check, our first coordinate, reference's first coordinate, max |difference|) for every cross-check."""
    from fedlora_lite.federated import aggregate, attack, nnm

    fa = flower_aggregate()
    bagg, batt = byzfl_modules()
    M = seeded_updates()
    X = M.reshape(M.shape[0], -1).numpy()
    K = M.shape[0]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    rows = []

    def add(label, ours, ref):
        ours = np.asarray(ours, dtype=np.float64).reshape(-1)
        ref = np.asarray(ref, dtype=np.float64).reshape(-1)
        rows.append((label, float(ours[0]), float(ref[0]), float(np.abs(ours - ref).max())))

    add("median vs flwr aggregate_median", aggregate("median", M).estimates[0], fa.aggregate_median(to_flower(M))[0])
    add("trimmed_mean(0.2) vs flwr aggregate_trimmed_avg", aggregate("trimmed_mean", M, trim=0.2).estimates[0],
        fa.aggregate_trimmed_avg(to_flower(M), 0.2)[0])
    add("krum(f=2) vs flwr aggregate_krum", aggregate("krum", M, f=2).estimates[0],
        fa.aggregate_krum(to_flower(M), num_malicious=2, to_keep=0)[0])
    add("multi_krum(f=2,m=5) vs flwr aggregate_krum(to_keep=5)", aggregate("multi_krum", M, f=2, m=5).estimates[0],
        fa.aggregate_krum(to_flower(M), num_malicious=2, to_keep=5)[0])
    add("bulyan(f=2) vs flwr aggregate_bulyan", aggregate("bulyan", M, f=2).estimates[0],
        fa.aggregate_bulyan(to_flower(M), num_malicious=2, aggregation_rule=fa.aggregate_krum, to_keep=0)[0])
    add("centered_clipping(0, tau=1.5, L=3) vs byzfl CenteredClipping",
        aggregate("centered_clipping", M, center=torch.zeros(M.shape[1:], dtype=M.dtype), tau=1.5, iterations=3).estimates[0],
        bagg.CenteredClipping(L=3, tau=1.5)(X.copy()))
    add("nnm(f=3) vs byzfl NNM", nnm(M, f=3).reshape(K, -1), bagg.NNM(f=3)(X.copy()))
    add("mda(f=3) vs byzfl MDA", aggregate("mda", M, f=3).estimates[0], bagg.MDA(f=3)(X.copy()))
    add("alie(z=1.5) vs byzfl ALittleIsEnough", attack("alie", M, 1, z=1.5)[0], batt.ALittleIsEnough(tau=1.5)(X.copy()))
    add("ipm(eps=2) vs byzfl InnerProductManipulation", attack("ipm", M, 1, epsilon=2.0)[0],
        batt.InnerProductManipulation(tau=2.0)(X.copy()))
    add("sign_flip vs byzfl SignFlipping", attack("sign_flip", M, 1, generator=g())[0], batt.SignFlipping()(X.copy()))
    return rows


if __name__ == "__main__":
    print(f"{'check':<58} {'ours[0]':>14} {'reference[0]':>14} {'max |diff|':>11}")
    for label, a, b, diff in cross_check_table():
        print(f"{label:<58} {a:>14.8f} {b:>14.8f} {diff:>11.2e}")
