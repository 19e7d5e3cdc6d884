"""LoRA mechanics: exact ΔW extraction (Conv1D and Linear), write-back, SVD re-factorisation,
safe adapter I/O and validation of received adapters."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedlora_lite.experiments.copy_task import CharTokenizer, ModelConfig, build_model
from fedlora_lite.lora import (
    AdapterError,
    LoraFactors,
    adapted_module_names,
    apply_deltas,
    attach_lora,
    base_weights,
    check_adapter,
    deltas_to_lora_state,
    extract_adapter,
    factorize_delta,
    load_adapter,
    load_lora_factors,
    lora_deltas,
    lora_factors,
    lora_parameter_count,
    read_adapter,
    save_adapter,
)

TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _randomize_b(pm, seed: int = 1, std: float = 0.05) -> None:
    """peft initialises B = 0 (ΔW = 0); give B random values so ΔW is a real test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def gpt2():
    return build_model(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=32), CharTokenizer(), seed=0)


@pytest.fixture(scope="module")
def llama():
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_delta_equals_merged_minus_base(arch, gpt2, llama):
    base, targets = (gpt2, ("c_attn", "c_proj", "c_fc")) if arch == "gpt2" else (llama, LLAMA_TARGETS)
    pm = attach_lora(base, targets, r=3, alpha=6)
    _randomize_b(pm)
    deltas = lora_deltas(pm)
    before = base_weights(pm)
    merged = copy.deepcopy(pm).merge_and_unload()
    assert len(deltas) == (8 if arch == "gpt2" else 7)
    for name, d in deltas.items():
        W = merged.get_submodule(name).weight.detach()
        assert d.shape == W.shape, name
        assert _rel(W - before[name], d) < TOL, name
        assert torch.linalg.matrix_rank(d.double(), rtol=1e-6) <= 3
    # the base model handed in is untouched (attach_lora copies by default)
    assert not any("lora" in n for n, _ in base.named_parameters())


def test_conv1d_orientation_pitfall(gpt2):
    pm = attach_lora(gpt2, ("c_attn", "c_fc"), r=2, alpha=4)
    _randomize_b(pm)
    f = lora_factors(pm)["transformer.h.0.attn.c_attn"]
    assert f.fan_in_fan_out
    w = gpt2.get_submodule("transformer.h.0.attn.c_attn").weight
    naive = f.scaling * f.B @ f.A  # (out, in) = (96, 32): the nn.Linear layout
    assert tuple(w.shape) == (32, 96) and tuple(naive.shape) == (96, 32)
    assert torch.equal(lora_deltas(pm)["transformer.h.0.attn.c_attn"], naive.T)
    assert torch.equal(lora_deltas(pm, orientation="out_in")["transformer.h.0.attn.c_attn"], naive)
    # a square Conv1D would accept the untransposed ΔW silently: check it really is wrong
    sq = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    assert _rel(sq.T, sq) > 0.5


def test_linear_orientation_is_out_in(llama):
    pm = attach_lora(llama, ("q_proj",), r=2, alpha=2)
    _randomize_b(pm)
    (name, f), = lora_factors(pm).items()
    assert not f.fan_in_fan_out
    assert torch.equal(lora_deltas(pm)[name], lora_deltas(pm, orientation="out_in")[name])


