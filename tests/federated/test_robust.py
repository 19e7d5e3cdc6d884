"""Unit tests of the robust rules (fedlora_lite.federated.robust) and the nnm+<rule> composition."""

import math

import pytest
import torch

from fedlora_lite.federated import aggregate, available_aggregators, fit_local, make_regression_federation, nnm
from fedlora_lite.federated.robust import coordinate_median


def _cluster_with_outliers(K=11, out=2, seed=0, d=4, p=3):
    g = torch.Generator().manual_seed(seed)
    M = 1.0 + 0.1 * torch.randn(K, d, p, generator=g, dtype=torch.float64)
    M[:out] = 100.0 * (1 + torch.arange(out, dtype=M.dtype))[:, None, None]
    benign = torch.ones(K, dtype=torch.bool)
    benign[:out] = False
    return M, benign


ROBUST = ["bulyan", "centered_clipping", "adaptive_clipped_mean", "mda", "nnm+trimmed_mean", "nnm+median", "nnm+krum"]


@pytest.mark.parametrize("method", ROBUST)
def test_robust_rules_ignore_two_far_outliers(method):
    M, benign = _cluster_with_outliers()
    opts = {} if method in ("centered_clipping", "adaptive_clipped_mean") else {"f": 2}
    if method == "nnm+trimmed_mean":
        opts["trim"] = 0.2  # trim at least f / K per side: NNM leaves a mixed trace of each outlier
    est = aggregate(method, M, **opts).estimates[0]
    target = M[benign].mean(0)
    assert float((est - target).norm() / target.norm()) < 0.15, method
    assert float((M.mean(0) - target).norm() / target.norm()) > 5  # the plain mean is ruined


def test_bulyan_selects_by_iterated_krum_and_flags_the_rest():
    M, benign = _cluster_with_outliers(K=11, out=2)
    res = aggregate("bulyan", M, f=2)
    assert res.info["theta"] == 7 and res.info["beta"] == 3
    assert not set(res.info["selected"]) & {0, 1} and int((~res.flags).sum()) == 7
    with pytest.raises(ValueError, match="4f \\+ 3"):
        aggregate("bulyan", M, f=3)


def test_bulyan_with_f_zero_is_the_mean():
    M, _ = _cluster_with_outliers(out=0)
    torch.testing.assert_close(aggregate("bulyan", M, f=0).estimates[0], M.mean(0))


def test_centered_clipping_fixed_point_and_options():
    M, _ = _cluster_with_outliers(out=0)
    # tau larger than every distance: one step from any centre lands on the mean
    res = aggregate("centered_clipping", M, center=torch.zeros(4, 3, dtype=M.dtype), tau=1e6, iterations=1)
    torch.testing.assert_close(res.estimates[0], M.mean(0))
    # tau = 0: nothing moves from the centre
    c = torch.full((4, 3), 7.0, dtype=M.dtype)
    torch.testing.assert_close(aggregate("centered_clipping", M, center=c, tau=0.0).estimates[0], c)
    with pytest.raises(ValueError, match="center"):
        aggregate("centered_clipping", M, center=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="iterations"):
        aggregate("centered_clipping", M, iterations=0)


def test_static_clipping_caps_every_norm_and_needs_a_norm():
    M, benign = _cluster_with_outliers()
    res = aggregate("clipped_mean", M, clip_norm=1.0)
    expected = torch.stack([m * min(1.0, 1.0 / float(m.norm())) for m in M]).mean(0)
    torch.testing.assert_close(res.estimates[0], expected)
    assert res.flags.tolist() == [bool(float(m.norm()) > 1.0) for m in M]
    with pytest.raises(ValueError, match="clip_norm"):
        aggregate("clipped_mean", M)
    with pytest.raises(ValueError, match="clip_norm"):
        aggregate("clipped_mean", M, clip_norm=-1.0)


def test_adaptive_clipping_uses_the_norm_quantile_and_updates_it_geometrically():
    M, _ = _cluster_with_outliers()
    norms = M.reshape(11, -1).norm(dim=1)
    res = aggregate("adaptive_clipped_mean", M, quantile=0.5)
    assert res.info["clip_norm"] == pytest.approx(float(norms.median()))
    c = 1.0  # below every norm: b = 0, so c grows by exp(eta q)
    res = aggregate("adaptive_clipped_mean", M, clip_norm=c, quantile=0.5, learning_rate=0.2)
    assert res.info["next_clip_norm"] == pytest.approx(c * math.exp(0.2 * 0.5))
    with pytest.raises(ValueError, match="quantile"):
        aggregate("adaptive_clipped_mean", M, quantile=1.5)


