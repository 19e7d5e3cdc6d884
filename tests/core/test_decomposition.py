"""Tests of the low-rank + block-sparse solver: optimality (vs cvxpy), proximal maps,
warm starts, dtypes/devices, lam selection and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlora_lite.clair import select_lambda
from fedlora_lite.core import (
    block_frobenius_norms,
    block_soft_threshold,
    decompose,
    decomposition_objective,
    default_lambda,
    singular_value_threshold,
)

cp = pytest.importorskip("cvxpy", reason="cvxpy is a test dependency: pip install -e '.[test]'")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _instance(seed: int, K: int = 8, d: int = 10, p: int = 3, r: int = 2, bad: int = 2, noise: float = 0.05):
    """Low-rank benign blocks plus `bad` full-rank blocks, a little noise everywhere."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((d, r)))[0]
    blocks = [U @ rng.standard_normal((r, p)) + noise * rng.standard_normal((d, p)) for _ in range(K)]
    for k in range(bad):
        blocks[k] = rng.standard_normal((d, p)) * np.linalg.norm(blocks[-1]) / math.sqrt(d * p)
    return blocks


def _cvxpy_solve(blocks, lam, mu):
    M = np.concatenate(blocks, axis=1)
    d, n = M.shape
    p = blocks[0].shape[1]
    L, S = cp.Variable((d, n)), cp.Variable((d, n))
    block = sum(cp.norm(S[:, k * p : (k + 1) * p], "fro") for k in range(len(blocks)))
    if mu is None:
        prob = cp.Problem(cp.Minimize(cp.normNuc(L) + lam * block), [L + S == M])
    else:
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(M - L - S) + mu * (cp.normNuc(L) + lam * block)))
    prob.solve(solver=cp.CLARABEL)
    assert prob.status == "optimal"
    return prob.value, S.value


def _flags(S, blocks, p):
    return [np.linalg.norm(S[:, k * p : (k + 1) * p]) / np.linalg.norm(b) > 0.5 for k, b in enumerate(blocks)]


@pytest.mark.parametrize("mu", [None, 0.3], ids=["exact", "noisy"])
@pytest.mark.parametrize("seed", range(5))
def test_matches_generic_convex_solver(seed, mu):
    blocks = _instance(seed)
    lam = 0.7
    ref_value, ref_S = _cvxpy_solve(blocks, lam, mu)
    dec = decompose([torch.tensor(b) for b in blocks], lam=lam, mu=mu)
    assert dec.converged
    assert abs(dec.objective - ref_value) <= 1e-4 * abs(ref_value)
    ours = _flags(dec.S.numpy(), blocks, 3)
    assert ours == _flags(ref_S, blocks, 3)
    assert sum(ours) == 2  # and both find the two planted contaminated blocks


def test_objective_is_reported_consistently():
    blocks = [torch.tensor(b) for b in _instance(1)]
    for mu in (None, 0.2):
        dec = decompose(blocks, lam=0.8, mu=mu)
        M = torch.cat(blocks, dim=1)
        assert dec.objective == pytest.approx(decomposition_objective(dec.L, dec.S, M, dec.block_sizes, 0.8, mu), rel=1e-12)
    dec = decompose(blocks, lam=0.8)
    assert dec.primal_residual < 1e-8
    assert torch.allclose(dec.L + dec.S, torch.cat(blocks, dim=1), atol=1e-7)


def test_singular_value_threshold_is_the_prox():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 20, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(X)
    tau = float(s[3])
    Y, rank, nuc = singular_value_threshold(X, tau)
    assert rank == 3
    assert torch.allclose(torch.linalg.svdvals(Y)[:3], s[:3] - tau, atol=1e-10)
    assert nuc == pytest.approx(float((s[:3] - tau).sum()))
    # randomized path with a rank hint gives the same prox on a large low-rank-plus-small matrix
    A = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 400, generator=g, dtype=torch.float64)
    A = A + 0.01 * torch.randn(300, 400, generator=g, dtype=torch.float64)
    full, r_full, _ = singular_value_threshold(A, 1.0)
    fast, r_fast, _ = singular_value_threshold(A, 1.0, rank_hint=5)
    assert r_full == r_fast == 5
    assert torch.linalg.matrix_norm(full - fast) <= 1e-6 * torch.linalg.matrix_norm(full)
    # a hint that is too small falls back to the exact full SVD
    low, r_low, _ = singular_value_threshold(A, 1e-6, rank_hint=2)
    assert r_low == 300 and torch.allclose(low, singular_value_threshold(A, 1e-6)[0])


def test_block_soft_threshold_shrinks_whole_blocks():
    X = torch.cat([torch.full((2, 2), 1.0), torch.full((2, 3), 0.1)], dim=1).double()
    idx = torch.tensor([0, 0, 1, 1, 1])
    norms = block_frobenius_norms(X, idx, 2)
    assert torch.allclose(norms, torch.tensor([2.0, math.sqrt(0.06)], dtype=torch.float64))
    Y = block_soft_threshold(X, 1.0, idx, 2)
    assert torch.allclose(Y[:, :2], X[:, :2] * 0.5)  # norm 2 -> 1
    assert torch.all(Y[:, 2:] == 0)  # norm below tau -> the whole block vanishes


