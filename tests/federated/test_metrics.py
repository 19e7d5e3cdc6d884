"""Tests for fedlora_lite.federated.metrics on hand-made cases with known answers."""

import math

import numpy as np
import pytest
import torch

from fedlora_lite.federated import (
    detection_metrics,
    principal_angle_sines,
    refinement_gain,
    relative_errors,
    sin_theta,
)


def _e(d, *idx, dtype=torch.float64):
    out = torch.zeros(d, len(idx), dtype=dtype)
    for j, i in enumerate(idx):
        out[i, j] = 1.0
    return out


def test_sin_theta_zero_for_the_same_subspace_in_another_basis():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64))
    mix = torch.randn(3, 3, generator=g, dtype=torch.float64)  # not orthonormal
    assert sin_theta(U @ mix, U) < 1e-12


@pytest.mark.parametrize("angle", [1e-9, 1e-4, 0.3, math.pi / 2])
def test_sin_theta_known_angle_including_tiny_ones(angle):
    U = _e(5, 0, 2)
    U_hat = U.clone()
    U_hat[:, 0] = math.cos(angle) * U[:, 0]
    U_hat[1, 0] = math.sin(angle)
    assert sin_theta(U_hat, U) == pytest.approx(math.sin(angle), rel=1e-6, abs=1e-15)
    assert sin_theta(U, U_hat) == pytest.approx(math.sin(angle), rel=1e-6, abs=1e-15)


def test_principal_angle_sines_lists_all_angles():
    U = _e(4, 0, 1)
    U_hat = torch.zeros(4, 2, dtype=torch.float64)
    U_hat[0, 0] = 1.0  # shares e1
    U_hat[1, 1], U_hat[2, 1] = math.cos(0.5), math.sin(0.5)  # tilted from e2 by 0.5 rad
    sines = principal_angle_sines(U_hat, U)
    torch.testing.assert_close(sines, torch.tensor([math.sin(0.5), 0.0], dtype=torch.float64))


def test_sin_theta_with_different_ranks():
    U = _e(6, 0, 1, 2)
    assert sin_theta(_e(6, 0, 1), U) == 1.0  # misses a direction
    assert sin_theta(_e(6, 0, 1), U, one_sided=True) == 1.0
    assert sin_theta(_e(6, 0, 1, 2, 3), U) == 1.0  # spurious direction
    assert sin_theta(_e(6, 0, 1, 2, 3), U, one_sided=True) < 1e-15  # but covers U
    assert sin_theta(_e(6, 0, 1, 3, 4), U, one_sided=True) == pytest.approx(1.0)
    assert sin_theta(torch.zeros(6, 3, dtype=torch.float64), U) == 1.0  # empty estimate


def test_rank_deficient_estimate_spans_fewer_directions():
    U_hat = torch.cat([_e(5, 0), _e(5, 0)], dim=1)  # two equal columns: a 1-D span
    assert sin_theta(U_hat, _e(5, 0)) < 1e-15
    assert sin_theta(U_hat, _e(5, 0, 1)) == 1.0


def test_sin_theta_input_errors():
    with pytest.raises(ValueError, match="rows"):
        sin_theta(_e(5, 0), _e(6, 0))
    with pytest.raises(ValueError, match="U_hat"):
        sin_theta(torch.full((5, 1), float("nan")), _e(5, 0))
    with pytest.raises(TypeError, match="U"):
        sin_theta(_e(5, 0), [[1.0]])


def test_sin_theta_accepts_numpy_and_float32():
    U = _e(5, 0, 1)
    assert sin_theta(U.numpy(), U.float()) < 1e-6


def test_detection_metrics_hand_case():
    flags = torch.tensor([True, True, False, False, True, False])
    truth = torch.tensor([True, False, True, False, True, False])
    m = detection_metrics(flags, truth)
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 1, 2)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 / 3) and m.fpr == pytest.approx(1 / 3)
    assert not m.exact


def test_detection_metrics_perfect_and_accepts_lists_and_numpy():
    m = detection_metrics([True, False, False], np.array([True, False, False]))
    assert (m.precision, m.recall, m.f1, m.fpr, m.exact) == (1.0, 1.0, 1.0, 0.0, True)


@pytest.mark.parametrize(
    "flags,truth,expected",
    [
        ([0, 0, 0], [0, 0, 0], (1.0, 1.0, 1.0, 0.0, True)),  # nothing to find, nothing flagged
        ([0, 0, 0], [1, 0, 0], (1.0, 0.0, 0.0, 0.0, False)),  # missed everything
        ([1, 0, 0], [0, 0, 0], (0.0, 1.0, 0.0, 1 / 3, False)),  # false alarm only
        ([1, 1, 1], [1, 1, 1], (1.0, 1.0, 1.0, 0.0, True)),  # everyone contaminated: fpr 0/0 -> 0
        ([0, 0, 0], [1, 1, 1], (1.0, 0.0, 0.0, 0.0, False)),
    ],
)
def test_detection_metrics_zero_division_conventions(flags, truth, expected):
    m = detection_metrics(torch.tensor(flags, dtype=torch.bool), torch.tensor(truth).bool())
    assert (m.precision, m.recall, m.f1, m.fpr, m.exact) == expected


def test_detection_metrics_errors():
    with pytest.raises(ValueError, match="match"):
        detection_metrics([True, False], [True, False, False])
    with pytest.raises(TypeError, match="flags"):
        detection_metrics(torch.tensor([0.2, 0.9]), [True, False])
    with pytest.raises(ValueError, match="contaminated"):
        detection_metrics([True], torch.ones(1, 1, dtype=torch.bool))


def test_relative_errors_hand_case():
    truth = torch.stack([torch.eye(2), 2 * torch.eye(2), torch.ones(2, 2)]).double()
    est = truth.clone()
    est[0, 0, 0] += 0.5  # ||E|| = 0.5, ||T|| = sqrt(2)
    est[1] = 0.0  # relative error 1
    torch.testing.assert_close(relative_errors(est, truth), torch.tensor([0.5 / math.sqrt(2), 1.0, 0.0], dtype=torch.float64))


def test_relative_errors_errors():
    truth = torch.ones(3, 2, 2)
    with pytest.raises(ValueError, match="shape"):
        relative_errors(torch.ones(3, 2, 3), truth)
    truth[1] = 0.0
    with pytest.raises(ValueError, match="zero-norm clients \\[1\\]"):
        relative_errors(torch.ones(3, 2, 2), truth)
    with pytest.raises(ValueError, match="estimates"):
        relative_errors(torch.full((3, 2, 2), float("inf")), torch.ones(3, 2, 2))


def test_refinement_gain_sign_ratio_and_mask():
    local = torch.tensor([0.4, 0.2, 0.9])
    method = torch.tensor([0.1, 0.1, 5.0])
    g = refinement_gain(local, method, torch.tensor([True, True, False]))
    assert (g.local, g.method, g.num_clients) == (pytest.approx(0.3), pytest.approx(0.1), 2)
    assert g.gain == pytest.approx(0.2) and g.ratio == pytest.approx(1 / 3)
    worse = refinement_gain(local, method)  # client 2 dominates: the method loses on average
    assert worse.gain < 0 and worse.ratio > 1


def test_refinement_gain_edge_cases():
    assert refinement_gain([0.0, 0.0], [0.0, 0.0]).ratio == 1.0
    assert refinement_gain([0.0], [0.1]).ratio == math.inf
    with pytest.raises(ValueError, match="no client"):
        refinement_gain([0.1, 0.2], [0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="equal length"):
        refinement_gain([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="finite"):
        refinement_gain([0.1, float("nan")], [0.1, 0.2])
