"""Unit tests of the attacks (fedlora_lite.federated.attacks / attacks_adaptive) on small seeded cases."""

import dataclasses
import math
from statistics import NormalDist

import pytest
import torch

from fedlora_lite.clair import clair
from fedlora_lite.federated import (
    aggregate,
    alie_z,
    attack,
    available_attacks,
    clair_adaptive_search,
    contaminate,
    label_flip_task,
)


def _honest(n=8, d=6, p=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 1.0 + 0.5 * torch.randn(n, d, p, generator=g, dtype=torch.float64)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_registry_lists_every_attack():
    assert available_attacks() == ["sign_flip", "gaussian", "scaled", "model_replacement", "alie", "ipm", "min_max",
                                   "min_sum", "mimic", "clair_adaptive"]


@pytest.mark.parametrize("name", [a for a in available_attacks() if a != "clair_adaptive"])
def test_every_attack_is_seeded_and_shaped(name):
    H = _honest()
    a = attack(name, H, 3, generator=_gen(1))
    b = attack(name, H, 3, generator=_gen(1))
    assert a.shape == (3, 6, 4) and a.dtype == H.dtype and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_sign_flip_ipm_and_scaled():
    H = _honest()
    torch.testing.assert_close(attack("sign_flip", H, 2)[0], -H.mean(0))
    torch.testing.assert_close(attack("sign_flip", H, 2, scale=3.0)[1], -3 * H.mean(0))
    torch.testing.assert_close(attack("ipm", H, 1, epsilon=0.5)[0], -0.5 * H.mean(0))
    B = attack("scaled", H, 4, generator=_gen(2), scale=10.0)
    for b in B:  # each is 10x some honest client
        assert min(float((b - 10 * h).norm()) for h in H) < 1e-12


def test_gaussian_moments_and_default_scale():
    H = _honest(n=5, d=40, p=30)
    B = attack("gaussian", H, 50, generator=_gen(3), mu=1.0, sigma=2.0)
    assert abs(float(B.mean()) - 1.0) < 0.05 and abs(float(B.std()) - 2.0) < 0.05
    rms = float(H.pow(2).mean().sqrt())
    assert abs(float(attack("gaussian", H, 50, generator=_gen(3)).std()) - rms) < 0.05 * rms
    assert not torch.equal(attack("gaussian", H, 2, generator=_gen(0)), attack("gaussian", H, 2, generator=_gen(1)))


def test_model_replacement_puts_fedavg_on_the_target():
    H = _honest()
    target = torch.full((6, 4), 3.0, dtype=torch.float64)
    B = attack("model_replacement", H, 2, target=target)
    torch.testing.assert_close(aggregate("fedavg", torch.cat([H, B])).estimates[0], target)
    torch.testing.assert_close(aggregate("fedavg", torch.cat([H, attack("model_replacement", H, 3)])).estimates[0], -H.mean(0))
    with pytest.raises(ValueError, match="target"):
        attack("model_replacement", H, 2, target=torch.zeros(2, 2))


def test_alie_z_follows_the_paper_and_the_attack_uses_it():
    # n = 50, f = 12 (the paper's CIFAR setting): s = 26 - 12 = 14, z = Phi^-1(36/50)
    assert alie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(36 / 50))
    assert alie_z(20, 4) == pytest.approx(NormalDist().inv_cdf(13 / 20))
    H = _honest(n=16)
    z = alie_z(20, 4)
    torch.testing.assert_close(attack("alie", H, 4)[0], H.mean(0) + z * H.std(0))
    torch.testing.assert_close(attack("alie", H, 4, z=1.0)[0], H.mean(0) + H.std(0))
    with pytest.raises(ValueError, match="2 honest"):
        attack("alie", H[:1], 1)


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
@pytest.mark.parametrize("perturbation", ["unit_vec", "std", "sign"])
def test_min_max_and_min_sum_sit_on_their_distance_constraint(name, perturbation):
    H = _honest(n=10)
    b = attack(name, H, 2, perturbation=perturbation)[0]
    X = H.reshape(10, -1)
    x = b.reshape(-1)
    D = torch.cdist(X, X)
    if name == "min_max":
        value, bound = float((X - x).norm(dim=1).max()), float(D.max())
    else:
        value, bound = float((X - x).norm(dim=1).pow(2).sum()), float(D.pow(2).sum(1).max())
    assert value <= bound * (1 + 1e-9)  # feasible ...
    assert value >= 0.99 * bound  # ... and pushed to the boundary by the halving search
    assert float((b - H.mean(0)).norm()) > 0.1


