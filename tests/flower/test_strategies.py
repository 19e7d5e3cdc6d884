"""The strategies' rules on synthetic uploads: exact products, Flower's own aggregators as references, CLAIR, screening."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum

from fedlora_lite.clair import ClairConfig, clair_modules
from fedlora_lite.flower.records import adapter_record, parse_adapter
from fedlora_lite.flower.strategies import ClairStrategy, DetectThenAverage, GlobalLoraStrategy, flatten_updates
from fedlora_lite.flower.strategy import RoundUpdates
from fedlora_lite.lora import LoraAdapter, LoraFactors, stack_deltas

from .helpers import REFERENCE, flower_replies, instruction, random_adapters, replies_for, reply

CLAIR = ClairConfig(rank=1, lam=1.0, threshold=0.6)  # explicit: the test must not depend on the library defaults


def _updates(adapters, examples=None):
    examples = examples or [4] * len(adapters)
    return RoundUpdates(list(range(len(adapters))), adapters, stack_deltas(adapters), torch.tensor(examples, dtype=torch.float64))


def _strategy(cls, *args, **kw):
    return cls(*args, reference=REFERENCE, downlink="exact", min_available_nodes=1, **kw)


def _flat(center):
    return torch.cat([center[n].reshape(-1) for n in sorted(center)]).numpy()


def _flower(strategy, adapters):
    arrays, _ = strategy.aggregate_train(1, flower_replies(adapters))
    return arrays.to_numpy_ndarrays()[0]


def test_fedavg_averages_exact_products_not_factors():
    adapters = random_adapters(5, seed=1)
    examples = [1, 2, 3, 4, 10]
    center = _strategy(GlobalLoraStrategy, "fedavg").combine(_updates(adapters, examples)).center
    w = torch.tensor(examples, dtype=torch.float64) / sum(examples)
    for n in REFERENCE.names:
        exact = sum(wk * a.factors[n].delta("out_in", torch.float64) for wk, a in zip(w, adapters))
        torch.testing.assert_close(center[n], exact, rtol=1e-12, atol=1e-12)
        A = sum(wk * a.factors[n].A.double() for wk, a in zip(w, adapters))
        B = sum(wk * a.factors[n].B.double() for wk, a in zip(w, adapters))
        assert (center[n] - REFERENCE.scaling * B @ A).norm() > 1e-3 * center[n].norm()  # the naive average differs


@pytest.mark.parametrize("K", [5, 6])
def test_median_matches_flower_fedmedian(K):
    adapters = random_adapters(K, seed=K, outliers=(0,))
    ours = _flat(_strategy(GlobalLoraStrategy, "median").combine(_updates(adapters)).center)
    np.testing.assert_allclose(ours, _flower(FedMedian(), adapters), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("trim", [0.1, 0.2, 0.3])
def test_trimmed_mean_matches_flower_fedtrimmedavg(trim):
    adapters = random_adapters(10, seed=3, outliers=(1, 7))
    ours = _flat(_strategy(GlobalLoraStrategy, "trimmed_mean", options={"trim": trim}).combine(_updates(adapters)).center)
    np.testing.assert_allclose(ours, _flower(FedTrimmedAvg(beta=trim), adapters), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("f", [1, 2])
def test_krum_and_multi_krum_match_flower(f):
    adapters = random_adapters(8, seed=5 + f, outliers=(2, 6))
    ours = _flat(_strategy(GlobalLoraStrategy, "krum", options={"f": f}).combine(_updates(adapters)).center)
    np.testing.assert_allclose(ours, _flower(Krum(num_malicious_nodes=f), adapters), rtol=1e-10, atol=1e-12)
    m = 8 - f
    ours = _flat(_strategy(GlobalLoraStrategy, "multi_krum", options={"f": f, "m": m}).combine(_updates(adapters)).center)
    ref = _flower(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m), adapters)  # equal weights: a plain mean
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_clair_strategy_equals_clair_modules_on_the_same_adapters():
    adapters = random_adapters(8, seed=11, outliers=(6, 7))
    out = _strategy(ClairStrategy, CLAIR).combine(_updates(adapters))
    ref = clair_modules({n: [a.factors[n] for a in adapters] for n in REFERENCE.names}, CLAIR)
    assert out.flags.tolist() == ref.flags.tolist() == [False] * 6 + [True] * 2
    for n, r in ref.iter_refined():
        torch.testing.assert_close(out.models[n], r.dense_refined().double(), rtol=0, atol=1e-6)


def test_clair_on_models_decomposes_held_model_plus_update_exactly():
    """Later rounds: CLAIR sees each node's would-be model (held factors + its upload), the same as the dense stack."""
    adapters = random_adapters(8, seed=11, outliers=(6, 7))
    held = random_adapters(8, seed=12, outliers=(6, 7))
    u = _updates(adapters)
    u.held = [{n: (h.factors[n].A, h.factors[n].B, h.factors[n].scaling) for n in REFERENCE.names} for h in held]
    out = _strategy(ClairStrategy, CLAIR).combine(u)
    dense = {n: stack_deltas(held)[n] + stack_deltas(adapters)[n] for n in REFERENCE.names}
    ref = clair_modules(dense, CLAIR)
    assert out.flags.tolist() == ref.flags.tolist() and out.flags[6:].all()
    for n, r in ref.iter_refined():
        torch.testing.assert_close(out.models[n], r.dense_refined(), rtol=0, atol=1e-6)
    upd = _strategy(ClairStrategy, CLAIR, target="update").combine(u)  # the round's updates alone: another problem
    assert upd.models is None and upd.estimates is not None


