"""Tests of CLAIR: exact recovery (the foundation bar), rank choice, flagging, refinement,
row side, multi-module joint decisions and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora_lite.clair import choose_rank, clair, clair_modules, refine_updates
from fedlora_lite.federated import (
    fit_local,
    make_regression_federation,
    make_update_federation,
    sin_theta,
)


@pytest.mark.parametrize("kind", ["random", "subspace", "sign_flip"])
@pytest.mark.parametrize("contamination", [0.1, 0.2, 0.3, 0.4])
def test_noiseless_exact_recovery(kind, contamination):
    """Bar: K=20, d=30, p=8, r0=3 in float64 from noiseless OLS preliminary estimates:
    sin(theta) <= 1e-5 and the flagged set equals the contaminated set."""
    fed = make_regression_federation(20, 30, 8, 3, contamination, kind, samples=60, noise=0.0, seed=11)
    estimates = fit_local(fed)
    res = clair(estimates)
    assert res.rank == 3
    assert sin_theta(res.subspace, fed.U) <= 1e-5
    assert torch.equal(res.flags, ~fed.benign)
    # exact refinement: the benign clients' refined updates are their true parameters
    err = torch.linalg.matrix_norm(res.refined_updates[fed.benign] - fed.theta[fed.benign]).max()
    assert err <= 1e-6 * torch.linalg.matrix_norm(fed.theta).max()


def test_choose_rank():
    s = torch.tensor([10.0, 8.0, 5.0, 1e-14, 1e-15], dtype=torch.float64)
    assert choose_rank(s) == 3
    noisy = torch.tensor([9.0, 7.0, 0.3, 0.25, 0.2], dtype=torch.float64)
    assert choose_rank(noisy) == 2
    assert choose_rank(noisy, max_rank=1) == 1
    assert choose_rank(torch.zeros(4)) == 0
    assert choose_rank(torch.ones(4)) == 3  # flat: no gap, keep up to max


def test_refine_updates_formula():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 6, 2, generator=g, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))
    benign = torch.tensor([True, True, False, True, False])
    P = U @ U.T
    mean = M[benign].mean(0)
    out = refine_updates(M, U, benign, "average")
    for k in range(5):
        expected = P @ M[k] + (torch.eye(6, dtype=torch.float64) - P) @ mean if benign[k] else M[k]
        assert torch.allclose(out[k], expected)
    proj = refine_updates(M, U, benign, "project")
    assert torch.allclose(proj[0], P @ M[0]) and torch.equal(proj[2], M[2])
    with pytest.raises(ValueError, match="benign selects no client"):
        refine_updates(M, U, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="subspace must be"):
        refine_updates(M, U[:5], benign)


def test_refinement_beats_local_and_fedavg_on_noisy_regression():
    """Refinement gain: with noisy OLS estimates and contamination, CLAIR's benign-client
    error is below Local's (noise off the subspace averages out) and FedAvg's (which the
    contaminated clients and client-specific V_k ruin)."""
    fed = make_regression_federation(20, 30, 8, 3, 0.3, "random", samples=100, noise=0.5, seed=3)
    est = fit_local(fed)
    res = clair(est, rank=3)
    b = fed.benign

    def err(x):
        return float((torch.linalg.matrix_norm(x[b] - fed.theta[b]) / torch.linalg.matrix_norm(fed.theta[b])).mean())

    fedavg = est.mean(0, keepdim=True).expand_as(est)
    assert torch.equal(res.flags, ~b)
    assert err(res.refined_updates) < 0.6 * err(est)
    assert err(res.refined_updates) < 0.5 * err(fedavg)


def test_row_side_is_the_transpose():
    fed = make_update_federation(12, 15, 6, 2, 0.25, "random", seed=2)
    col = clair(fed.theta)
    row = clair(fed.theta.transpose(1, 2), side="row")
    assert torch.equal(col.flags, row.flags)
    assert sin_theta(row.subspace, col.subspace) < 1e-8
    assert torch.allclose(row.refined_updates, col.refined_updates.transpose(1, 2), atol=1e-9)


def test_inputs_numpy_float32_and_project_mode():
    fed = make_update_federation(12, 15, 6, 2, 0.25, "subspace", seed=4)
    res = clair(fed.theta.numpy().astype(np.float32), refine="project")
    assert res.refined_updates.dtype == torch.float32
    assert torch.equal(res.flags, ~fed.benign)
    assert sin_theta(res.subspace.double(), fed.U) < 1e-4
    assert res.flagged_clients == torch.nonzero(~fed.benign).flatten().tolist()


def test_clean_federation_flags_nobody():
    fed = make_update_federation(12, 20, 4, 2, 0.0, "random", seed=6)
    res = clair(fed.theta)
    assert not res.flags.any()
    assert res.rank == 2


def test_all_flagged_warns_and_returns_local():
    fed = make_update_federation(8, 10, 3, 2, 0.25, "random", seed=1)
    with pytest.warns(RuntimeWarning):  # the paper's fixed threshold: with L = 0 every score is 1
        res = clair(fed.theta, lam=1e-3, threshold=0.5)
    assert res.flags.all()
    assert torch.equal(res.refined_updates, fed.theta)


def test_clair_modules_joint_decision():
    a = make_update_federation(12, 16, 4, 2, 0.25, "random", seed=7)
    # second module: its own shared subspace, the same clients contaminated, less energy
    g = torch.Generator().manual_seed(1)
    U2, _ = torch.linalg.qr(torch.randn(10, 2, generator=g, dtype=torch.float64))
    mlp = U2 @ torch.randn(12, 2, 5, generator=g, dtype=torch.float64)
    mlp[~a.benign] = torch.randn(int((~a.benign).sum()), 10, 5, generator=g, dtype=torch.float64)
    b = type("Module", (), {"theta": mlp})
    res = clair_modules({"attn": a.theta, "mlp": 0.1 * b.theta})
    assert torch.equal(res.flags, ~a.benign)
    assert set(res.refined_updates()) == {"attn", "mlp"}
    assert res.per_module["mlp"].refined_updates.shape == b.theta.shape
    assert torch.equal(res.per_module["mlp"].flags, res.flags)
    # a module where the decomposition alone would be confused cannot veto the joint call
    noise = 0.01 * torch.randn(12, 10, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res2 = clair_modules({"attn": a.theta, "tiny": noise})
    assert torch.equal(res2.flags, ~a.benign)
    with pytest.raises(ValueError, match="has 11 clients"):
        clair_modules({"attn": a.theta, "mlp": b.theta[:11]})
    with pytest.raises(ValueError, match="non-empty mapping"):
        clair_modules({})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank must be"),
        ({"rank": 31}, ValueError, r"rank must be 'auto' or an int in \[1, 30\]"),
        ({"rank": "best"}, ValueError, "rank must be"),
        ({"side": "diagonal"}, ValueError, "side must be one of"),
        ({"refine": "median"}, ValueError, "refine must be one of"),
        ({"threshold": 1.5}, ValueError, "threshold"),
        ({"threshold": 0}, ValueError, "threshold"),
        ({"max_rank": 0}, ValueError, "max_rank"),
        ({"lam": float("nan")}, ValueError, "lam must be"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    fed = make_update_federation(6, 30, 8, 2, 0.0, "random", seed=0)
    with pytest.raises(error, match=match):
        clair(fed.theta, **kwargs)


def test_bad_updates():
    with pytest.raises(ValueError, match="at least 3 clients"):
        clair([torch.eye(3)] * 2)
    bad = torch.ones(4, 3, 3)
    bad[2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"updates\[2\] contains NaN or Inf"):
        clair(bad)
    with pytest.raises(ValueError, match=r"updates\[1\] has shape"):
        clair([torch.eye(3), torch.eye(3)[:, :2], torch.eye(3)])
    with pytest.raises(TypeError, match="updates"):
        clair(42)


def test_mu_auto_estimates_the_noise_spectral_norm():
    """mu='auto' ~ sigma (sqrt(d) + sqrt(Kp)) with sigma the per-entry OLS error size."""
    fed = make_regression_federation(20, 30, 8, 3, 0.3, "random", samples=100, noise=0.5, seed=0)
    est = fit_local(fed)
    err = est[fed.benign] - fed.theta[fed.benign]
    sigma = float(err.pow(2).mean().sqrt())
    res = clair(est, mu="auto")
    expected = sigma * (30**0.5 + 160**0.5)
    assert res.mu == pytest.approx(expected, rel=0.15)  # in the updates' units (the solver saw them / res.scale)
    assert res.decomposition.mu == pytest.approx(res.mu / res.scale)
    assert torch.equal(res.flags, ~fed.benign) and res.rank == 3
    with pytest.raises(ValueError, match="mu must be"):
        clair(est, mu="guess")