@pytest.mark.parametrize("orientation", ["base", "out_in"])
def test_apply_deltas_matches_peft_forward(gpt2, orientation):
    pm = attach_lora(gpt2, r=4, alpha=8)
    _randomize_b(pm)
    merged = apply_deltas(gpt2, lora_deltas(pm, orientation=orientation), orientation=orientation)
    x = torch.randint(4, 99, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pm(input_ids=x).logits
        out = merged(input_ids=x).logits
    assert torch.allclose(out, ref, atol=1e-5)
    # not in place by default
    assert not torch.equal(merged.get_submodule("transformer.h.0.mlp.c_fc").weight, gpt2.get_submodule("transformer.h.0.mlp.c_fc").weight)


def test_apply_deltas_rejects_bad_input(gpt2):
    name = "transformer.h.0.attn.c_proj"
    with pytest.raises(ValueError, match="not found"):
        apply_deltas(gpt2, {"transformer.h.9.attn.c_proj": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match="shape"):
        apply_deltas(gpt2, {"transformer.h.0.attn.c_attn": torch.zeros(96, 32)})
    bad = torch.zeros(32, 32)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        apply_deltas(gpt2, {name: bad})
    with pytest.raises(TypeError, match="plain model"):
        apply_deltas(attach_lora(gpt2), {})


def test_factorize_exact_when_rank_suffices():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)
    f, tail = factorize_delta(D, 3, scaling=2.0)
    assert _rel(f.delta(), D) < 1e-10
    assert float(tail.abs().max()) < 1e-10 * float(D.norm())
    # split of the singular values: B and A carry the same spectrum
    assert torch.allclose(torch.linalg.svdvals(f.B), torch.linalg.svdvals(f.A), rtol=1e-8)


def test_factorize_truncation_error_is_tail_singular_values():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(16, 10, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(D)
    for r in (1, 3, 6):
        f, tail = factorize_delta(D, r, scaling=0.5)
        assert torch.allclose(tail, s[r:])
        assert abs(float((D - f.delta()).norm()) - float(s[r:].norm())) < 1e-10
        assert abs(float(torch.linalg.matrix_norm(D - f.delta(), ord=2)) - float(s[r])) < 1e-10
    with pytest.raises(ValueError, match="rank"):
        factorize_delta(D, 11)


def test_refactor_and_merge_round_trip(gpt2):
    pm = attach_lora(gpt2, r=4, alpha=8)
    _randomize_b(pm)
    deltas = lora_deltas(pm)
    fifo = {n: f.fan_in_fan_out for n, f in lora_factors(pm).items()}
    merged_ref = apply_deltas(gpt2, deltas)
    # rank >= true rank (4): exact, even with a different rank/alpha than the original
    for r, alpha in ((4, 8.0), (6, 3.0)):
        adapter = deltas_to_lora_state(deltas, r, alpha=alpha, fan_in_fan_out=fifo)
        for n, d in adapter.deltas().items():
            assert _rel(d, deltas[n]) < TOL, (r, n)
        pm2 = attach_lora(gpt2, r=r, alpha=alpha)
        load_lora_factors(pm2, adapter)
        merged = pm2.merge_and_unload()
        for n in deltas:
            W_ref = merged_ref.get_submodule(n).weight
            assert _rel(merged.get_submodule(n).weight - gpt2.get_submodule(n).weight, W_ref - gpt2.get_submodule(n).weight) < TOL
    # lower rank: Frobenius error of each ΔW equals its tail singular values
    adapter2 = deltas_to_lora_state(deltas, 2, fan_in_fan_out=fifo)
    for n, d in adapter2.deltas().items():
        tail = torch.linalg.svdvals(deltas[n].double())[2:]
        assert abs(float((d - deltas[n]).double().norm()) - float(tail.norm())) < 1e-4 * float(deltas[n].norm())


def test_load_lora_factors_rescales_mismatched_scaling(gpt2):
    pm = attach_lora(gpt2, r=2, alpha=2)
    _randomize_b(pm)
    deltas = lora_deltas(pm)
    adapter = deltas_to_lora_state(deltas, 2, alpha=16.0, fan_in_fan_out=True)  # scaling 8, layer has 1
    pm2 = attach_lora(gpt2, r=2, alpha=2)
    load_lora_factors(pm2, adapter)
    for n, d in lora_deltas(pm2).items():
        assert _rel(d, deltas[n]) < TOL


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_save_load_round_trip(tmp_path, gpt2):
    pm = attach_lora(gpt2, r=4, alpha=8)
    _randomize_b(pm)
    path = save_adapter(pm, tmp_path / "client0")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    adapter = read_adapter(path)
    assert adapter.r == 4 and adapter.alpha == 8.0
    assert adapter.module_names == tuple(adapted_module_names(pm))
    ref = lora_deltas(pm)
    for n, d in adapter.deltas().items():
        assert torch.equal(d, ref[n])
    pm2 = load_adapter(gpt2, path)
    x = torch.randint(4, 99, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(pm2(input_ids=x).logits, pm(input_ids=x).logits)
    # peft itself reads the same directory
    from peft import PeftModel

    pm3 = PeftModel.from_pretrained(copy.deepcopy(gpt2), str(path))
    with torch.no_grad():
        assert torch.allclose(pm3(input_ids=x).logits, pm(input_ids=x).logits, atol=1e-6)


def test_save_refactored_adapter_and_extract(tmp_path, llama):
    pm = attach_lora(llama, LLAMA_TARGETS, r=2, alpha=4)
    _randomize_b(pm)
    adapter = extract_adapter(pm)
    assert adapter.r == 2 and adapter.alpha == 4.0
    state = adapter.state_dict()
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    save_adapter(adapter, tmp_path / "a")
    back = read_adapter(tmp_path / "a")
    for n, d in back.deltas().items():
        assert torch.equal(d, adapter.deltas()[n])


def test_read_adapter_refuses_pickle(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    (d / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(d)
    (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        read_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0, "lora_alpha": 4}))
    with pytest.raises(AdapterError, match="invalid r=0"):
        read_adapter(d)


def _reference(pm):
    names = adapted_module_names(pm)
    return names, 4


def test_check_adapter_errors(gpt2):
    pm = attach_lora(gpt2, r=4, alpha=8)
    _randomize_b(pm)
    names, r = _reference(pm)
    good = extract_adapter(pm)
    check_adapter(good, names, r)  # no error
    check_adapter(good.state_dict(), names, r)
    # wrong module names
    renamed = {k.replace("h.1.", "h.7."): v for k, v in good.state_dict().items()}
    with pytest.raises(AdapterError, match=r"client 3: module names .*transformer\.h\.7"):
        check_adapter(renamed, names, r, name="client 3")
    missing = {k: v for k, v in good.state_dict().items() if "h.1.mlp.c_fc" not in k}
    with pytest.raises(AdapterError, match=r"missing \['transformer\.h\.1\.mlp\.c_fc'\]"):
        check_adapter(missing, names, r, name="client 3")
    # wrong rank
    low = deltas_to_lora_state(good.deltas(), 2, fan_in_fan_out=True)
    with pytest.raises(AdapterError, match="rank 2, expected 4"):
        check_adapter(low, names, r, name="client 5")
    # NaN weights, named
    state = {k: v.clone() for k, v in good.state_dict().items()}
    state["base_model.model.transformer.h.0.attn.c_proj.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(AdapterError, match=r"client 1: module 'transformer\.h\.0\.attn\.c_proj' lora_B contains NaN"):
        check_adapter(state, names, r, name="client 1")
    # shape mismatch and stray keys
    shapes = {n: (f.out_features, f.in_features) for n, f in good.factors.items()}
    shapes["transformer.h.0.mlp.c_fc"] = (64, 32)
    with pytest.raises(AdapterError, match="c_fc"):
        check_adapter(good, names, r, reference_shapes=shapes)
    with pytest.raises(AdapterError, match="unexpected key"):
        check_adapter({**good.state_dict(), "lm_head.weight": torch.zeros(2, 2)}, names, r)
    assert issubclass(AdapterError, ValueError)


def test_load_adapter_rejects_nan_file(tmp_path, gpt2):
    from safetensors.torch import load_file, save_file

    pm = attach_lora(gpt2, r=2, alpha=4)
    path = save_adapter(pm, tmp_path / "c")
    state = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key][0, 0] = float("inf")
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="client 9: .*NaN or Inf"):
        load_adapter(gpt2, path, name="client 9")


def test_load_adapter_rejects_foreign_modules(tmp_path, gpt2, llama):
    pm = attach_lora(llama, ("q_proj",), r=2, alpha=4)
    path = save_adapter(pm, tmp_path / "llama")
    with pytest.raises(AdapterError, match="do not exist"):
        load_adapter(gpt2, path)


def test_attach_lora_validation_and_counts(gpt2):
    with pytest.raises(ValueError, match="match no module"):
        attach_lora(gpt2, ("q_proj",))
    with pytest.raises(ValueError, match="nn.Linear or Conv1D"):
        attach_lora(gpt2, ("ln_1",))
    with pytest.raises(ValueError, match="r must be"):
        attach_lora(gpt2, r=0)
    pm = attach_lora(gpt2, r=4, alpha=8)
    with pytest.raises(TypeError, match="already a PeftModel"):
        attach_lora(pm)
    counts = lora_parameter_count(pm)
    # per block: c_attn 4*(32+96), attn.c_proj 4*(32+32), c_fc 4*(32+128), mlp.c_proj 4*(128+32)
    assert counts["lora"] == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)
    # seeded initialisation is reproducible and leaves the global RNG alone
    state = torch.random.get_rng_state()
    a = lora_factors(attach_lora(gpt2, seed=5))
    assert torch.equal(state, torch.random.get_rng_state())
    b = lora_factors(attach_lora(gpt2, seed=5))
    assert all(torch.equal(a[n].A, b[n].A) for n in a)
    assert all(float(f.B.abs().max()) == 0.0 for f in a.values())


def test_lora_factors_dataclass_shapes():
    f = LoraFactors(A=torch.ones(2, 5), B=torch.ones(7, 2), scaling=0.5, fan_in_fan_out=True)
    assert (f.rank, f.in_features, f.out_features) == (2, 5, 7)
    assert f.delta().shape == (5, 7) and f.delta("out_in").shape == (7, 5)
    assert float(f.delta()[0, 0]) == 1.0
