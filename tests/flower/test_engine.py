"""Whole runs on an in-process Grid (no Ray): equivalence with the in-process experiment, resume, faults, sampling."""

from __future__ import annotations

import pytest
import torch

from fedlora_lite.flower import FlowerResult, make_client_app, run_server
from fedlora_lite.flower.checkpoint import load_checkpoint

from .conftest import assert_round_one_equivalent, checkpoint_dir, saved_round, tiny_config
from .local_grid import LocalGrid


def _run(cfg, **grid_kw):
    grid = LocalGrid(make_client_app(cfg), cfg.num_nodes, **grid_kw)
    run_server(grid, cfg, engine="local")
    return FlowerResult.load(cfg.output_dir), grid


def test_one_round_reproduces_the_in_process_computation(tmp_path):
    cfg = tiny_config(tmp_path, rounds=1, methods=("clair",), save_updates=True, downlink="exact")
    result, _ = _run(cfg)
    cmp = assert_round_one_equivalent(cfg, result)
    assert any(cmp.flags_flower) and not all(cmp.flags_flower)  # a decision that could have differed
    # what each node was sent (exact downlink, float32 factors) is its refined update
    ckpt = load_checkpoint(checkpoint_dir(cfg, "clair"), {})
    _, estimates = saved_round(checkpoint_dir(cfg, "clair"))
    for p, mods in ckpt.models.items():
        for n, d in mods.items():
            ref = estimates[n][p].double()
            assert float((d - ref).abs().max()) <= 1e-6 * max(float(ref.abs().max()), 1e-12) + 1e-9


def test_resume_after_an_interruption_gives_the_uninterrupted_run(tmp_path):
    full = tiny_config(tmp_path / "full", rounds=3, methods=("clair", "fedavg"), resume=True)
    reference, _ = _run(full)
    cut = full.replace(output_dir=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        _run(cut, interrupt_at=("train", 3))  # dies in clair's round 3, after round 2 was checkpointed
    assert load_checkpoint(checkpoint_dir(cut, "clair"), {}).round == 2
    resumed, grid = _run(cut)
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == cut.num_nodes * (1 + 3)  # clair: round 3 only; fedavg: rounds 1-3
    assert any(m.metadata.message_type == "query" for m in grid.sent)  # node ids are new: asked who they are
    for m in full.methods:
        assert resumed.accuracy(m) == reference.accuracy(m)
        assert resumed.flagged(m) == reference.flagged(m)
        a = load_checkpoint(checkpoint_dir(full, m), {})
        b = load_checkpoint(checkpoint_dir(cut, m), {})
        for key in set(a.models) | set(b.models):
            assert all(torch.equal(a.models[key][n], b.models[key][n]) for n in a.models[key])


def test_faulty_nodes_and_stragglers_are_excluded_and_recorded(tmp_path):
    cfg = tiny_config(tmp_path, rounds=2, methods=("detect_average", "median"), faults={1: "rank", 3: "crash"})
    result, _ = _run(cfg, silent={2})
    for m in cfg.methods:
        assert result.rounds(m) == [0, 1, 2]
        for rnd, ex in result.excluded(m).items():
            assert "rank 5, expected 4" in ex["1"] and "injected fault" in ex["3"] and "no reply" in ex["2"]
            assert result.history(m)[rnd]["participants"] == [0, 4, 5]
        assert all(a is not None for a in result.accuracy(m))


def test_partial_participation_samples_the_same_nodes_for_every_method(tmp_path):
    cfg = tiny_config(tmp_path, rounds=2, methods=("clair", "fedavg"), fraction_train=0.5)
    result, _ = _run(cfg)
    sampled = {m: [h["sampled"] for h in result.history(m)[1:]] for m in cfg.methods}
    assert sampled["clair"] == sampled["fedavg"] and all(len(s) == 3 for s in sampled["clair"])
    # every node is evaluated every round, sampled or not
    h1, h2 = result.history("clair")[1:]
    assert len(h1["accuracy"]) == len(h2["accuracy"]) == cfg.num_nodes
    # CLAIR is personalised: a node sampled in round 1 but not in round 2 keeps its model (same held-out accuracy)
    kept = [p for p in h1["sampled"] if p not in h2["sampled"]]
    assert kept and all(h1["accuracy"][str(p)] == h2["accuracy"][str(p)] for p in kept)
    f1, f2 = result.history("fedavg")[1:]  # a global model changes for everybody
    assert any(f1["accuracy"][str(p)] != f2["accuracy"][str(p)] for p in kept)
