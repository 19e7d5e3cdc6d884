"""Cached resumable attack grids (fedlora_lite.federated.grid) and the low-rank helpers (federated.lowrank)."""

import json
import math

import pytest
import torch

from fedlora_lite.clair import clair
from fedlora_lite.federated import (
    attack,
    best_rank_factors,
    factor_updates,
    fit_local,
    make_regression_federation,
    random_lora_factors,
    truncate_updates,
)
from fedlora_lite.federated.grid import (
    assumed_f_options,
    breakdown_fraction,
    cell_key,
    cell_means,
    contaminate_modules,
    evaluate_aggregators,
    regression_cell,
    run_grid,
    worst_case,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- caching and resuming


def test_cell_key_is_stable_and_depends_on_params_and_context():
    a = cell_key({"attack": "alie", "fraction": 0.2}, {"K": 10})
    assert a == cell_key({"fraction": 0.2, "attack": "alie"}, {"K": 10})  # key order does not matter
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != cell_key({"attack": "alie", "fraction": 0.3}, {"K": 10})
    assert a != cell_key({"attack": "alie", "fraction": 0.2}, {"K": 11})


class _Counter:
    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, cell):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt  # what a user's Ctrl-C or a killed kernel looks like mid-grid
        self.calls.append(dict(cell))
        return {"value": cell["x"] ** 2}


CELLS = [{"x": x} for x in range(5)]


def test_run_grid_caches_every_cell_and_skips_finished_ones(tmp_path):
    ev = _Counter()
    first = run_grid(CELLS, ev, tmp_path, context={"v": 1}, progress=False)
    assert [r["value"] for r in first] == [0, 1, 4, 9, 16] and len(ev.calls) == 5
    assert len(list(tmp_path.glob("*.json"))) == 5 and not list(tmp_path.glob("*.tmp"))
    again = _Counter()
    assert run_grid(CELLS, again, tmp_path, context={"v": 1}, progress=False) == first
    assert again.calls == []  # everything came from the cache
    changed = _Counter()
    run_grid(CELLS[:2], changed, tmp_path, context={"v": 2}, progress=False)
    assert len(changed.calls) == 2  # a changed context never reuses stale cells


