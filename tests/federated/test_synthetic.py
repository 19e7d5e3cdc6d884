"""Tests for fedlora_lite.federated.synthetic: shapes, determinism, contamination kinds, separation, OLS."""

import itertools
import math

import pytest
import torch

from fedlora_lite.federated import (
    CONTAMINATION_KINDS,
    expected_ols_error,
    fit_local,
    least_squares,
    make_regression_federation,
    make_update_federation,
    ols_noise_level,
)

DETECTABLE = ("random", "subspace", "sign_flip")


def _fro(x):
    return torch.linalg.matrix_norm(x)


def test_shapes_and_masks():
    fed = make_regression_federation(10, 12, 5, 2, 0.3, samples=[20 + k for k in range(10)], seed=3)
    assert fed.theta.shape == (10, 12, 5)
    assert fed.U.shape == (12, 2) and fed.V.shape == (10, 5, 2) and fed.H.shape == (10, 12, 5)
    assert [x.shape for x in fed.X] == [(20 + k, 12) for k in range(10)]
    assert [y.shape for y in fed.Y] == [(20 + k, 5) for k in range(10)]
    assert fed.benign.dtype == torch.bool and fed.num_contaminated == 3
    assert torch.equal(fed.contaminated, ~fed.benign)
    assert (fed.num_clients, fed.dim, fed.outputs, fed.rank) == (10, 12, 5, 2)
    torch.testing.assert_close(fed.U.T @ fed.U, torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("contamination,K,expected", [(0.0, 20, 0), (0.3, 20, 6), (0.25, 10, 3), (0.1, 20, 2), (0.4, 20, 8)])
def test_contaminated_count_rounds_half_up(contamination, K, expected):
    fed = make_update_federation(K, 10, 4, 2, contamination, seed=0)
    assert fed.num_contaminated == expected


def test_same_seed_same_federation_and_generator_equivalent():
    a = make_regression_federation(seed=5, noise=0.3)
    b = make_regression_federation(generator=torch.Generator().manual_seed(5), noise=0.3)
    c = make_regression_federation(seed=6, noise=0.3)
    assert torch.equal(a.theta, b.theta) and torch.equal(a.benign, b.benign)
    assert all(torch.equal(x, y) for x, y in zip(a.Y, b.Y))
    assert not torch.equal(a.theta, c.theta)


def test_regression_truth_matches_update_federation():
    a = make_update_federation(kind="sign_flip", heterogeneity=0.2, seed=2)
    b = make_regression_federation(kind="sign_flip", heterogeneity=0.2, seed=2)
    assert torch.equal(a.theta, b.theta) and torch.equal(a.U, b.U) and torch.equal(a.benign, b.benign)


def test_benign_clients_follow_the_model():
    fed = make_update_federation(heterogeneity=0.0, seed=1)
    b = fed.benign
    torch.testing.assert_close(fed.theta[b], fed.U @ fed.V[b].mT)
    assert fed.off_subspace_fraction()[b].max() < 1e-12


def test_heterogeneity_has_the_requested_relative_size():
    fed = make_update_federation(heterogeneity=0.3, seed=1)
    b = fed.benign
    base = fed.U @ fed.V[b].mT
    torch.testing.assert_close(_fro(fed.H[b]) / _fro(base), torch.full((int(b.sum()),), 0.3, dtype=torch.float64))
    torch.testing.assert_close(fed.theta[b], base + fed.H[b])
    assert _fro(fed.H[~b]).max() == 0


@pytest.mark.parametrize("kind", CONTAMINATION_KINDS)
def test_contaminated_norms_are_matched(kind):
    fed = make_update_federation(kind=kind, contamination=0.4, heterogeneity=0.25, seed=4)
    c = fed.contaminated
    reference = _fro(fed.U @ fed.V[c].mT) * math.sqrt(1 + 0.25**2)
    expected_scale = 5.0 if kind == "scaled" else 1.0
    # H_k is a random direction, so ||U V^T + H|| ~ sqrt(1 + h^2) ||U V^T|| only on average
    ratio = _fro(fed.theta[c]) / (expected_scale * reference)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.15)


def test_norm_matching_is_exact_without_heterogeneity():
    for kind in DETECTABLE:
        fed = make_update_federation(kind=kind, contamination=0.4, seed=7)
        c = fed.contaminated
        torch.testing.assert_close(_fro(fed.theta[c]), _fro(fed.U @ fed.V[c].mT))


def test_kind_random_is_full_rank_and_off_subspace():
    fed = make_update_federation(20, 30, 8, 3, 0.3, "random", seed=0)
    c = fed.contaminated
    assert all(int(torch.linalg.matrix_rank(t)) == 8 for t in fed.theta[c])
    assert fed.off_subspace_fraction()[c].min() > 0.8