def test_mda_picks_the_tightest_subset_and_bounds_its_work():
    M, benign = _cluster_with_outliers(K=8, out=3)
    res = aggregate("mda", M, f=3)
    assert sorted(res.info["selected"]) == [3, 4, 5, 6, 7]
    torch.testing.assert_close(res.estimates[0], M[3:].mean(0))
    assert res.flags.tolist() == [True] * 3 + [False] * 5
    with pytest.raises(ValueError, match="max_subsets"):
        aggregate("mda", M, f=3, max_subsets=10)
    with pytest.raises(ValueError, match="K > 2f"):
        aggregate("mda", M, f=4)


def test_nnm_mixes_with_nearest_neighbours_including_itself():
    M = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0], dtype=torch.float64).reshape(5, 1, 1)
    mixed = nnm(M, f=2).flatten()
    torch.testing.assert_close(mixed, torch.tensor([1.0, 1.0, 1.0, 23 / 3, 23 / 3], dtype=torch.float64))
    torch.testing.assert_close(nnm(M, f=0).flatten(), M.mean().expand(5))
    with pytest.raises(ValueError, match="K > 2f"):
        nnm(M, f=3)


def test_composition_by_name_passes_f_to_both_steps():
    M, _ = _cluster_with_outliers()
    composed = aggregate("nnm+trimmed_mean", M, f=2, trim=0.2)
    manual = aggregate("trimmed_mean", nnm(M, f=2), trim=0.2)
    torch.testing.assert_close(composed.estimates, manual.estimates)
    assert composed.method == "nnm+trimmed_mean"
    composed_krum = aggregate("nnm+krum", M, f=2)
    torch.testing.assert_close(composed_krum.estimates, aggregate("krum", nnm(M, f=2), f=2).estimates)
    assert "nnm+trimmed_mean" in available_aggregators(composed=True)
    assert "nnm+local" not in available_aggregators(composed=True)


@pytest.mark.parametrize("bad", ["nnm+nope", "nope+median", "nnm+local", "nnm+oracle_fedavg", "", 3])
def test_unknown_names_list_the_valid_choices(bad):
    M, _ = _cluster_with_outliers()
    with pytest.raises(ValueError, match="nnm\\+trimmed_mean") as exc:
        aggregate(bad, M)
    assert "bulyan" in str(exc.value)


def test_composition_rejects_options_of_neither_step():
    M, _ = _cluster_with_outliers()
    with pytest.raises(TypeError, match="unknown options"):
        aggregate("nnm+median", M, trim=0.1)


def test_coordinate_median_even_count_averages_the_middle_pair():
    X = torch.tensor([[1.0], [2.0], [10.0], [4.0]])
    assert float(coordinate_median(X)) == 3.0


def test_geometric_median_scale_cannot_be_dominated_by_one_huge_client():
    # issue 8's bar: one client scaled by 1e10 moves the geometric median by <= 25%
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        M = 2.0 + torch.randn(10, 6, 4, generator=g, dtype=torch.float64)
        clean = aggregate("geometric_median", M).estimates[0]
        A = M.clone()
        A[seed] *= 1e10
        res = aggregate("geometric_median", A)
        assert res.info["converged"]
        assert float((res.estimates[0] - clean).norm() / clean.norm()) <= 0.25


def test_bulyan_shares_ties_at_the_beta_th_distance():
    from fedlora_lite.federated.robust import _closest_to_median_mean

    S = torch.tensor([0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 5.0], dtype=torch.float64).reshape(7, 1)
    # median 2; distances 2, 1, 1, 0, 1, 1, 3: the 3 closest are 2 and two of the four tied at distance 1
    assert float(_closest_to_median_mean(S, 3)) == pytest.approx(2.0, abs=1e-15)  # (2 + 2 * mean(1, 1, 3, 3)) / 3
    nudged = S.clone()
    nudged[1] += 1e-16  # rounding noise must not decide which tied values count
    assert float(_closest_to_median_mean(nudged, 3)) == pytest.approx(2.0, abs=1e-12)
    generic = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    med = generic.median(dim=0).values
    idx = torch.argsort((generic - med).abs(), dim=0)[:4]
    torch.testing.assert_close(_closest_to_median_mean(generic, 4), torch.gather(generic, 0, idx).mean(dim=0))


def test_bulyan_is_stable_under_rounding_noise_with_identical_byzantine_copies():
    from fedlora_lite.federated import contaminate

    fed = make_regression_federation(20, 10, 4, 2, 0.0, noise=1.0, samples=60, similarity=0.97, seed=0)
    local = fit_local(fed)
    out = []
    for eps in (0.0, 1e-15):
        noisy = local * (1 + eps * torch.randn(local.shape, generator=torch.Generator().manual_seed(5), dtype=local.dtype))
        X, _ = contaminate("mimic", noisy, 0.3, generator=torch.Generator().manual_seed(0))  # 6 identical copies
        out.append(aggregate("bulyan", X, f=4).estimates[0])
    assert float((out[0] - out[1]).norm() / out[0].norm()) < 1e-12