def test_ragged_block_widths_and_warm_start():
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(15, 2, generator=g, dtype=torch.float64))
    blocks = [U @ torch.randn(2, w, generator=g, dtype=torch.float64) for w in (1, 2, 3, 4, 2, 3)]
    blocks.append(torch.randn(15, 3, generator=g, dtype=torch.float64))
    cold = decompose(blocks)
    assert cold.block_sizes == (1, 2, 3, 4, 2, 3, 3)
    assert [b.shape[1] for b in cold.S_blocks] == [1, 2, 3, 4, 2, 3, 3]
    assert int(torch.argmax(cold.block_norms)) == 6 and cold.rank == 2
    warm = decompose(blocks, init=cold)
    assert warm.iterations < cold.iterations
    assert warm.objective == pytest.approx(cold.objective, rel=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_devices(dtype, device):
    blocks = torch.tensor(np.stack(_instance(4)), dtype=dtype, device=device)
    dec = decompose(blocks, lam=0.7)
    assert dec.L.dtype == dtype and dec.L.device.type == device
    assert dec.converged
    ref = decompose(blocks.double().cpu(), lam=0.7)
    assert dec.objective == pytest.approx(ref.objective, rel=1e-4)


def test_numpy_and_integer_input():
    blocks = [np.eye(4, 2, dtype=np.int64) * (k + 1) for k in range(4)]
    dec = decompose(blocks, lam=1.0)
    assert dec.L.dtype == torch.float64
    assert dec.rank == 2


def test_zero_input_is_a_zero_decomposition():
    dec = decompose(torch.zeros(4, 5, 2))
    assert dec.converged and dec.rank == 0 and float(dec.block_norms.sum()) == 0.0


def test_default_lambda_is_invariant_to_padding_and_rotation():
    blocks = [torch.tensor(b) for b in _instance(2, K=10, d=12, p=4)]
    lam = default_lambda(blocks)
    assert 0.2 < lam < 2.0
    Q, _ = torch.linalg.qr(torch.randn(30, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rotated = [Q @ b for b in blocks]  # embed in a larger ambient space
    padded = [torch.cat([b, torch.zeros(12, 3, dtype=b.dtype)], dim=1) for b in blocks]
    assert default_lambda(rotated) == pytest.approx(lam, rel=1e-12)
    assert default_lambda(padded) == pytest.approx(lam, rel=1e-12)


def test_select_lambda_recovers_the_planted_set():
    blocks = [torch.tensor(b) for b in _instance(5, K=12, d=20, p=4, bad=3, noise=0.0)]
    path = select_lambda(blocks)
    assert path.flagged[path.chosen_index] == (0, 1, 2)
    assert path.grid[0] < path.chosen < path.grid[-1]
    assert path.flagged[0] == tuple(range(12))  # tiny lam: everything is "contamination"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocks": [torch.ones(3, 2)] * 2}, "at least 3 clients"),
        ({"blocks": [torch.ones(3, 2), torch.ones(3, 2), torch.ones(4, 2)]}, r"blocks\[2\] has 4 rows"),
        ({"blocks": [torch.ones(3, 2), torch.ones(3, 2), torch.tensor([[1.0, float("nan")]] * 3)]}, "NaN or Inf"),
        ({"blocks": torch.ones(3, 3, 2), "lam": -1.0}, "lam must be"),
        ({"blocks": torch.ones(3, 3, 2), "mu": 0.0}, "mu must be"),
        ({"blocks": torch.ones(3, 3, 2), "max_iter": 0}, "max_iter"),
        ({"blocks": torch.ones(3, 3, 2), "tol": float("inf")}, "tol must be"),
        ({"blocks": torch.ones(3, 3, 2), "svd_rank_hint": 0}, "svd_rank_hint"),
        ({"blocks": torch.ones(3, 3)}, r"\(K, d, p\)"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decompose(**kwargs)


def test_bad_types_and_init():
    with pytest.raises(TypeError, match="blocks"):
        decompose("not a matrix")
    with pytest.raises(TypeError, match="init"):
        decompose(torch.ones(3, 3, 2), init="warm")
    other = decompose(torch.rand(3, 3, 2))
    with pytest.raises(ValueError, match="init has shape"):
        decompose(torch.rand(4, 3, 2), init=other)


def test_select_lambda_without_contamination_falls_back_to_the_default():
    blocks = [torch.tensor(b) for b in _instance(6, K=12, d=20, p=4, bad=0, noise=0.0)]
    path = select_lambda(blocks)
    assert path.chosen == pytest.approx(default_lambda(blocks))
    assert path.flagged[path.chosen_index] == ()
