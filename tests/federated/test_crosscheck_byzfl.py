"""Cross-checks against ByzFL (byzfl.aggregators / byzfl.attacks, imported without byzfl/__init__), to 1e-6.

Convention differences, each tested explicitly:

* centered clipping: ByzFL starts from its stored state (zero on the first call, then its
  previous output); ours starts from ``center=`` or, by default, the coordinate median;
* IPM: ByzFL's default tau = 2, ours epsilon = 0.1 (same formula);
* trimmed mean: ByzFL trims f values per side, ours floor(trim K) (equal for trim = f / K);
* Krum: ByzFL averages the n - f - 1 nearest squared distances, Flower and we sum the
  n - f - 2 nearest, so ByzFL's Krum(f) picks what our Krum(f - 1) picks.
"""

import numpy as np
import pytest
import torch

from fedlora_lite.federated import aggregate, attack, nnm
from fedlora_lite.federated.robust import coordinate_median
from tests.federated.reference_impls import byzfl_modules, seeded_updates

bagg, batt = byzfl_modules()
SEEDS = [0, 1, 2]


def _data(seed, K=11):
    M = seeded_updates(K, seed=seed, outliers=2)
    return M, M.reshape(K, -1).numpy().copy()


def _close(ours, ref):
    np.testing.assert_allclose(np.asarray(ours).reshape(-1), np.asarray(ref).reshape(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau,L", [(0.5, 1), (1.5, 3), (10.0, 2)])
def test_centered_clipping_matches_byzfl_from_zero(seed, tau, L):
    M, X = _data(seed)
    ours = aggregate("centered_clipping", M, center=torch.zeros(M.shape[1:], dtype=M.dtype), tau=tau, iterations=L)
    _close(ours.estimates[0], bagg.CenteredClipping(L=L, tau=tau)(X))


def test_centered_clipping_state_and_default_start_are_conventions():
    M, X = _data(0)
    ref = bagg.CenteredClipping(L=2, tau=1.0)
    first = ref(X.copy())
    second = ref(X.copy())  # ByzFL continues from its previous output
    centre = torch.as_tensor(first).reshape(M.shape[1:])
    _close(aggregate("centered_clipping", M, center=centre, tau=1.0, iterations=2).estimates[0], second)
    ours_default = aggregate("centered_clipping", M, tau=1.0, iterations=2).estimates[0]
    med = coordinate_median(M.reshape(11, -1)).reshape(M.shape[1:])
    torch.testing.assert_close(ours_default, aggregate("centered_clipping", M, center=med, tau=1.0, iterations=2).estimates[0])
    assert float(np.abs(ours_default.numpy().reshape(-1) - first).max()) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("f", [0, 2, 5])
def test_nnm_matches_byzfl(seed, f):
    M, X = _data(seed)
    _close(nnm(M, f=f), bagg.NNM(f=f)(X))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("f", [1, 3, 5])
def test_mda_matches_byzfl(seed, f):
    M, X = _data(seed)
    _close(aggregate("mda", M, f=f).estimates[0], bagg.MDA(f=f)(X))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("z", [0.5, 1.5, -1.0])
def test_alie_matches_byzfl(seed, z):
    M, X = _data(seed)
    B = attack("alie", M, 3, z=z)
    for b in B:
        _close(b, batt.ALittleIsEnough(tau=z)(X))


@pytest.mark.parametrize("seed", SEEDS)
def test_ipm_and_sign_flip_match_byzfl(seed):
    M, X = _data(seed)
    for eps in (0.1, 2.0, 5.0):
        _close(attack("ipm", M, 2, epsilon=eps)[1], batt.InnerProductManipulation(tau=eps)(X))
    _close(attack("sign_flip", M, 2)[0], batt.SignFlipping()(X))
    # convention: ByzFL's IPM default is tau = 2, ours epsilon = 0.1
    _close(attack("ipm", M, 1)[0], batt.InnerProductManipulation(tau=0.1)(X))
    assert float(np.abs(attack("ipm", M, 1)[0].numpy().reshape(-1) - batt.InnerProductManipulation()(X)).max()) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_mimic_static_clipping_and_trimmed_mean_match_byzfl(seed):
    M, X = _data(seed)
    _close(attack("mimic", M, 1, target=4)[0], batt.Mimic(epsilon=4)(X))
    clipped = bagg.Clipping(c=2.0)(X.copy())
    _close(aggregate("clipped_mean", M, clip_norm=2.0).estimates[0], bagg.Average()(clipped))
    _close(aggregate("trimmed_mean", M, trim=3 / 11).estimates[0], bagg.TrMean(f=3)(X))


@pytest.mark.parametrize("seed", SEEDS)
def test_byzfl_krum_uses_one_more_neighbour(seed):
    M, X = _data(seed, K=13)
    for f in (1, 2, 4):
        _close(aggregate("krum", M, f=f - 1).estimates[0], bagg.Krum(f=f)(X))
