"""Clear errors for bad inputs to CLAIR's rules and refinement (issue 9's small gaps)."""

from __future__ import annotations

import pytest
import torch

from fedlora_lite import select_lambda
from fedlora_lite.clair.refine import refine_updates
from fedlora_lite.clair.rules import choose_rank
from fedlora_lite.federated import make_update_federation


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_choose_rank_rejects_non_finite_singular_values(bad):
    s = torch.tensor([10.0, bad, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="singular_values contains NaN or Inf"):
        choose_rank(s)


def test_refine_updates_requires_an_orthonormal_subspace():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 6, 2, generator=g, dtype=torch.float64)
    benign = torch.tensor([True, True, False, True])
    U, _ = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))
    refine_updates(M, U, benign)  # orthonormal: fine
    for bad in (2.0 * U, U + 0.01, torch.full((6, 2), float("nan"), dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"subspace must have orthonormal columns"):
            refine_updates(M, bad, benign)
    refine_updates(M, torch.zeros(6, 0, dtype=torch.float64), benign)  # r = 0 is allowed


@pytest.mark.parametrize("threshold", [5.0, 0.0, 1.0, -0.1, float("nan")])
def test_select_lambda_rejects_a_threshold_outside_0_1(threshold):
    fed = make_update_federation(8, 10, 4, 2, 0.25, seed=0)
    with pytest.raises(ValueError, match=r"threshold must (lie in|be finite)"):
        select_lambda(fed.theta, threshold=threshold)
