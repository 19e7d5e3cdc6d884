"""CLAIR under extreme scales and norm attacks: equivariance, finiteness, bounded influence."""

from __future__ import annotations

import pytest
import torch

from fedlora_lite import clair
from fedlora_lite.federated import fit_local, make_regression_federation, random_lora_factors, relative_errors


def _federation(seed=0, contamination=0.2, dtype=torch.float64):
    fed = make_regression_federation(20, 30, 8, 3, contamination, "random", samples=200, noise=0.5, seed=seed)
    return fed, fit_local(fed).to(dtype)


@pytest.mark.parametrize(("dtype", "scales"), [
    (torch.float32, [1e-10, 1e-5, 1e-2, 1.0, 1e3, 1e10]),
    (torch.float64, [1e-100, 1e-30, 1e-4, 1.0, 1e30, 1e100]),
])
def test_flags_and_iterations_do_not_depend_on_the_units(dtype, scales):
    fed, est = _federation(seed=1, dtype=dtype)
    runs = [clair(est * s) for s in scales]
    ref = runs[scales.index(1.0)]
    for s, r in zip(scales, runs):
        assert torch.equal(r.flags, ref.flags), f"flags changed at scale {s}"
        assert r.rank == ref.rank and abs(r.iterations - ref.iterations) <= 1
        assert torch.allclose(r.refined_updates / s, ref.refined_updates, rtol=1e-3 if dtype == torch.float32 else 1e-9,
                              atol=1e-6 * float(ref.refined_updates.abs().max()))
    assert torch.equal(ref.flags, ~fed.benign)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_client_at_1e30_is_flagged_and_everything_stays_finite(dtype):
    fed, est = _federation(seed=2, dtype=dtype)
    bad = int(torch.nonzero(~fed.benign)[0])
    est = est.clone()
    est[bad] *= 1e30
    res = clair(est)
    assert bool(res.flags[bad]) and torch.equal(res.flags, ~fed.benign)
    assert bool(torch.isfinite(res.scores).all()) and bool(torch.isfinite(res.refined_updates[fed.benign]).all())
    assert torch.isfinite(torch.tensor(res.objective)) and res.rank >= 1


def test_one_client_at_1e30_factored_path_agrees():
    inst = random_lora_factors(64, 48, 12, 4, shared_rank=3, contamination=0.25, heterogeneity=0.05,
                               generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bad = int(torch.nonzero(~inst.benign)[0])
    factors = [(B * (1e30 if k == bad else 1.0), A) for k, (B, A) in enumerate(inst.factors)]
    fac = clair(factors)
    dense = clair(torch.stack([B @ A for B, A in factors]))
    assert torch.equal(fac.flags, dense.flags) and bool(fac.flags[bad])
    assert torch.equal(fac.flags, ~inst.benign)


def test_scaling_ones_own_update_buys_no_influence():
    """20% of clients send 100x their own honest update: benign error grows by at most 1.5x."""
    ratios = []
    for seed in range(3):
        fed = make_regression_federation(20, 30, 8, 3, 0.0, "random", samples=200, noise=0.5, seed=10 + seed)
        est = fit_local(fed)
        clean = clair(est)
        err0 = float(relative_errors(clean.refined_updates, fed.theta)[4:].mean())
        attacked = est.clone()
        attacked[:4] *= 100.0
        res = clair(attacked)
        err1 = float(relative_errors(res.refined_updates, fed.theta)[4:].mean())
        ratios.append(err1 / err0)
    assert max(ratios) <= 1.5, ratios


def test_non_finite_inputs_are_rejected_with_the_argument_name():
    _, est = _federation(seed=4)
    est = est.clone()
    est[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="updates"):
        clair(est)
