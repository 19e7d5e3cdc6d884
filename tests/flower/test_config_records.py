"""FlowerRunConfig as a Flower run config, and what travels in messages (downlink encoding, byte counts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedlora_lite.clair import ClairConfig
from fedlora_lite.flower import FlowerRunConfig, paper_clair_config
from fedlora_lite.flower.records import content_bytes, decode_deltas, encode_deltas
from fedlora_lite.lora import AdapterError

from .helpers import REFERENCE, replies_for, random_adapters


def test_run_config_round_trip():
    cfg = FlowerRunConfig(methods=("fedavg", "clair"), num_rounds=3, seed=4, downlink="exact", flagged_policy="unchanged",
                          fraction_train=0.5, clair=ClairConfig(rank=2, lam=0.7, threshold=0.55), faults="1:nan,3:rank",
                          method_options={"krum": {"f": 1}}, output_dir="/tmp/x")
    rc = cfg.to_run_config()
    assert all(isinstance(v, (str, int, float, bool)) for v in rc.values())  # what a Flower run config may hold
    assert FlowerRunConfig.from_run_config(rc) == cfg
    assert FlowerRunConfig.from_run_config({"num-nodes": 4, "contamination": 0.25}).num_contaminated == 1
    assert cfg.fingerprint() == cfg.replace(output_dir="/elsewhere", num_rounds=9, methods=("median",)).fingerprint()
    assert cfg.fingerprint() != cfg.replace(seed=5).fingerprint()


@pytest.mark.parametrize("bad, match", [({"bogus": 1}, "unknown run-config keys"), ({"methods": "fedavg,nope"}, "methods"),
                                        ({"faults": "x:nan"}, "faults must look like"), ({"faults": "99:nan"}, "outside"),
                                        ({"downlink": "zip"}, "downlink"), ({"min-replies": 2}, "min_replies")])
def test_bad_run_config_is_refused_with_the_reason(bad, match):
    with pytest.raises(ValueError, match=match):
        FlowerRunConfig.from_run_config(bad)


def test_paper_refinement_keeps_every_other_option():
    base = ClairConfig(rank=2, threshold=0.7)
    paper = paper_clair_config(base)
    assert paper.rank == 2 and paper.threshold == 0.7 and paper.refine in ("paper", "average")


def test_rank_downlink_is_the_truncated_svd_and_exact_downlink_is_exact():
    g = torch.Generator().manual_seed(0)
    deltas = {n: torch.randn(o, i, generator=g, dtype=torch.float64) for n, (o, i) in REFERENCE.shapes.items()}
    record, scaling, sent = encode_deltas(deltas, REFERENCE, "rank")
    assert scaling == REFERENCE.scaling and record["base_model.model.blk.a.lora_A.weight"].shape == (2, 6)
    for n, d in deltas.items():
        U, S, Vh = torch.linalg.svd(d)
        best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
        torch.testing.assert_close(sent[n], best, rtol=0, atol=1e-5)
        torch.testing.assert_close(decode_deltas(record, scaling, REFERENCE)[n], sent[n], rtol=0, atol=0)
    record, scaling, sent = encode_deltas(deltas, REFERENCE, "exact")
    for n, d in deltas.items():
        assert record[f"base_model.model.{n}.lora_A.weight"].shape[0] == min(d.shape)
        torch.testing.assert_close(sent[n], d, rtol=1e-5, atol=1e-5)
    record, _, sent = encode_deltas({n: torch.zeros_like(d) for n, d in deltas.items()}, REFERENCE, "rank")
    assert len(record) == 0 and all(not s.any() for s in sent.values())


def test_decode_refuses_a_bad_downlink():
    record, scaling, _ = encode_deltas({n: torch.ones(*s, dtype=torch.float64) for n, s in REFERENCE.shapes.items()},
                                       REFERENCE, "rank")
    bad = ArrayRecord(dict(record.items()))
    bad["base_model.model.blk.c.lora_A.weight"] = Array(np.ones((1, 2), dtype=np.float32))
    with pytest.raises(AdapterError, match="unexpected keys"):
        decode_deltas(bad, scaling, REFERENCE)
    bad = ArrayRecord(dict(record.items()))
    arr = bad["base_model.model.blk.a.lora_B.weight"].numpy().copy()
    arr[0, 0] = np.inf
    bad["base_model.model.blk.a.lora_B.weight"] = Array(arr)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        decode_deltas(bad, scaling, REFERENCE)


def test_content_bytes_are_flowers_record_counts():
    msg = replies_for(random_adapters(1))[0]
    arrays = msg.content.array_records["adapter"]
    assert content_bytes(msg) == arrays.count_bytes() + msg.content.metric_records["metrics"].count_bytes()
    assert arrays.count_bytes() >= 4 * REFERENCE.uplink_floats()
