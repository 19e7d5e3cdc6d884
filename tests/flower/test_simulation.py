"""Flower's simulation engine (Ray backend) with 7 virtual nodes for 3 rounds: equivalence, screening, accounting."""

from __future__ import annotations

import pytest

from fedlora_lite.flower import run_flower_simulation

from .conftest import assert_round_one_equivalent, tiny_config

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    import psutil

    cfg = tiny_config(tmp_path_factory.mktemp("sim"), nodes=7, rounds=3, methods=("clair", "fedavg"), save_updates=True,
                      faults={2: "nan"}, round_timeout=300.0)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = run_flower_simulation(cfg, num_cpus=2)
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(new, timeout=30)  # Ray's daemons exit shortly after ray.shutdown()
    return cfg, result, alive


def test_simulation_runs_every_round_and_leaves_nothing_behind(simulation):
    cfg, result, left = simulation
    import ray

    assert not ray.is_initialized() and not left, [p.pid for p in left]
    for m in cfg.methods:
        assert result.rounds(m) == [0, 1, 2, 3]
        assert all(len(h["accuracy"]) == 7 for h in result.history(m))
    acc = result.accuracy("fedavg")
    assert acc[-1] > acc[0] + 0.02, acc  # three rounds of federated LoRA beat the untouched base


def test_simulation_excludes_the_malformed_node_every_round(simulation):
    cfg, result, _ = simulation
    for m in cfg.methods:
        for rnd, ex in result.excluded(m).items():
            assert list(ex) == ["2"] and "NaN or Inf" in ex["2"]
            assert result.history(m)[rnd]["participants"] == [0, 1, 3, 4, 5, 6]


def test_simulation_round_one_equals_the_in_process_computation(simulation):
    cfg, result, _ = simulation
    cmp = assert_round_one_equivalent(cfg, result, "clair", atol=1e-6)
    assert any(cmp.flags_flower)


def test_simulation_bytes_match_the_adapter_sizes(simulation):
    cfg, result, _ = simulation
    floats = result.data["reference"]["uplink_floats"]
    for m in cfg.methods:
        rows = result.bytes(m)
        assert rows[1]["train_down"] < 2_000  # round 1: every node starts from the base (an empty record)
        for row in rows[1:]:
            per_node_up = row["train_up"] / 7
            assert floats * 4 <= per_node_up <= floats * 4 * 1.05
        for row in rows[2:]:  # rank-r downlink: the same size as the uplink
            assert floats * 4 <= row["train_down"] / 7 <= floats * 4 * 1.05