def test_kind_subspace_has_rank_r_in_another_subspace():
    fed = make_update_federation(20, 30, 8, 3, 0.3, "subspace", seed=0)
    c = fed.contaminated
    thetas = fed.theta[c]
    assert all(int(torch.linalg.matrix_rank(t)) == 3 for t in thetas)
    assert fed.off_subspace_fraction()[c].min() > 0.8
    # each contaminated client has its own subspace: the stack is not rank 3
    assert int(torch.linalg.matrix_rank(torch.cat(list(thetas), dim=1))) > 3


def test_kind_sign_flip_flips_half_the_rows_of_a_benign_looking_update():
    fed = make_update_federation(20, 30, 8, 3, 0.3, "sign_flip", seed=0)
    for k in torch.nonzero(fed.contaminated).flatten().tolist():
        base = fed.U @ fed.V[k].T
        ratio = (fed.theta[k] / base)  # rows scaled by +1 or -1
        row_sign = ratio.mean(dim=1)
        torch.testing.assert_close(ratio, row_sign[:, None].expand_as(ratio))
        assert int((row_sign < 0).sum()) == 15 and int((row_sign > 0).sum()) == 15
        torch.testing.assert_close(torch.linalg.svdvals(fed.theta[k]), torch.linalg.svdvals(base))
    assert fed.off_subspace_fraction()[fed.contaminated].min() > 0.6


def test_kind_scaled_stays_in_the_subspace():
    fed = make_update_federation(kind="scaled", scale=-3.0, seed=0)
    c = fed.contaminated
    torch.testing.assert_close(fed.theta[c], -3.0 * fed.U @ fed.V[c].mT)
    assert fed.off_subspace_fraction().max() < 1e-12


@pytest.mark.parametrize("kind", DETECTABLE)
def test_separation_interpolates_from_benign_looking_to_the_kind(kind):
    fractions = []
    feds = [make_update_federation(kind=kind, separation=s, seed=9) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    for fed in feds:
        fractions.append(float(fed.off_subspace_fraction()[fed.contaminated].mean()))
        # only the contaminated truths move with the separation
        assert torch.equal(fed.U, feds[0].U) and torch.equal(fed.benign, feds[0].benign)
        assert torch.equal(fed.theta[fed.benign], feds[0].theta[fed.benign])
    assert fractions[0] < 1e-12
    assert all(b > a for a, b in itertools.pairwise(fractions))
    pure = make_update_federation(kind=kind, seed=9)
    torch.testing.assert_close(feds[-1].theta, pure.theta)


def test_contaminated_sets_are_nested_as_the_fraction_grows():
    sets = [set(torch.nonzero(make_update_federation(contamination=c, seed=11).contaminated).flatten().tolist())
            for c in (0.1, 0.2, 0.3, 0.4)]
    assert all(a < b for a, b in itertools.pairwise(sets))


def test_similarity_correlates_the_coefficients():
    same = make_update_federation(10, 12, 4, 2, 0.0, similarity=1.0, seed=0)
    torch.testing.assert_close(same.V, same.V[:1].expand_as(same.V))
    fed = make_update_federation(400, 12, 4, 2, 0.0, similarity=0.81, seed=0)
    # V_k = 0.9 V_0 + sqrt(0.19) Z_k: across clients each entry varies with variance 1 - 0.81
    spread = float(fed.V.var(dim=0).mean())
    assert spread == pytest.approx(0.19, rel=0.1)
    # similarity 0 is the default draw, bit for bit
    assert torch.equal(make_update_federation(similarity=0.0, seed=5).theta, make_update_federation(seed=5).theta)


def test_offset_is_a_shared_off_subspace_component():
    fed = make_update_federation(contamination=0.3, offset=0.4, seed=2)
    H = fed.H[fed.benign]
    H0 = H[0]
    torch.testing.assert_close(H, H0.expand_as(H))  # no individual heterogeneity: all benign share H_0
    assert float(torch.linalg.matrix_norm(fed.U.T @ H0)) < 1e-12  # outside span(U)
    mean_base = float(_fro(fed.U @ fed.V.mT).mean())
    assert float(_fro(H0)) == pytest.approx(0.4 * mean_base)


def test_ols_noise_level_estimates_the_entrywise_error_scale():
    sigma, n, d = 0.5, 100, 10
    fed = make_regression_federation(50, d, 4, 2, 0.0, samples=n, noise=sigma, seed=1)
    tau = ols_noise_level(fed)
    assert tau.shape == (50,)
    assert float(tau.mean()) == pytest.approx(sigma / math.sqrt(n - d - 1), rel=0.05)
    entry_sd = float((fit_local(fed) - fed.theta).std())
    assert float(tau.mean()) == pytest.approx(entry_sd, rel=0.1)
    with pytest.raises(ValueError, match="samples"):
        ols_noise_level(make_regression_federation(5, 10, 3, 2, 0.0, samples=10, seed=0))
    with pytest.raises(TypeError, match="federation"):
        ols_noise_level(make_update_federation(seed=0))


def test_fit_local_is_exact_without_noise():
    fed = make_regression_federation(kind="random", noise=0.0, samples=40, seed=0)
    est = fit_local(fed)
    assert est.shape == fed.theta.shape
    assert float((est - fed.theta).abs().max()) < 1e-10


def test_ols_error_matches_its_expectation():
    dim, outputs, n, sigma = 10, 4, 60, 0.5
    fed = make_regression_federation(200, dim, outputs, 2, 0.0, samples=n, noise=sigma, seed=0)
    mse = float(_fro(fit_local(fed) - fed.theta).pow(2).mean())
    expected = expected_ols_error(dim, outputs, n, sigma) ** 2
    assert abs(mse / expected - 1) < 0.1


def test_noise_scales_the_estimation_error_linearly():
    errs = []
    for sigma in (0.01, 0.1):
        fed = make_regression_federation(noise=sigma, seed=3)
        errs.append(float(_fro(fit_local(fed) - fed.theta).mean()))
    assert errs[1] / errs[0] == pytest.approx(10.0, rel=1e-9)  # same X, E: exactly linear


def test_ridge_shrinks_and_handles_few_samples():
    fed = make_regression_federation(6, 20, 3, 2, 0.0, samples=10, noise=0.1, seed=0)
    with pytest.raises(ValueError, match="ridge"):
        fit_local(fed)
    est = fit_local(fed, ridge=1.0)
    assert est.shape == (6, 20, 3) and torch.isfinite(est).all()
    fed2 = make_regression_federation(6, 20, 3, 2, 0.0, samples=100, noise=0.1, seed=0)
    assert _fro(fit_local(fed2, ridge=50.0)).sum() < _fro(fit_local(fed2)).sum()


def test_least_squares_matches_normal_equations():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)
    Y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(least_squares(X, Y, 2.0), torch.linalg.solve(X.T @ X + 2.0 * torch.eye(6, dtype=X.dtype), X.T @ Y))
    torch.testing.assert_close(least_squares(X, Y), torch.linalg.solve(X.T @ X, X.T @ Y))
    with pytest.raises(ValueError, match="rows"):
        least_squares(X, Y[:10])