def test_run_grid_resumes_after_an_interruption(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_grid(CELLS, _Counter(fail_at=3), tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.json"))) == 3
    resumed = _Counter()
    rows = run_grid(CELLS, resumed, tmp_path, progress=False)
    assert [c["x"] for c in resumed.calls] == [3, 4]
    assert [r["value"] for r in rows] == [0, 1, 4, 9, 16]


def test_run_grid_recomputes_torn_or_foreign_cache_files(tmp_path):
    run_grid(CELLS[:2], _Counter(), tmp_path, progress=False)
    torn = tmp_path / f"{cell_key(CELLS[0], None)}.json"
    torn.write_text('{"params": {"x": 0}, "res')  # a half-written file from another tool
    foreign = tmp_path / f"{cell_key(CELLS[1], None)}.json"
    foreign.write_text(json.dumps({"params": {"x": 99}, "result": {"value": -1}}))  # not this cell's parameters
    ev = _Counter()
    rows = run_grid(CELLS[:2], ev, tmp_path, progress=False)
    assert [c["x"] for c in ev.calls] == [0, 1] and [r["value"] for r in rows] == [0, 1]
    assert json.loads(foreign.read_text())["params"] == {"x": 1}


def test_run_grid_without_a_cache_directory_evaluates_everything():
    ev = _Counter()
    assert [r["value"] for r in run_grid(CELLS, ev, None, progress=False)] == [0, 1, 4, 9, 16]
    assert len(ev.calls) == 5


# ---------------------------------------------------------------- assumed f


@pytest.mark.parametrize("method,K,n,expected", [
    ("krum", 10, 3, {"f": 3}),
    ("krum", 10, 5, {"f": 3}),  # capped at Krum's bound K > 2f + 2
    ("bulyan", 10, 4, {"f": 1}),  # K >= 4f + 3
    ("mda", 10, 4, {"f": 4}),
    ("trimmed_mean", 10, 3, {"trim": 0.3}),
    ("trimmed_mean", 10, 5, {"trim": 0.4}),  # below one half
    ("nnm+trimmed_mean", 10, 3, {"f": 3, "trim": 0.3}),
    ("nnm+median", 10, 6, {"f": 4}),  # NNM needs K > 2f
    ("krum", 10, 0, {"f": 0}),
    ("fedavg", 10, 3, {}),
    ("clair", 10, 3, {}),
])
def test_assumed_f_options(method, K, n, expected):
    assert assumed_f_options(method, K, n) == expected


# ---------------------------------------------------------------- low-rank helpers


def _rank_r(K=5, d=12, p=9, r=3, seed=0):
    g = _gen(seed)
    return torch.stack([torch.randn(d, r, generator=g, dtype=torch.float64) @ torch.randn(r, p, generator=g, dtype=torch.float64)
                        for _ in range(K)])


def test_factor_updates_is_exact_for_rank_r_updates_and_refuses_larger_ranks():
    X = _rank_r()
    pairs = factor_updates(X, 3)
    assert len(pairs) == 5 and pairs[0][0].shape == (12, 3) and pairs[0][1].shape == (3, 9)
    torch.testing.assert_close(torch.stack([B @ A for B, A in pairs]), X, rtol=0, atol=1e-10)
    Y = X.clone()
    Y[2] += 1e-3 * torch.randn(12, 9, generator=_gen(1), dtype=torch.float64)
    with pytest.raises(ValueError, match="update 2 has rank > 3"):
        factor_updates(Y, 3)
    with pytest.raises(ValueError, match="module 'b'"):
        factor_updates({"a": X, "b": Y}, 3)
    assert set(factor_updates({"a": X}, 4)) == {"a"}
    with pytest.raises(ValueError, match="rank must be a positive int"):
        factor_updates(X, 0)


def test_truncation_is_the_best_rank_r_approximation_with_balanced_factors():
    M = torch.randn(1, 10, 7, generator=_gen(2), dtype=torch.float64)
    s = torch.linalg.svdvals(M[0])
    T = truncate_updates(M, 2)
    assert torch.linalg.matrix_rank(T[0]) == 2
    assert math.isclose(float((M - T).norm()), float(s[2:].norm()), rel_tol=1e-10)  # Eckart-Young
    B, A, tail = best_rank_factors(M[0], 2)
    torch.testing.assert_close(B.T @ B, A @ A.T)  # singular values split evenly
    torch.testing.assert_close(tail, s[2:])


# ---------------------------------------------------------------- contamination and evaluation


def test_contaminate_modules_replaces_only_byzantine_rows_seeded_and_rank_limited():
    mods = {"q": _rank_r(K=8, seed=0), "v": _rank_r(K=8, seed=1)}
    benign = torch.tensor([True, False, True, True, False, True, True, True])
    X = contaminate_modules("gaussian", mods, benign, seed=3, lora_rank=3)
    for n, M in mods.items():
        torch.testing.assert_close(X[n][benign], M[benign], rtol=0, atol=0)
        assert not torch.allclose(X[n][~benign], M[~benign])
        assert all(int(torch.linalg.matrix_rank(b)) == 3 for b in X[n][~benign])
    assert not torch.allclose(X["q"][1], X["v"][1])  # one derived generator per module
    again = contaminate_modules("gaussian", mods, benign, seed=3, lora_rank=3)
    assert all(torch.equal(X[n], again[n]) for n in mods)
    full = contaminate_modules("gaussian", mods, benign, seed=3)
    assert int(torch.linalg.matrix_rank(full["q"][1])) == 9
    none = contaminate_modules("gaussian", mods, torch.ones(8, dtype=torch.bool))
    assert all(torch.equal(none[n], mods[n]) for n in mods)


def _lora_federation(seed=0):
    inst = random_lora_factors(16, 12, 10, 2, shared_rank=2, contamination=0.3, heterogeneity=0.05,
                               generator=_gen(seed), dtype=torch.float64)
    return torch.stack([B @ A for B, A in inst.factors]), inst.benign


def test_evaluate_aggregators_factored_clair_equals_dense_clair():
    M, benign = _lora_federation()
    dense = evaluate_aggregators(M, benign, ["clair", "fedavg", "krum"])
    fact = evaluate_aggregators(M, benign, ["clair"], lora_rank=2)
    assert torch.equal(dense["clair"][1], fact["clair"][1])
    torch.testing.assert_close(fact["clair"][0], dense["clair"][0], rtol=1e-6, atol=1e-6)
    assert dense["fedavg"][1] is None and dense["krum"][1].shape == (10,)
    torch.testing.assert_close(dense["fedavg"][0][0], M.mean(0))
    multi = evaluate_aggregators({"a": M, "b": 2 * M}, benign, ["clair", "median"], lora_rank=2)
    assert set(multi["clair"][0]) == {"a", "b"} and multi["clair"][1].shape == (10,)
    with pytest.raises(ValueError, match="rank > 1"):
        evaluate_aggregators(M, benign, ["clair"], lora_rank=1)


def test_regression_cell_scores_benign_clients_and_detection():
    fed = make_regression_federation(12, 10, 4, 2, 0.0, noise=1.0, samples=40, similarity=0.97, seed=0)
    local = fit_local(fed)
    out = regression_cell(local, fed.theta, "sign_flip", 0.25, ["local", "fedavg", "oracle_fedavg", "krum", "median"],
                          seed=1, attack_options={"scale": 5.0})
    assert out["num_byzantine"] == 3
    assert set(out["error"]) == {"local", "fedavg", "oracle_fedavg", "krum", "median"}
    assert set(out["precision"]) == {"krum"} == set(out["recall"]) == set(out["fpr"])
    assert math.isclose(out["error"]["local"], out["local_error"], rel_tol=1e-12)
    assert out["error"]["oracle_fedavg"] < out["error"]["local"] < out["error"]["fedavg"]  # pooling helps; the attack hurts
    assert out["recall"]["krum"] == 1.0 and out["fpr"]["krum"] == 0.0
    with pytest.raises(ValueError, match="fraction"):
        regression_cell(local, fed.theta, "sign_flip", 1.2, ["fedavg"])
    with pytest.raises(ValueError, match="attack must be one of"):
        regression_cell(local, fed.theta, "nope", 0.2, ["fedavg"])


def test_adaptive_attack_with_a_lora_rank_sends_rank_r_updates_that_stay_unflagged():
    M, benign = _lora_federation(seed=1)
    H = M[benign]
    B = attack("clair_adaptive", H, 3, generator=_gen(4), rank=2)
    assert all(int(torch.linalg.matrix_rank(b)) <= 2 for b in B)
    res = clair(factor_updates(torch.cat([H, B]), 2))
    assert not bool(res.flags[H.shape[0]:].any())
    with pytest.raises(ValueError, match="rank > 1"):
        attack("clair_adaptive", H, 3, rank=1)  # the honest updates are not rank 1


# ---------------------------------------------------------------- summaries


ROWS = [
    {"attack": a, "fraction": f, "seed": s, "error": {"m": e + s, "local": 2.0 + (a == "y")}}
    for (a, f, e) in [("x", 0.1, 0.5), ("y", 0.1, 2.0), ("x", 0.3, 3.0), ("y", 0.3, 1.0)] for s in (0, 1)
]


def test_cell_means_worst_case_and_breakdown():
    means = cell_means(ROWS, "error")
    assert means["m"] == {("x", 0.1): 1.0, ("y", 0.1): 2.5, ("x", 0.3): 3.5, ("y", 0.3): 1.5}  # averaged over seeds
    worst = worst_case(means)
    assert worst["m"] == {0.1: (2.5, "y"), 0.3: (3.5, "x")}
    best = worst_case(means, higher_is_worse=False)
    assert best["m"] == {0.1: (1.0, "x"), 0.3: (1.5, "y")}
    # per cell against the reference: at 0.1, m = 2.5 under y is below local's 3.0 under y -> not broken; at 0.3 x breaks it
    assert breakdown_fraction(means, "m") == (0.3, "x")
    assert breakdown_fraction(means, "local", "m") == (0.1, "x")
    assert breakdown_fraction(means, "m", higher_is_worse=False) == (0.1, "x")  # x is 1.0 below local, y 0.5
    assert breakdown_fraction(means, "m", "m") is None  # equal is not worse
    assert breakdown_fraction(means, "m", margin=1.0) == (0.3, "x")  # 3.5 - 2.0 > 1.0
    assert breakdown_fraction(means, "m", margin=1.5) is None
    assert cell_means(ROWS, "error", by=("fraction",))["local"] == {(0.1,): 2.5, (0.3,): 2.5}
    with pytest.raises(ValueError, match="metric must be one of"):
        cell_means(ROWS, "accuracy")
    with pytest.raises(ValueError, match="known"):
        breakdown_fraction(means, "nope")
