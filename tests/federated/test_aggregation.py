"""Tests for fedlora_lite.federated.aggregators: every aggregator on small instances with known answers."""

import numpy as np
import pytest
import torch

from fedlora_lite.federated import (
    AGGREGATORS,
    AggregationResult,
    aggregate,
    available_aggregators,
    krum_scores,
    make_update_federation,
)


def _cluster(K=7, d=4, p=3, seed=0, spread=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.ones(d, p, dtype=dtype) + spread * torch.randn(K, d, p, generator=g, dtype=dtype)


def _with_outliers(num_out=2, K=9, magnitude=100.0):
    M = _cluster(K=K)
    M[:num_out] = magnitude * (1 + torch.arange(num_out, dtype=M.dtype))[:, None, None]
    benign = torch.ones(K, dtype=torch.bool)
    benign[:num_out] = False
    return M, benign


def test_registry_lists_every_method():
    assert available_aggregators() == list(AGGREGATORS)
    assert set(available_aggregators()) == {
        "local", "fedavg", "oracle_fedavg", "median", "trimmed_mean", "geometric_median", "krum", "multi_krum", "clair",
        "bulyan", "centered_clipping", "clipped_mean", "adaptive_clipped_mean", "mda",
    }


REQUIRED_OPTIONS = {"clipped_mean": {"clip_norm": 1.0}}


@pytest.mark.parametrize("method", [m for m in AGGREGATORS if m != "clair"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_method_returns_per_client_estimates(method, dtype):
    M, benign = _with_outliers()
    M = M.to(dtype)
    res = aggregate(method, M, benign=benign, **REQUIRED_OPTIONS.get(method, {}))
    assert isinstance(res, AggregationResult) and res.method == method
    assert res.estimates.shape == M.shape and res.estimates.dtype == dtype
    assert torch.isfinite(res.estimates).all()
    if res.flags is not None:
        assert res.flags.dtype == torch.bool and res.flags.shape == (M.shape[0],)


def test_local_returns_a_copy():
    M = _cluster()
    res = aggregate("local", M)
    assert torch.equal(res.estimates, M) and res.estimates.data_ptr() != M.data_ptr()


def test_fedavg_is_the_mean_and_supports_weights():
    M = _cluster()
    res = aggregate("fedavg", M)
    torch.testing.assert_close(res.estimates, M.mean(0).expand_as(M))
    w = np.arange(1, 8, dtype=float)
    res_w = aggregate("fedavg", M, weights=w)
    expected = (torch.tensor(w)[:, None, None] * M).sum(0) / w.sum()
    torch.testing.assert_close(res_w.estimates[3], expected)
    with pytest.raises(ValueError, match="weights"):
        aggregate("fedavg", M, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        aggregate("fedavg", M, weights=[-1.0] + [1.0] * 6)


def test_oracle_fedavg_uses_the_true_mask():
    M, benign = _with_outliers()
    res = aggregate("oracle_fedavg", M, benign=benign)
    torch.testing.assert_close(res.estimates[0], M[benign].mean(0))
    assert res.flags is None
    with pytest.raises(ValueError, match="benign"):
        aggregate("oracle_fedavg", M)
    with pytest.raises(ValueError, match="benign"):
        aggregate("oracle_fedavg", M, benign=torch.zeros(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="benign"):
        aggregate("oracle_fedavg", M, benign=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="benign"):
        aggregate("oracle_fedavg", M, benign=torch.ones(9))  # not bool


def test_median_is_robust_to_one_huge_outlier():
    M = _cluster(K=7)
    M[0] = 1e6
    med = aggregate("median", M).estimates[0]
    avg = aggregate("fedavg", M).estimates[0]
    lo, hi = M[1:].min(0).values, M[1:].max(0).values
    assert bool(((med >= lo) & (med <= hi)).all())
    assert float((avg - 1).abs().min()) > 1e4


def test_median_even_count_averages_the_middle_pair():
    M = torch.tensor([1.0, 2.0, 4.0, 10.0]).reshape(4, 1, 1)
    assert float(aggregate("median", M).estimates[0, 0, 0]) == 3.0


def test_trimmed_mean_hand_case_and_validation():
    M = torch.tensor([-100.0, 1.0, 2.0, 3.0, 100.0]).reshape(5, 1, 1)
    res = aggregate("trimmed_mean", M, trim=0.2)
    assert float(res.estimates[0, 0, 0]) == 2.0 and res.info["trimmed_each_side"] == 1
    assert float(aggregate("trimmed_mean", M, trim=0.0).estimates[0, 0, 0]) == float(M.mean())
    assert float(aggregate("trimmed_mean", M).estimates[0, 0, 0]) == float(M.mean())  # floor(0.1*5) = 0
    for bad in (0.5, -0.1, 1.0):
        with pytest.raises(ValueError, match="trim"):
            aggregate("trimmed_mean", M, trim=bad)


def _gm_objective(X, z):
    return float((X - z).norm(dim=1).sum())


def test_geometric_median_matches_a_brute_force_search():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(6, 1, 2, generator=g, dtype=torch.float64)
    M[0] = torch.tensor([[8.0, -5.0]])
    res = aggregate("geometric_median", M)
    z = res.estimates[0].reshape(-1)
    X = M.reshape(6, -1)
    grid = torch.linspace(-3, 3, 601, dtype=torch.float64)
    pts = torch.cartesian_prod(grid, grid)
    objs = (X[None] - pts[:, None]).norm(dim=2).sum(1)
    best = float(objs.min())
    assert res.info["converged"]
    assert _gm_objective(X, z) <= best + 1e-9
    assert float((pts[objs.argmin()] - z).norm()) < 0.02  # grid spacing 0.01


def test_geometric_median_of_collinear_points_is_the_middle_one():
    M = torch.tensor([0.0, 1.0, 2.0, 50.0, 60.0]).reshape(5, 1, 1)
    z = aggregate("geometric_median", M, tol=1e-12).estimates[0, 0, 0]
    assert abs(float(z) - 2.0) < 1e-6


def test_geometric_median_option_validation():
    M = _cluster()
    for opts in ({"eps": 0.0}, {"tol": -1.0}, {"max_iter": 0}):
        (name,) = opts
        with pytest.raises(ValueError, match=f"{name} must be"):
            aggregate("geometric_median", M, **opts)


def test_krum_picks_a_benign_client_and_flags_the_outliers():
    M, benign = _with_outliers(num_out=2, K=9)
    res = aggregate("krum", M, f=2)
    assert benign[res.info["selected"]]
    assert torch.equal(res.estimates[0], M[res.info["selected"]])
    assert torch.equal(res.flags, ~benign)  # the f = 2 worst scores are the outliers
    default = aggregate("krum", M)
    assert default.info["f"] == 3 and int(default.flags.sum()) == 3 and default.flags[~benign].all()


def test_krum_score_definition():
    M = torch.tensor([0.0, 1.0, 3.0, 10.0, 11.0]).reshape(5, 1, 1)
    # f = 1: each client sums squared distances to its K - f - 2 = 2 nearest others
    expected = torch.tensor([1 + 9, 1 + 4, 4 + 9, 1 + 49, 1 + 64], dtype=torch.float32)
    torch.testing.assert_close(krum_scores(M, 1), expected)


def test_multi_krum_averages_the_selected_clients():
    M, benign = _with_outliers(num_out=2, K=9)
    res = aggregate("multi_krum", M, f=2)
    assert res.info["m"] == 7 and torch.equal(res.flags, ~benign)
    torch.testing.assert_close(res.estimates[0], M[benign].mean(0))
    res3 = aggregate("multi_krum", M, f=2, m=3)
    assert int((~res3.flags).sum()) == 3 and not res3.flags[benign].all()
    with pytest.raises(ValueError, match="m must"):
        aggregate("multi_krum", M, m=0)


@pytest.mark.parametrize("f", [3, 4, -1])
def test_krum_validates_f(f):
    M = _cluster(K=7)  # K > 2f + 2 allows f <= 2
    with pytest.raises(ValueError, match="f"):
        aggregate("krum", M, f=f)


def test_robust_baselines_beat_fedavg_under_outliers():
    M, benign = _with_outliers(num_out=2, K=9)
    target = M[benign].mean(0)
    fedavg_err = float((aggregate("fedavg", M).estimates[0] - target).norm())
    for method in ("median", "trimmed_mean", "geometric_median", "krum", "multi_krum"):
        opts = {"trim": 0.25} if method == "trimmed_mean" else {}
        err = float((aggregate(method, M, **opts).estimates[0] - target).norm())
        assert err < 0.05 * fedavg_err, method


def test_clair_entry_matches_the_clair_function():
    from fedlora_lite.clair import clair

    fed = make_update_federation(12, 20, 4, 2, 0.25, "random", seed=0)
    res = aggregate("clair", fed.theta, benign=fed.benign)
    direct = clair(fed.theta)
    assert torch.equal(res.flags, ~fed.benign)
    torch.testing.assert_close(res.estimates, direct.refined_updates)
    assert res.info["result"].rank == 2 and res.info["rank"] == 2
    torch.testing.assert_close(res.estimates[fed.benign], fed.theta[fed.benign], atol=1e-6, rtol=0)
    projected = aggregate("clair", fed.theta, refine="project")
    assert projected.info["result"].refine == "project"


def test_inputs_numpy_and_lists_are_accepted():
    M = _cluster()
    a = aggregate("median", M.numpy())
    b = aggregate("median", list(M))
    torch.testing.assert_close(a.estimates, b.estimates)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="fedavg"):
        aggregate("fedmedian", _cluster())


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="trimm"):
        aggregate("median", _cluster(), trimm=0.1)
    with pytest.raises(TypeError, match="no options"):
        aggregate("local", _cluster(), f=1)


@pytest.mark.parametrize("method", ["fedavg", "median", "krum"])
def test_bad_updates_are_rejected(method):
    M = _cluster()
    bad = M.clone()
    bad[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        aggregate(method, bad)
    with pytest.raises(ValueError, match="at least 3"):
        aggregate(method, M[:2])
    with pytest.raises(ValueError, match="shape"):
        aggregate(method, [M[0], M[1], M[2, :, :2]])
    with pytest.raises(ValueError, match="shape"):
        aggregate(method, M[0])


def test_all_methods_agree_on_identical_updates():
    M = torch.ones(5, 3, 2, dtype=torch.float64).mul(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    benign = torch.ones(5, dtype=torch.bool)
    for method in [m for m in AGGREGATORS if m != "clair"]:
        opts = {"clip_norm": 10.0} if method == "clipped_mean" else {}  # above every norm: nothing clipped
        torch.testing.assert_close(aggregate(method, M, benign=benign, **opts).estimates, M)
