"""Exactness identities and unit tests of the LoRA-aware aggregation rules (weights and unequal ranks included)."""

import pytest
import torch

from fedlora_lite.federated import aggregate_lora, available_lora_aggregators, robust_pca
from fedlora_lite.lora import LoraFactors

RANKS = [2, 3, 5, 2]
WEIGHTS = [1.0, 2.0, 3.0, 4.0]
D, P = 14, 9


def _pairs(ranks=RANKS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(D, r, generator=g, dtype=torch.float64), torch.randn(r, P, generator=g, dtype=torch.float64))
            for r in ranks]


def _w(weights=WEIGHTS):
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


def _exact(pairs, w):
    return sum(wk * B @ A for wk, (B, A) in zip(w, pairs))


def test_registry():
    assert available_lora_aggregators() == ["fedit", "ffa_lora", "flora", "fedex_lora", "fed_sb", "fedsa_lora",
                                            "flexlora", "fedrpca"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flora_stacked_product_is_the_weighted_sum(seed):
    pairs, w = _pairs(seed=seed), _w()
    res = aggregate_lora("flora", pairs, WEIGHTS)
    B, A = res.global_factors
    torch.testing.assert_close(B @ A, _exact(pairs, w))
    assert B.shape[1] == sum(RANKS) and res.ranks_out == (sum(RANKS),) * 4 and res.rank_growth == sum(RANKS) / 5
    assert res.residual < 1e-12
    assert res.upload_floats == sum(RANKS) * (D + P) and res.download_floats == 4 * sum(RANKS) * (D + P)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedex_lora_merged_result_is_the_weighted_sum(seed):
    pairs, w = _pairs(seed=seed), _w()
    res = aggregate_lora("fedex_lora", pairs, WEIGHTS)
    Bbar, Abar = res.global_factors
    torch.testing.assert_close(Bbar @ Abar + res.base_update, _exact(pairs, w))
    torch.testing.assert_close(res.update(2), _exact(pairs, w))
    assert res.residual < 1e-12
    assert res.download_floats == 4 * (5 * (D + P) + D * P)  # the dense residual travels to every client


def _fed_sb_triples(seed=0, r=4, K=4):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(D, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, P, generator=g, dtype=torch.float64)
    return [(B, torch.randn(r, r, generator=g, dtype=torch.float64), A) for _ in range(K)], B, A


@pytest.mark.parametrize("seed", [0, 1])
def test_fed_sb_averages_R_exactly(seed):
    triples, B, A = _fed_sb_triples(seed)
    w = _w()
    res = aggregate_lora("fed_sb", triples, WEIGHTS)
    Rbar = sum(wk * R for wk, (_, R, _) in zip(w, triples))
    Bs, As = res.global_factors
    torch.testing.assert_close(Bs @ As, B @ Rbar @ A)
    torch.testing.assert_close(B @ Rbar @ A, sum(wk * B @ R @ A for wk, (_, R, _) in zip(w, triples)))
    assert res.residual < 1e-12 and res.upload_floats == 4 * 16 and res.download_floats == 4 * 16
    assert res.rank_growth == 1.0


def test_fed_sb_input_checks():
    triples, B, A = _fed_sb_triples()
    with pytest.raises(ValueError, match="same fixed B and A"):
        aggregate_lora("fed_sb", [triples[0], (B + 1, triples[1][1], A)] + triples[2:])
    with pytest.raises(TypeError, match="triple"):
        aggregate_lora("fed_sb", _pairs())
    with pytest.raises(TypeError, match="no options"):
        aggregate_lora("fed_sb", triples, beta=2.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedit_error_is_the_omitted_cross_term(seed):
    pairs, w = _pairs(seed=seed), _w()
    res = aggregate_lora("fedit", pairs, WEIGHTS)
    Bbar, Abar = res.global_factors
    r = max(RANKS)
    pad = [(torch.nn.functional.pad(B, (0, r - B.shape[1])), torch.nn.functional.pad(A, (0, 0, 0, r - A.shape[0])))
           for B, A in pairs]
    cross = sum(w[k] * w[j] * pad[k][0] @ pad[j][1] for k in range(4) for j in range(4) if k != j)
    diagonal_deficit = sum(w[k] * (1 - w[k]) * pairs[k][0] @ pairs[k][1] for k in range(4))
    torch.testing.assert_close(Bbar @ Abar - _exact(pairs, w), cross - diagonal_deficit)
    assert float((cross - diagonal_deficit).norm()) > 0.1  # the cross-term is not small here


def test_fedit_is_exact_only_when_clients_agree():
    B, A = _pairs([3])[0]
    res = aggregate_lora("fedit", [(B, A)] * 4, WEIGHTS)
    assert res.residual < 1e-12
    assert aggregate_lora("fedit", _pairs([3, 3, 3, 3]), WEIGHTS).residual > 0.1


def test_fedit_unequal_ranks_truncate_the_padded_average_per_client():
    res = aggregate_lora("fedit", _pairs())
    Bbar, Abar = res.global_factors
    for (B, A), r in zip(res.factors, RANKS):
        assert torch.equal(B, Bbar[:, :r]) and torch.equal(A, Abar[:r])


def test_ffa_lora_with_a_shared_frozen_A_is_exact():
    g = torch.Generator().manual_seed(3)
    A0 = torch.randn(5, P, generator=g, dtype=torch.float64)
    pairs = [(B, A0[: B.shape[1]]) for B, _ in _pairs()]
    res = aggregate_lora("ffa_lora", pairs, WEIGHTS)
    torch.testing.assert_close(res.global_factors[0] @ res.global_factors[1], _exact(pairs, _w()))
    assert res.residual < 1e-12 and res.upload_floats == sum(RANKS) * D
    with pytest.raises(ValueError, match="frozen"):
        aggregate_lora("ffa_lora", _pairs())


def test_fedsa_lora_shares_A_and_keeps_B():
    pairs, w = _pairs(), _w()
    res = aggregate_lora("fedsa_lora", pairs, WEIGHTS)
    assert res.global_factors is None
    for (B, A), (Bk, _) in zip(res.factors, pairs):
        assert torch.equal(B, Bk)
    Abar = sum(wk * torch.nn.functional.pad(A, (0, 0, 0, 5 - A.shape[0])) for wk, (_, A) in zip(w, pairs))
    torch.testing.assert_close(res.factors[2][1], Abar)
    assert res.upload_floats == sum(RANKS) * P and res.residual > 0


def test_flexlora_serves_the_best_rank_rk_approximation_of_the_exact_mean():
    pairs, w = _pairs(), _w()
    res = aggregate_lora("flexlora", pairs, WEIGHTS)
    exact = _exact(pairs, w)
    U, s, Vh = torch.linalg.svd(exact)
    for (B, A), r in zip(res.factors, RANKS):
        assert B.shape[1] == r
        torch.testing.assert_close(B @ A, (U[:, :r] * s[:r]) @ Vh[:r])
    res_full = aggregate_lora("flexlora", pairs, WEIGHTS, rank=sum(RANKS))
    assert res_full.residual < 1e-10 and res_full.global_factors is not None
    with pytest.raises(ValueError, match="rank"):
        aggregate_lora("flexlora", pairs, rank=0)


def test_fedrpca_beta_one_is_fedit_and_beta_scales_the_sparse_part():
    pairs = _pairs([3, 3, 3, 3, 3, 3])
    fedit = aggregate_lora("fedit", pairs)
    one = aggregate_lora("fedrpca", pairs, beta=1.0)
    torch.testing.assert_close(one.global_factors[0], fedit.global_factors[0])
    torch.testing.assert_close(one.global_factors[1], fedit.global_factors[1])
    two = aggregate_lora("fedrpca", pairs, beta=2.0)
    # B(beta) = mean(L) + beta mean(S): linear in beta, so B(2) - B(1) = mean(S)
    three = aggregate_lora("fedrpca", pairs, beta=3.0)
    torch.testing.assert_close(three.global_factors[0] - two.global_factors[0], two.global_factors[0] - one.global_factors[0])
    assert float((two.global_factors[0] - one.global_factors[0]).norm()) > 1e-6
    assert two.info["converged_B"] and two.info["converged_A"]
    personal = aggregate_lora("fedrpca", pairs, beta=2.0, personal=True)
    assert personal.global_factors is None and not torch.equal(personal.factors[0][0], personal.factors[1][0])
    ref = aggregate_lora("fedrpca", pairs, reference=pairs[0])
    assert ref.global_factors[0].shape == (D, 3)
    with pytest.raises(ValueError, match="reference"):
        aggregate_lora("fedrpca", pairs, reference=(torch.zeros(2, 2), torch.zeros(2, 2)))


def test_robust_pca_recovers_low_rank_plus_sparse():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(60, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 40, generator=g, dtype=torch.float64)
    S = torch.zeros(60, 40, dtype=torch.float64)
    idx = torch.randperm(2400, generator=g)[:60]
    S.view(-1)[idx] = 10 * torch.randn(60, generator=g, dtype=torch.float64)
    out = robust_pca(L + S)
    assert out.converged and out.rank == 2
    assert float((out.low_rank - L).norm() / L.norm()) < 1e-4
    assert float((out.sparse - S).norm() / S.norm()) < 1e-4


def test_lora_factors_objects_scaling_and_weights_validation():
    pairs = _pairs([2, 2, 2])
    objs = [LoraFactors(A=A, B=B, scaling=2.0, fan_in_fan_out=False) for B, A in pairs]
    res = aggregate_lora("flora", objs)
    torch.testing.assert_close(res.global_factors[0] @ res.global_factors[1], 2.0 * _exact(pairs, _w([1, 1, 1])))
    res2 = aggregate_lora("flora", pairs, scaling=2.0)
    torch.testing.assert_close(res2.global_factors[0], res.global_factors[0])
    with pytest.raises(ValueError, match="weights"):
        aggregate_lora("fedit", pairs, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        aggregate_lora("fedit", pairs, [1.0, 1.0])


def test_unknown_names_and_options_list_the_choices():
    with pytest.raises(ValueError, match="flexlora"):
        aggregate_lora("fedavg", _pairs())
    with pytest.raises(TypeError, match="unknown options"):
        aggregate_lora("flora", _pairs(), beta=2.0)
    with pytest.raises(ValueError, match="share"):
        aggregate_lora("fedit", [(torch.zeros(3, 2), torch.zeros(2, 4)), (torch.zeros(5, 2), torch.zeros(2, 4))])


def test_result_bytes_and_dense_view():
    pairs = [(B.float(), A.float()) for B, A in _pairs()]
    res = aggregate_lora("fedit", pairs, compute_residual=False)
    assert res.bytes_per_float == 4 and res.upload_bytes == 4 * res.upload_floats
    assert res.residual != res.residual  # NaN: not computed
    assert res.dense().shape == (4, D, P)
