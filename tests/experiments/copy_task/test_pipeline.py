"""Tests for the end-to-end federated copy pipeline (fedlora_lite.experiments.copy_task.pipeline)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedlora_lite.clair import ClairConfig
from fedlora_lite.core import make_generator
from fedlora_lite.experiments.copy_task import (
    CopyTaskConfig,
    Evaluator,
    ExperimentConfig,
    LocalTrainingConfig,
    load_base,
    make_client_pool,
    run_copy_experiment,
    train_local_adapters,
)
from fedlora_lite.lora import (
    AdapterError,
    LoraAdapter,
    LoraFactors,
    apply_deltas,
    screen_adapters,
    stack_deltas,
)

LETTERS = "abcdefghijklmnop"


@pytest.fixture(scope="module", autouse=True)
def _single_thread_module():
    # a 0.4M-parameter model: one thread is as fast, and avoids oversubscribing a shared CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base():
    return load_base()


def _tiny(tmp_path, **overrides) -> ExperimentConfig:
    task = CopyTaskConfig(num_clients=6, contamination=0.34, letters=LETTERS, num_shared=4, focus_size=4,
                          focus_mass=0.3, train_size=(3, 4), eval_size=6, val_size=2, length=(6, 10))
    kw = dict(task=task, local=LocalTrainingConfig(steps=4), seeds=(0,), sweep=(), exact_match_size=2,
              exact_match_methods=("local", "fedavg", "oracle_fedavg", "median", "krum", "clair"),
              methods=("local", "fedavg", "oracle_fedavg", "median", "krum", "trimmed_mean", "detect_average", "clair"),
              refactor_rank=2,
              output_dir=str(tmp_path), device="cpu", progress=False)
    kw.update(overrides)
    return ExperimentConfig(**kw)


def test_tiny_pipeline_runs_end_to_end_and_second_run_hits_the_cache(tmp_path):
    cfg = _tiny(tmp_path)
    res = run_copy_experiment(cfg)
    assert cfg.sweep == (0.34,)  # the headline fraction is always part of the sweep
    assert res.cache == {"trained": 6, "loaded": 0}  # pool: 4 benign + 2 contaminated
    methods = set(res.methods)
    assert {"local", "fedavg", "oracle_fedavg", "median", "krum", "clair", "clair_rank2", "base"} <= methods
    benign_clients = {r["client"] for r in res.records if r["method"] == "local"}
    assert len(benign_clients) == 4
    for r in res.records:
        assert r["kind"] == "benign" and 0.0 <= r["token_accuracy"] <= 1.0
        if r["method"] in cfg.exact_match_methods + ("base",):
            assert r["exact_match"] is not None and 0.0 <= r["exact_match"] <= 1.0
        else:
            assert r["exact_match"] is None
    clair_det = [d for d in res.detection if d["method"] == "clair"]
    assert len(clair_det) == 1 and set(clair_det[0]) >= {"precision", "recall", "scores", "flagged", "residual_ratio"}
    # tuned methods: each client kept one of at most TUNING_BUDGET candidates, recorded in "choice"
    assert set(res.choices("clair")) <= {f"({a:g}, {b:g})" for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0)}
    assert sum(res.choices("trimmed_mean").values()) == 4 and res.paired("clair", "local").shape == (1,)
    (spec,) = res.spectra.values()
    assert set(spec) == {"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}
    for s in spec.values():
        assert len(s["local_all"]) == 128 and s["local_all"][0] >= s["local_benign"][0] > 0
    rows = {row["method"]: row for row in res.table()}
    assert rows["local"]["seeds"] == 1 and rows["local"]["token_accuracy_std"] == 0.0
    # second run: nothing retrained, identical numbers
    res2 = run_copy_experiment(cfg)
    assert res2.cache == {"trained": 0, "loaded": 6}
    assert [r["token_accuracy"] for r in res2.records] == pytest.approx([r["token_accuracy"] for r in res.records])
    # a different local setting is a different cache key: retrained
    res3 = run_copy_experiment(dataclasses.replace(cfg, local=LocalTrainingConfig(steps=5), methods=("local",)))
    assert res3.cache == {"trained": 6, "loaded": 0}


def test_detection_on_an_easy_setting(tmp_path):
    # benign clients with enough data agree; corrupted/conflicting clients stand out
    task = CopyTaskConfig(num_clients=8, contamination=0.25, letters=LETTERS, num_shared=4, focus_size=4,
                          focus_mass=0.0, train_size=(12, 12), eval_size=4, val_size=2, length=(8, 12))
    cfg = ExperimentConfig(task=task, local=LocalTrainingConfig(steps=20), seeds=(0,), sweep=(),
                           methods=("local", "fedavg", "clair"), exact_match_size=0, refactor_rank=None,
                           output_dir=None, device="cpu", progress=False)  # CLAIR's defaults: no hand-set knob
    res = run_copy_experiment(cfg)
    (det,) = [d for d in res.detection if d["method"] == "clair"]
    assert det["precision"] == 1.0 and det["recall"] == 1.0, det
    assert sorted(det["flagged"]) == sorted(det["contaminated"])
    acc = {r["method"]: r["token_accuracy_mean"] for r in res.table()}
    assert acc["clair"] >= acc["local"] - 1e-9


def test_sweep_reuses_the_pool(tmp_path):
    cfg = _tiny(tmp_path, sweep=(0.0, 0.5), methods=("local", "clair"), exact_match_size=0, refactor_rank=None)
    assert cfg.pool_sizes() == (6, 3)
    res = run_copy_experiment(cfg)
    assert res.cache["trained"] == 9
    curves = res.sweep_curves()
    assert curves["local"].shape == (1, 3)
    # the local accuracy of a client does not depend on who else is in the federation
    loc = {(r["contamination"], r["client"]): r["token_accuracy"] for r in res.records if r["method"] == "local"}
    for (f, c), v in loc.items():
        assert v == loc[(0.0, c)]
    clair_det = [d for d in res.detection if d["method"] == "clair"]
    assert [d["contamination"] for d in clair_det] == [0.0, 0.34, 0.5]
    assert [len(d["contaminated"]) for d in clair_det] == [0, 2, 3]


def test_client_without_data_is_excluded_or_raises(base):
    model, tok, _ = base
    pool = make_client_pool(CopyTaskConfig(letters=LETTERS, num_shared=4, train_size=(3, 3), eval_size=2), 3, 0,
                            make_generator(0))
    pool.clients[1].train = []
    cfg = LocalTrainingConfig(steps=2)
    out = train_local_adapters(model, tok, pool.clients, cfg, seed=0)
    assert out.adapters[1] is None and out.excluded == {1: "no training data"}
    assert out.trained == 2 and out.adapters[0] is not None
    with pytest.raises(ValueError, match="client 1 has no training data"):
        train_local_adapters(model, tok, pool.clients, cfg, seed=0, on_invalid="raise")


def test_pipeline_excludes_clients_without_data(tmp_path):
    task = CopyTaskConfig(num_clients=8, contamination=0.25, letters=LETTERS, num_shared=4, focus_size=4,
                          train_size=(0, 3), eval_size=4, val_size=2, length=(6, 10))
    cfg = _tiny(tmp_path, task=task, methods=("local", "fedavg", "clair"), exact_match_size=0, refactor_rank=None,
                output_dir=None)
    pool = make_client_pool(task, *cfg.pool_sizes(), make_generator(0))
    empty = {i for i, c in enumerate(pool.clients) if c.num_train == 0}
    assert empty, "test premise: seed 0 draws at least one client without data"
    res = run_copy_experiment(cfg)
    assert set(res.excluded[0]) == empty and set(res.excluded[0].values()) == {"no training data"}
    used = set(next(d for d in res.detection if d["method"] == "clair")["clients"])
    assert not used & empty
    with pytest.raises(ValueError, match="no training data"):
        run_copy_experiment(dataclasses.replace(cfg, on_invalid="raise"))


def _adapter(names=("m.a", "m.b"), r=2, out=5, inp=3, fill=None, seed=0) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for n in names:
        A, B = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
        if fill is not None:
            B[0, 0] = fill
        factors[n] = LoraFactors(A=A, B=B, scaling=2.0, fan_in_fan_out=False)
    return LoraAdapter(factors, r, 2.0 * r)


def test_screen_adapters_flags_and_excludes_bad_uploads():
    good = [_adapter(seed=i) for i in range(3)]
    bad_names = _adapter(names=("m.a", "m.c"))
    bad_rank = _adapter(r=3)
    nan = _adapter(fill=float("nan"))
    adapters = [good[0], bad_names, good[1], bad_rank, None, nan, good[2]]
    valid, reasons = screen_adapters(adapters, ("m.a", "m.b"), 2, reference_shapes={"m.a": (5, 3), "m.b": (5, 3)})
    assert valid == [0, 2, 6]
    assert set(reasons) == {1, 3, 4, 5}
    assert "module names" in reasons[1] and "rank 3" in reasons[3]
    assert reasons[4] == "no adapter received" and "NaN" in reasons[5]
    with pytest.raises(AdapterError, match="client 1"):
        screen_adapters(adapters, ("m.a", "m.b"), 2, on_invalid="raise")
    with pytest.raises(ValueError, match="on_invalid"):
        screen_adapters(adapters, ("m.a", "m.b"), 2, on_invalid="ignore")


def test_stack_deltas_and_evaluator_merge_match_apply_deltas(base):
    model, tok, _ = base
    pool = make_client_pool(CopyTaskConfig(letters=LETTERS, num_shared=4, train_size=(3, 3), eval_size=2), 3, 0,
                            make_generator(1))
    out = train_local_adapters(model, tok, pool.clients, LocalTrainingConfig(steps=3), seed=1)
    stacks = stack_deltas(out.adapters)
    a0 = out.adapters[0]
    for n, s in stacks.items():
        assert s.shape == (3, 128, 512) and s.dtype == torch.float64  # (out, in) of mlp.c_proj
        torch.testing.assert_close(s[0], a0.factors[n].delta("out_in", torch.float64))
    ev = Evaluator(model, tok, a0.module_names, {n: f.fan_in_fan_out for n, f in a0.factors.items()})
    ev.load({n: s[0] for n, s in stacks.items()})
    merged = apply_deltas(model, a0.deltas("base"))
    for n in a0.module_names:
        torch.testing.assert_close(ev.model.get_submodule(n).weight, merged.get_submodule(n).weight, rtol=1e-5, atol=1e-6)
    ev.load(None)
    for n in a0.module_names:
        assert torch.equal(ev.model.get_submodule(n).weight, model.get_submodule(n).weight)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"methods": ("local", "magic")}, ValueError, "methods"),
        ({"seeds": ()}, ValueError, "seeds"),
        ({"sweep": (0.2, 1.5)}, ValueError, "sweep"),
        ({"on_invalid": "skip"}, ValueError, "on_invalid"),
        ({"task": {"num_clients": 5}}, TypeError, "task"),
        ({"exact_match_size": -1}, ValueError, "exact_match_size"),
    ],
)
def test_experiment_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ExperimentConfig(**kwargs)


def test_local_config_validation_and_pool_sizes():
    with pytest.raises(ValueError, match="target_modules"):
        LocalTrainingConfig(target_modules=())
    with pytest.raises(ValueError, match="rank"):
        LocalTrainingConfig(rank=0)
    cfg = ExperimentConfig()
    assert cfg.sweep == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    assert cfg.pool_sizes() == (10, 5)
    with pytest.raises(TypeError, match="ExperimentConfig"):
        run_copy_experiment({"seeds": (0,)})
    assert math.isclose(ExperimentConfig(sweep=(0.0,)).sweep[-1], 0.3)


@pytest.mark.filterwarnings("ignore:.*every client was flagged:RuntimeWarning")
def test_pretrained_base_code_path_is_cached(tmp_path):
    # the "full" profile pretrains a larger base under output_dir/base; exercise that path with a toy model
    from fedlora_lite.experiments.copy_task import (
        ModelConfig,
        PretrainConfig,
        TrainConfig,
    )

    pre = PretrainConfig(model=ModelConfig(n_layer=1, n_embd=32, n_head=2), train=TrainConfig(steps=2, batch_size=4),
                         eval_size=2)
    cfg = _tiny(tmp_path, pretrain=pre, methods=("local", "clair"), exact_match_size=0, refactor_rank=None)
    res = run_copy_experiment(cfg)
    weights = tmp_path / "base" / "model.safetensors"
    assert weights.is_file() and res.cache["trained"] == 6
    stamp = weights.stat().st_mtime_ns
    res2 = run_copy_experiment(cfg)
    assert weights.stat().st_mtime_ns == stamp and res2.cache == {"trained": 0, "loaded": 6}
    with pytest.raises(ValueError, match="output_dir"):
        run_copy_experiment(dataclasses.replace(cfg, output_dir=None))
