"""Tests of LoRA-native (factored) CLAIR: exact agreement with the dense path (objective,
flags, subspace, refined updates), refined-factor structure, re-truncation, the streamed
whole-model API, the randomized-SVT accuracy check and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlora_lite.clair import (
    AUTO_RANK_HINT_MIN,
    RefinedFactors,
    clair,
    clair_factored,
    clair_factored_modules,
    clair_modules,
)
from fedlora_lite.core import decompose, reduce_factors, truncate_factors
from fedlora_lite.federated import random_lora_factors

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RAGGED = [3, 4, 3, 5, 3, 3, 4, 3, 3, 4]


def _instance(seed=1, d=40, p=30, ranks=RAGGED, het=0.05, side="column", dtype=torch.float64):
    """Random LoRA federation; side="row" transposes it so that the clients share input directions."""
    g = torch.Generator().manual_seed(seed)
    if side == "column":
        inst = random_lora_factors(d, p, len(ranks), ranks, shared_rank=2, contamination=0.3, heterogeneity=het,
                                   generator=g, dtype=dtype)
        return inst.factors, inst.benign
    inst = random_lora_factors(p, d, len(ranks), ranks, shared_rank=2, contamination=0.3, heterogeneity=het,
                               generator=g, dtype=dtype)
    return [(A.T, B.T) for B, A in inst.factors], inst.benign


def _dense(factors):
    return torch.stack([B @ A for B, A in factors])


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _projector(U):
    return U @ U.T


@pytest.mark.parametrize("refine", ["average", "project"])
@pytest.mark.parametrize("mu", [None, 0.05, "auto"], ids=["exact", "noisy", "auto"])
@pytest.mark.parametrize("side", ["column", "row"])
def test_factored_equals_dense(side, mu, refine):
    factors, benign = _instance(side=side)
    dense = clair(_dense(factors), mu=mu, side=side, refine=refine)
    fac = clair_factored(factors, mu=mu, side=side, refine=refine, return_dense=True)
    assert dense.flags.tolist() == fac.flags.tolist() == (~benign).tolist()
    assert fac.decomposition.objective == pytest.approx(dense.decomposition.objective, rel=1e-6)
    assert fac.lam == pytest.approx(dense.lam, rel=1e-12)
    assert fac.rank == dense.rank == 2
    assert torch.allclose(fac.scores, dense.scores, atol=1e-6)
    assert _rel(_projector(fac.subspace), _projector(dense.subspace)) < 1e-6
    assert _rel(fac.refined_updates, dense.refined_updates) < 1e-6
    assert _rel(torch.stack([B @ A for B, A in fac.refined_factors]), dense.refined_updates) < 1e-6
    assert fac.singular_values.shape == dense.singular_values.shape


def test_reduction_is_an_exact_isometry():
    factors, _ = _instance(seed=2)
    M = _dense(factors)
    red = reduce_factors(factors)
    assert red.q == min(40, sum(RAGGED)) and red.block_sizes == tuple(RAGGED)
    assert torch.allclose(red.Q.T @ red.Q, torch.eye(red.q, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(red.lift(torch.cat(red.blocks, dim=1)), M, atol=1e-12)
    dense_dec = decompose(list(M), lam=0.9)
    small_dec = decompose(list(red.blocks), lam=0.9)
    assert small_dec.objective == pytest.approx(dense_dec.objective, rel=1e-8)
    assert torch.allclose(small_dec.block_norms, dense_dec.block_norms, atol=1e-7)
    assert _rel(torch.cat(list(red.lift(small_dec.L)), dim=1), dense_dec.L) < 1e-6
    with pytest.raises(ValueError, match="X must have shape"):
        red.lift(torch.zeros(3, 3, dtype=torch.float64))


def test_solver_keeps_the_compact_svd_of_L():
    factors, _ = _instance(seed=3)
    dec = decompose(list(reduce_factors(factors).blocks))
    U, s, Vh = dec.L_svd
    assert torch.allclose((U * s) @ Vh, dec.L, atol=1e-12)
    assert U.shape[1] == s.numel() >= dec.rank and bool((s[:-1] >= s[1:]).all())


def test_refined_factor_structure_and_ranks():
    factors, benign = _instance(seed=4, het=0.0)
    res = clair_factored(factors, refine="paper")  # (w_in, w_off) = (1, 0): one shared off-subspace component
    m_C = sum(r for r, b in zip(RAGGED, benign) if b)
    for k, ((B, A), (B0, A0)) in enumerate(zip(res.refined_factors, factors)):
        if benign[k]:
            assert B.shape[1] == RAGGED[k] + min(m_C, 30) and A.shape[0] == B.shape[1]
        else:  # flagged clients get their own factors back
            assert torch.equal(B, B0) and torch.equal(A, A0)
    assert res.refined_factors.ranks == [B.shape[1] for B, _ in res.refined_factors]
    adaptive = clair_factored(factors)  # both shared components may be used
    assert all(w <= RAGGED[k] + 2 * min(m_C, 30) for k, w in enumerate(adaptive.refined_factors.ranks))
    proj = clair_factored(factors, refine="project")
    for k, (B, A) in enumerate(proj.refined_factors):
        assert B.shape == factors[k][0].shape and A.shape == factors[k][1].shape  # LoRA shapes kept
    assert res.refined_updates is None and len(res.refined_factors) == len(factors)
    assert res.refined_factors[-1][0].shape == res.refined_factors[len(factors) - 1][0].shape
    with pytest.raises(IndexError, match=f"client index {len(factors)} out of range"):
        res.refined_factors[len(factors)]


def test_truncate_factors_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(5)
    B = torch.randn(50, 12, generator=g, dtype=torch.float64)
    A = torch.randn(12, 35, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(B @ A)
    B3, A3 = truncate_factors(B, A, 3)
    assert B3.shape == (50, 3) and A3.shape == (3, 35)
    err = torch.linalg.norm(B @ A - B3 @ A3)
    assert float(err) == pytest.approx(float(s[3:].pow(2).sum().sqrt()), rel=1e-10)  # Eckart-Young
    assert torch.allclose(torch.linalg.norm(B3, dim=0), torch.linalg.norm(A3, dim=1))  # balanced split
    # rank=None is an exact compression to the numerical rank
    low = torch.cat([B[:, :4], B[:, :4] @ torch.randn(4, 8, generator=g, dtype=torch.float64)], dim=1)
    Bc, Ac = truncate_factors(low, A)
    assert Bc.shape[1] == 4 and torch.allclose(Bc @ Ac, low @ A, atol=1e-10)
    with pytest.raises(ValueError, match="rank"):
        truncate_factors(B, A, 0)
    with pytest.raises(ValueError, match="inner dimensions"):
        truncate_factors(B, A.T)


def test_refined_factors_truncated():
    factors, benign = _instance(seed=6, het=0.1)
    ref = clair_factored(factors).refined_factors
    trunc = ref.truncated(4)
    for (B, A), (Bt, At) in zip(ref, trunc):
        assert Bt.shape[1] <= 4
        s = torch.linalg.svdvals(B @ A)
        assert float(torch.linalg.norm(B @ A - Bt @ At)) == pytest.approx(float(s[4:].pow(2).sum().sqrt()), rel=1e-8)
    cheap = ref.truncated(4, shared_rank=2)
    dense_ref = ref.dense()
    for k, (Bt, At) in enumerate(cheap):  # an approximation, but close to the exact truncation
        assert _rel(Bt @ At, dense_ref[k]) < 0.5


def test_factored_modules_match_dense_modules():
    mods = {"q": _instance(seed=7)[0], "v": _instance(seed=8, d=25, p=35)[0]}
    dense = clair_modules({n: _dense(f) for n, f in mods.items()})
    fac = clair_factored_modules(mods)
    assert fac.flags.tolist() == dense.flags.tolist()
    assert torch.allclose(fac.scores, dense.scores.double().cpu(), atol=1e-6)
    refined = dict(fac.iter_refined())
    assert list(refined) == ["q", "v"]
    for name in mods:
        summ = fac.per_module[name]
        assert summ.rank == dense.per_module[name].rank
        assert _rel(_projector(summ.subspace), _projector(dense.per_module[name].subspace)) < 1e-6
        assert _rel(refined[name].refined_factors.dense(), dense.per_module[name].refined_updates) < 1e-6
        assert isinstance(refined[name].refined_factors, RefinedFactors)
    assert _rel(fac.module("v").refined_factors.dense(), dense.per_module["v"].refined_updates) < 1e-6


def test_streaming_source_is_read_twice_and_checked():
    calls = []

    offset = {"seed": 10}

    def source():
        calls.append(1)
        for i in range(3):
            yield f"layer{i}", _instance(seed=offset["seed"] + i)[0]

    res = clair_factored_modules(source, threshold=0.5)  # the paper's rule: one fit pass
    assert len(calls) == 1 and list(res.per_module) == ["layer0", "layer1", "layer2"]
    names = [n for n, _ in res.iter_refined()]
    assert names == ["layer0", "layer1", "layer2"] and len(calls) == 2
    calls.clear()
    auto = clair_factored_modules(source)  # threshold="auto" re-reads the source for its residuals
    assert 2 <= len(calls) <= 3 and auto.flags.tolist() == clair_factored_modules(dict(source())).flags.tolist()

    offset["seed"] = 20  # the source now replays other data
    with pytest.raises(ValueError, match="differ from the first pass"):
        list(res.iter_refined())


def test_randomized_svt_accuracy_check():
    """Documented accuracy check: on a reduced problem above AUTO_RANK_HINT_MIN, the default
    randomized (warm-started) SVT gives the full-SVD answer to near machine precision."""
    g = torch.Generator().manual_seed(11)
    inst = random_lora_factors(400, 300, 32, 10, shared_rank=4, contamination=0.25, heterogeneity=0.2,
                               generator=g, dtype=torch.float64)
    assert min(320, 320) >= AUTO_RANK_HINT_MIN
    full = clair_factored(inst.factors, svd_rank_hint=None)
    fast = clair_factored(inst.factors)  # auto hint = max r_k
    assert fast.flags.tolist() == full.flags.tolist() == (~inst.benign).tolist()
    assert fast.decomposition.objective == pytest.approx(full.decomposition.objective, rel=1e-10)
    assert _rel(_projector(fast.subspace), _projector(full.subspace)) < 1e-8
    assert _rel(fast.decomposition.L, full.decomposition.L) < 1e-8


@pytest.mark.parametrize("device", DEVICES)
def test_float32_numpy_scaling_and_lora_objects(device):
    factors, benign = _instance(seed=12, het=0.0, dtype=torch.float32)
    factors = [(B.to(device), A.to(device)) for B, A in factors]
    res = clair_factored(factors, lam=0.9)  # fixed lam: float32 rounding changes numerical ranks in float64
    assert res.subspace.dtype == torch.float32 and res.subspace.device.type == device
    assert res.flags.tolist() == (~benign).tolist()
    ref64 = clair_factored([(B.double().cpu(), A.double().cpu()) for B, A in factors], lam=0.9)
    assert res.decomposition.objective == pytest.approx(ref64.decomposition.objective, rel=1e-4)
    as_numpy = clair_factored([(B.cpu().numpy(), A.cpu().numpy()) for B, A in factors], lam=0.9)
    assert as_numpy.flags.tolist() == res.flags.tolist()

    class Lora:  # duck-typed like fedlora_lite.lora.LoraFactors
        def __init__(self, B, A, scaling):
            self.B, self.A, self.scaling = B, A, scaling

    half = [(2.0 * B, A) for B, A in factors]
    with_objects = clair_factored([Lora(B, A, 0.5) for B, A in half], lam=0.9)
    with_scaling = clair_factored(half, scaling=[0.5] * len(half), lam=0.9)
    for other in (with_objects, with_scaling):
        assert other.decomposition.objective == pytest.approx(res.decomposition.objective, rel=1e-5)


def test_random_lora_factors():
    inst = random_lora_factors(20, 15, 10, [4, 5] * 5, shared_rank=3, contamination=0.3)
    assert int((~inst.benign).sum()) == 3 and inst.U.shape == (20, 3)
    assert [B.shape for B, _ in inst.factors][:2] == [(20, 4), (20, 5)]
    assert inst.factors[0][1].shape == (4, 15)
    with pytest.raises(ValueError, match="shared_rank"):
        random_lora_factors(20, 15, 10, 2, shared_rank=3)


@pytest.mark.parametrize(
    ("factors", "kwargs", "error", "match"),
    [
        ("BA", {}, TypeError, "sequence of"),
        ([(torch.ones(4, 2), torch.ones(2, 3))] * 2, {}, ValueError, "at least 3 clients"),
        ([(torch.ones(4, 2), torch.ones(2, 3))] * 3 + [torch.ones(4, 3)], {}, TypeError, r"factors\[3\] must be a pair"),
        ([(torch.ones(4, 2), torch.ones(3, 3))] * 3, {}, ValueError, r"factors\[0\]: B is \(4, 2\)"),
        ([(torch.ones(4, 2), torch.ones(2, 3))] * 2 + [(torch.ones(5, 2), torch.ones(2, 3))], {}, ValueError,
         r"factors\[2\] gives a 5 x 3"),
        ([(torch.ones(4, 2), torch.ones(2, 3))] * 2 + [(torch.ones(4, 2), torch.ones(2, 4))], {}, ValueError,
         r"factors\[2\] gives a 4 x 4"),
        ([(torch.ones(4, 2), torch.ones(2, 3))] * 2 + [(torch.full((4, 2), math.nan), torch.ones(2, 3))], {},
         ValueError, "NaN or Inf"),
        ([(torch.ones(4, 2), "A")] * 3, {}, TypeError, r"factors\[0\]\[1\] \(A\)"),
        ([(torch.eye(6, 1), torch.eye(1, 3))] * 3, {"rank": 4}, ValueError, "exceeds q=3"),
        ([(torch.eye(4, 2), torch.eye(2, 3))] * 3, {"rank": 0}, ValueError, "rank must be"),
        ([(torch.eye(4, 2), torch.eye(2, 3))] * 3, {"scaling": [1.0, 2.0]}, ValueError, "scaling has 2"),
        ([(torch.eye(4, 2), torch.eye(2, 3))] * 3, {"scaling": -1.0}, ValueError, "scaling must be"),
        ([(torch.eye(4, 2), torch.eye(2, 3))] * 3, {"side": "left"}, ValueError, "side must be"),
        ([(torch.eye(4, 2), torch.eye(2, 3))] * 3, {"refine": "mean"}, ValueError, "refine must be"),
        ([(torch.eye(4, 2), torch.eye(2, 3))] * 3, {"threshold": 1.5}, ValueError, "threshold"),
        ([(torch.eye(4, 2), torch.eye(2, 3))] * 3, {"mu": "guess"}, ValueError, "mu must be"),
    ],
)
def test_bad_factors_name_the_argument(factors, kwargs, error, match):
    with pytest.raises(error, match=match):
        clair_factored(factors, **kwargs)


def test_bad_module_inputs():
    good = _instance(seed=13)[0]
    with pytest.raises(TypeError, match="updates_by_module must be"):
        clair_factored_modules([good])
    with pytest.raises(ValueError, match="must be a non-empty mapping"):
        clair_factored_modules({})
    with pytest.raises(ValueError, match=r"updates_by_module\['b'\] has 3 clients, expected 10"):
        clair_factored_modules({"a": good, "b": good[:3]})
    with pytest.raises(ValueError, match="yielded no module"):
        clair_factored_modules(lambda: iter(()))
    with pytest.raises(ValueError, match=r"updates_by_module\['a'\]\[0\]"):
        clair_factored_modules({"a": [(np.ones((4, 2)), np.ones((3, 3)))] * 3})
    res = clair_factored_modules({"a": good})
    with pytest.raises(KeyError, match="unknown module"):
        res.module("b")