def test_float32_output_equals_float64_draw():
    a = make_regression_federation(seed=1, noise=0.1, dtype=torch.float32)
    b = make_regression_federation(seed=1, noise=0.1)
    assert a.theta.dtype == torch.float32 and a.X[0].dtype == torch.float32
    torch.testing.assert_close(a.theta, b.theta.float())
    assert fit_local(a).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"kind": "nonsense"}, ValueError, "kind"),
        ({"contamination": 1.0}, ValueError, "contamination"),
        ({"contamination": 0.99, "num_clients": 3}, ValueError, "contamination"),
        ({"rank": 30}, ValueError, "rank"),
        ({"rank": 9}, ValueError, "rank"),
        ({"num_clients": 2}, ValueError, "num_clients"),
        ({"separation": 1.5}, ValueError, "separation"),
        ({"heterogeneity": -0.1}, ValueError, "heterogeneity"),
        ({"similarity": 1.1}, ValueError, "similarity"),
        ({"offset": -1.0}, ValueError, "offset"),
        ({"scale": 0.0}, ValueError, "scale"),
        ({"kind": "scaled", "scale": 0.0}, ValueError, "scale"),
        ({"dtype": torch.float16}, TypeError, "dtype"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "generator"),
        ({"seed": -1}, ValueError, "seed"),
        ({"num_clients": 2.5}, TypeError, "num_clients"),
    ],
)
def test_bad_generator_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        make_update_federation(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"samples": [10, 20]}, "samples"), ({"samples": 0}, "samples"), ({"noise": -1.0}, "noise"), ({"noise": [0.1] * 19}, "noise")],
)
def test_bad_regression_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_regression_federation(**kwargs)


def test_fit_local_rejects_non_federations():
    with pytest.raises(TypeError, match="federation"):
        fit_local(torch.zeros(3, 4, 5))


def test_expected_ols_error_formula_and_errors():
    assert expected_ols_error(30, 8, 200, 0.1) == pytest.approx(0.1 * math.sqrt(8 * 30 / 169))
    with pytest.raises(ValueError, match="samples"):
        expected_ols_error(30, 8, 31, 0.1)