@pytest.mark.parametrize("policy", ["own", "collaborative", "unchanged"])
def test_flagged_policy(policy):
    adapters = random_adapters(8, seed=11, outliers=(6, 7))
    out = _strategy(ClairStrategy, CLAIR, flagged_policy=policy).combine(_updates(adapters))
    deltas = stack_deltas(adapters)
    for n in REFERENCE.names:
        flagged, benign = out.models[n][6:], out.models[n][:6]
        expect = {"own": deltas[n][6:], "collaborative": benign.mean(0).expand_as(flagged),
                  "unchanged": torch.zeros_like(flagged)}[policy]
        torch.testing.assert_close(flagged, expect, rtol=1e-6, atol=1e-7)


def test_detect_then_average_is_the_mean_of_the_unflagged():
    adapters = random_adapters(8, seed=11, outliers=(6, 7))
    out = _strategy(DetectThenAverage, CLAIR, weighted=False).combine(_updates(adapters))
    assert out.flags.tolist() == [False] * 6 + [True] * 2
    flat = flatten_updates(stack_deltas(adapters))
    np.testing.assert_allclose(_flat(out.center), flat[:6, :, 0].mean(0).numpy(), rtol=1e-10, atol=1e-12)


def test_aggregate_train_updates_every_node_model_exactly():
    adapters = random_adapters(6, seed=2)
    s = _strategy(GlobalLoraStrategy, "fedavg", weighted=False)
    arrays, metrics = s.aggregate_train(1, replies_for(adapters))
    mean = {n: torch.stack([a.factors[n].delta("out_in", torch.float64) for a in adapters]).mean(0) for n in REFERENCE.names}
    for n in REFERENCE.names:  # the exact downlink is the mean ΔW up to float32 rounding of the factors
        torch.testing.assert_close(s.global_model[n], mean[n], rtol=1e-5, atol=1e-6)
    assert s._round["participants"] == list(range(6)) and metrics["accuracy-local"] == pytest.approx(0.9)
    assert len(arrays) == 4


def _malformed(adapter: LoraAdapter, kind: str) -> ArrayRecord:
    rec = adapter_record(adapter)
    key = next(iter(rec.keys()))
    if kind == "nan":
        arr = rec[key].numpy().copy()
        arr[0, 0] = np.nan
        rec[key] = Array(arr)
    elif kind == "keys":
        rec[key.replace("lora_A", "lora_Z")] = rec.pop(key)
    elif kind == "rank":
        f = {n: LoraFactors(torch.cat([x.A, x.A[:1]]), torch.cat([x.B, x.B[:, :1]], 1), x.scaling) for n, x in adapter.factors.items()}
        rec = adapter_record(LoraAdapter(f, 3, adapter.alpha))
    elif kind == "int":
        rec[key] = Array(rec[key].numpy().astype(np.int64))
    return rec


def test_malformed_replies_are_excluded_and_recorded_never_crash():
    adapters = random_adapters(9, seed=4)
    good = replies_for(adapters[:4])
    bad = [reply(104, 4, _malformed(adapters[4], "nan")), reply(105, 5, _malformed(adapters[5], "keys")),
           reply(106, 6, _malformed(adapters[6], "rank")), reply(107, 7, _malformed(adapters[7], "int")),
           Message(Error(code=0, reason="ClientApp raised: boom"), reply_to=instruction(108)),
           reply(109, 9, adapter_record(adapters[8]), metrics={"partition-id": 9}),
           reply(110, 3, adapter_record(adapters[8])),                      # claims a partition already taken
           reply(111, 11, adapter_record(adapters[8]), array_key="other")]  # its adapter under another key
    s = _strategy(ClairStrategy, CLAIR)
    s.directory[108] = 8
    s._sent["train"] = [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112]
    s.directory[112] = 12                                                   # sent to, never answered
    s.aggregate_train(1, good + bad)
    ex = s._round["excluded"]
    assert s._round["participants"] == [0, 1, 2, 3] and s._round["aggregated"]
    assert "NaN or Inf" in ex["4"] and "do not match" in ex["5"] and "rank 3, expected 2" in ex["6"]
    assert "floating point" in ex["7"] and "boom" in ex["8"] and "num-examples" in ex["9"]
    assert "partition-id" in ex["node 110"] and "ArrayRecord" in ex["11"] and "no reply" in ex["12"]
    assert set(s.models) == {0, 1, 2, 3}


def test_too_few_valid_replies_keep_every_model():
    adapters = random_adapters(4, seed=4)
    s = _strategy(GlobalLoraStrategy, "fedavg")
    before = {n: t.clone() for n, t in s.global_model.items()}
    arrays, metrics = s.aggregate_train(1, replies_for(adapters[:2]) + [reply(103, 3, _malformed(adapters[3], "nan"))])
    assert arrays is None and metrics is None and not s._round["aggregated"] and "min_replies" in s._round["note"]
    assert all(torch.equal(before[n], s.global_model[n]) for n in before)


def test_parse_adapter_roundtrip_is_exact():
    a = random_adapters(1, seed=9)[0]
    content = reply(100, 0, adapter_record(a)).content
    b = parse_adapter(content, REFERENCE, "node")
    for n in REFERENCE.names:
        assert torch.equal(a.factors[n].A, b.factors[n].A) and torch.equal(a.factors[n].B, b.factors[n].B)
        assert b.factors[n].scaling == REFERENCE.scaling