def test_mimic_copies_the_most_extreme_client_along_the_top_direction():
    H = _honest(n=6)
    H[4] += 5.0  # the direction of largest spread goes through client 4
    torch.testing.assert_close(attack("mimic", H, 2)[1], H[4])
    torch.testing.assert_close(attack("mimic", H, 1, target=2)[0], H[2])
    with pytest.raises(ValueError, match="target"):
        attack("mimic", H, 1, target=6)


def test_contaminate_places_byzantine_clients_at_seeded_positions():
    H = _honest(n=10)
    X, benign = contaminate("sign_flip", H, 0.3, generator=_gen(4))
    assert int((~benign).sum()) == 3
    torch.testing.assert_close(X[benign], H[benign])
    torch.testing.assert_close(X[~benign][0], -H[benign].mean(0))
    X2, benign2 = contaminate("sign_flip", H, 0.3, generator=_gen(4))
    assert torch.equal(benign, benign2) and torch.equal(X, X2)
    X0, b0 = contaminate("alie", H, 0.0)
    assert bool(b0.all()) and torch.equal(X0, H)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), "0.2"])
def test_invalid_fractions_are_refused(fraction):
    with pytest.raises((ValueError, TypeError), match="fraction"):
        contaminate("sign_flip", _honest(), fraction)


def test_fraction_that_leaves_no_honest_client_is_refused():
    with pytest.raises(ValueError, match="no honest client"):
        contaminate("sign_flip", _honest(n=4), 0.95)


def test_unknown_attack_and_options_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="alie") as exc:
        attack("alei", _honest(), 1)
    assert "label_flip_task" in str(exc.value)
    with pytest.raises(ValueError, match="min_sum"):
        contaminate("nope", _honest(), 0.2)
    with pytest.raises(TypeError, match="unknown options"):
        attack("ipm", _honest(), 1, eps=0.1)
    with pytest.raises(ValueError, match="num_byzantine"):
        attack("ipm", _honest(), 0)
    with pytest.raises(ValueError, match="perturbation"):
        attack("min_max", _honest(), 1, perturbation="nope")


def test_label_flip_task_wraps_the_corrupted_kind():
    from fedlora_lite.experiments.copy_task import CopyTaskConfig

    cfg = label_flip_task(CopyTaskConfig(), 0.4, colluding=True)
    assert cfg.kinds == ("corrupted",) and cfg.contamination == 0.4 and cfg.colluding
    assert dataclasses.replace(cfg, kinds=("conflicting",)).kinds == ("conflicting",)
    with pytest.raises(TypeError, match="CopyTaskConfig"):
        label_flip_task({"contamination": 0.1}, 0.2)
    with pytest.raises(ValueError, match="fraction"):
        label_flip_task(CopyTaskConfig(), 1.2)


def _low_rank_honest(n=12, d=20, p=6, r=2, seed=0, noise=0.05):
    g = _gen(seed)
    U, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    return torch.stack([U @ torch.randn(r, p, generator=g, dtype=torch.float64)
                        + noise * torch.randn(d, p, generator=g, dtype=torch.float64) for _ in range(n)])


@pytest.mark.parametrize("mode", ["evade", "collude"])
def test_adaptive_attack_stays_unflagged_by_clair(mode):
    H = _low_rank_honest()
    out = clair_adaptive_search(H, 3, _gen(5), mode=mode)
    assert out.updates.shape == (3, 20, 6) and out.flagged == 0 and 0.0 <= out.gamma <= 1.0
    res = clair(torch.cat([H, out.updates]))
    assert not bool(res.flags[12:].any())
    assert out.threshold == res.config.threshold and out.evaluations >= 2
    if mode == "collude":
        torch.testing.assert_close(out.updates[0], out.updates[2])
    # a plain large off-subspace update, by contrast, is flagged
    off = torch.randn(3, 20, 6, generator=_gen(6), dtype=torch.float64) * float(H[0].norm()) / math.sqrt(120)
    assert bool(clair(torch.cat([H, off])).flags[12:].all())


def test_adaptive_attack_through_the_registry_and_its_checks():
    H = _low_rank_honest()
    B = attack("clair_adaptive", H, 2, generator=_gen(5), steps=2)
    assert B.shape == (2, 20, 6)
    with pytest.raises(ValueError, match="mode"):
        attack("clair_adaptive", H, 2, mode="nope")
    with pytest.raises(ValueError, match="at least 3"):
        attack("clair_adaptive", H[:2], 1)
