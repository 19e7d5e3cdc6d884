"""Adapter files as client data (fedlora_lite.lora.adapter_io / adapter_files): hostile folders.

Every hostile file is created here, in ``tmp_path``. Cases whose regression would exhaust
memory or hang (huge ranks, links to /dev/zero, FIFOs) run in a child process under a
memory cap and a timeout (:mod:`tests.limits`). The fuzz test writes a few hundred
randomly corrupted folders and requires each to load to finite factors or raise
:class:`AdapterError`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from fedlora_lite import clair
from fedlora_lite.experiments.copy_task import CharTokenizer, ModelConfig, build_model
from fedlora_lite.lora import AdapterError, LoraFactors, attach_lora, load_adapter, read_adapter, save_adapter
from fedlora_lite.lora.adapter_files import MAX_CONFIG_BYTES
from tests.limits import run_limited

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MODULE = "transformer.h.0.attn.c_proj"  # Conv1D 32 -> 32
KEY = f"base_model.model.{MODULE}.lora_{{}}.weight"

# a child process builds the same tiny base and a valid adapter folder
CHILD_SETUP = """
import json, os, sys
from fedlora_lite.experiments.copy_task import CharTokenizer, ModelConfig, build_model
from fedlora_lite.lora import AdapterError, attach_lora, load_adapter, read_adapter, save_adapter
base = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64), CharTokenizer(), seed=0)
def outcome(fn):
    try:
        fn()
        return "loaded"
    except AdapterError as exc:
        return "AdapterError: " + str(exc)
"""


@pytest.fixture(scope="module")
def base():
    return build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64), CharTokenizer(), seed=0)


@pytest.fixture
def good(tmp_path, base):
    """A valid adapter folder (r=2 on every GPT-2 projection, B random)."""
    pm = attach_lora(base, r=2, alpha=4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return save_adapter(pm, tmp_path / "good")


def _config(path, **fields):
    cfg = json.loads((path / CONFIG).read_text())
    cfg.update(fields)
    (path / CONFIG).write_text(json.dumps(cfg))


def _weights(path, tensors: dict, rank: int | None = None):
    save_file(tensors, str(path / WEIGHTS))
    if rank is not None:
        _config(path, r=rank)


def _single_module(tmp_path, A, B, **config) -> os.PathLike:
    d = tmp_path / "single"
    d.mkdir()
    cfg = {"peft_type": "LORA", "r": A.shape[0], "lora_alpha": 4, "fan_in_fan_out": True, **config}
    (d / CONFIG).write_text(json.dumps(cfg))
    save_file({KEY.format("A"): A.contiguous(), KEY.format("B"): B.contiguous()}, str(d / WEIGHTS))
    return d


# --- ranks and shapes, before anything is allocated -------------------------------------------------------


def _good_folder(root, base, name):
    pm = attach_lora(base, r=2, alpha=4)
    return save_adapter(pm, root / name)


@pytest.fixture(scope="module")
def capped_outcomes(tmp_path_factory, base):
    """Hostile folders whose regression would exhaust memory or hang, all read in ONE child process.

    The child runs under a 3 GiB address-space cap and a timeout; each test below checks its
    own case's outcome (if the child dies, every one of them fails, and the suite goes on).
    """
    root = tmp_path_factory.mktemp("capped")
    cases = {}
    for rank in (30_000_000, 2**40):  # zero-element factors: once attached at that rank 11.5 GB / 140 TB
        d = root / f"huge_rank_{rank}"
        d.mkdir()
        (d / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8, "fan_in_fan_out": True}))
        save_file({KEY.format("A"): torch.zeros(rank, 0), KEY.format("B"): torch.zeros(0, rank)}, str(d / WEIGHTS))
        cases[f"huge_rank_{rank}"] = d
    for member in (CONFIG, WEIGHTS):
        d = _good_folder(root, base, f"dev_zero_{member}")
        (d / member).unlink()
        os.symlink("/dev/zero", d / member)
        cases[f"dev_zero_{member}"] = d
        d = _good_folder(root, base, f"fifo_{member}")
        (d / member).unlink()
        os.mkfifo(d / member)
        cases[f"fifo_{member}"] = d
    d = _good_folder(root, base, "sparse")
    with open(d / WEIGHTS, "r+b") as fh:  # 5 GiB of holes: no disk space, but a regression would read it all
        fh.truncate(5 << 30)
    cases["sparse"] = d
    listing = {k: str(v) for k, v in cases.items()}
    return run_limited(CHILD_SETUP + f"""
cases = {listing!r}
out = {{k: outcome(lambda: read_adapter(v)) for k, v in cases.items()}}
out.update({{"load_" + k: outcome(lambda: load_adapter(base, v)) for k, v in cases.items() if k.startswith("huge")}})
print(json.dumps(out))
""", timeout_s=120)


# --- ranks and shapes, before anything is allocated -------------------------------------------------------


@pytest.mark.parametrize("rank", [30_000_000, 2**40])
def test_huge_rank_with_empty_tensors_is_refused_before_allocation(capped_outcomes, rank):
    """Config r = 3e7 or 2^40 with zero-element factors: refused by read_adapter and load_adapter."""
    for key in (f"huge_rank_{rank}", f"load_huge_rank_{rank}"):
        assert capped_outcomes[key].startswith("AdapterError") and "empty factors" in capped_outcomes[key], key


def test_config_rank_must_match_the_tensors(tmp_path):
    d = _single_module(tmp_path, torch.ones(2, 32), torch.ones(32, 2))
    _config(d, r=30_000_000)
    with pytest.raises(AdapterError, match=r"expected rank r=30000000"):
        read_adapter(d)


def test_ranks_and_shapes_are_checked_against_the_base_before_attaching(tmp_path, base):
    d = _single_module(tmp_path, torch.ones(40, 32), torch.ones(32, 40))  # r = 40 > min(32, 32)
    with pytest.raises(AdapterError, match=r"rank r=40 exceeds min\(out, in\) = 32"):
        load_adapter(base, d)
    shutil.rmtree(d)
    d = _single_module(tmp_path, torch.ones(2, 48), torch.ones(32, 2))  # in = 48, the module takes 32
    with pytest.raises(AdapterError, match=r"maps 48 -> 32 features, expected \(32, 32\)"):
        load_adapter(base, d)
    shutil.rmtree(d)
    d = tmp_path / "embedding"
    d.mkdir()
    (d / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    save_file({"base_model.model.transformer.wte.lora_A.weight": torch.ones(1, 4),
               "base_model.model.transformer.wte.lora_B.weight": torch.ones(4, 1)}, str(d / WEIGHTS))
    with pytest.raises(AdapterError, match="not nn.Linear/Conv1D"):
        load_adapter(base, d)


# --- the config file --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[]", "null", '"LORA"', "3", "[1, 2]"])
def test_config_that_is_not_a_json_object_is_an_adapter_error(good, text):
    (good / CONFIG).write_text(text)
    with pytest.raises(AdapterError, match="must hold a JSON object"):
        read_adapter(good)


def test_config_that_is_not_utf8_is_an_adapter_error(good):
    (good / CONFIG).write_bytes(b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "x": "\xff\xfe"}')
    with pytest.raises(AdapterError, match="not UTF-8"):
        read_adapter(good)
    (good / CONFIG).write_bytes(b"[" * 100_000)  # deep nesting: RecursionError inside json
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(good)


@pytest.mark.parametrize("value", ["false", "true", 0, 1, "False"])
def test_fan_in_fan_out_must_be_a_real_bool(good, value):
    _config(good, fan_in_fan_out=value)
    with pytest.raises(AdapterError, match="fan_in_fan_out .* must be true or false"):
        read_adapter(good)


def test_fan_in_fan_out_bools_are_read_as_written(good):
    _config(good, fan_in_fan_out=False)
    assert not any(f.fan_in_fan_out for f in read_adapter(good).factors.values())
    _config(good, fan_in_fan_out=True)
    assert all(f.fan_in_fan_out for f in read_adapter(good).factors.values())


@pytest.mark.parametrize("alpha", [1e308, 1e7, float("inf"), float("nan"), -1, 0, True, "8", None])
def test_lora_alpha_must_be_finite_and_sane(good, alpha):
    _config(good, lora_alpha=alpha)  # json writes inf/nan as Infinity/NaN, which Python's json reads back
    with pytest.raises(AdapterError, match="invalid lora_alpha"):
        read_adapter(good)


@pytest.mark.parametrize("field", ["use_dora", "use_rslora"])
def test_dora_flags_are_strict(good, field):
    _config(good, **{field: "false"})
    with pytest.raises(AdapterError, match=f"{field} .* must be true or false"):
        read_adapter(good)
    _config(good, **{field: True})
    with pytest.raises(AdapterError, match="not supported"):
        read_adapter(good)
    _config(good, **{field: False})
    assert read_adapter(good).r == 2


def test_oversized_config_is_refused(good):
    (good / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "pad": "x" * MAX_CONFIG_BYTES}))
    with pytest.raises(AdapterError, match="more than the limit"):
        read_adapter(good)


# --- file types and links ------------------------------------------------------------------------------------


@pytest.mark.parametrize("member", [CONFIG, WEIGHTS])
def test_link_to_dev_zero_is_refused_under_a_memory_cap(capped_outcomes, member):
    assert "outside the adapter folder" in capped_outcomes[f"dev_zero_{member}"]


@pytest.mark.parametrize("member", [CONFIG, WEIGHTS])
def test_fifo_is_refused_without_blocking(capped_outcomes, member):
    assert "not a regular file" in capped_outcomes[f"fifo_{member}"]


def test_sparse_weights_file_over_the_default_cap_is_refused_without_reading(capped_outcomes):
    assert "more than the limit" in capped_outcomes["sparse"]


def test_links_leaving_the_folder_are_refused_and_links_inside_are_followed(good, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.copy(good / CONFIG, outside)
    (good / CONFIG).unlink()
    os.symlink(outside, good / CONFIG)
    with pytest.raises(AdapterError, match="outside the adapter folder"):
        read_adapter(good)
    (good / CONFIG).unlink()
    shutil.copy(outside, good / "real_config.json")
    os.symlink("real_config.json", good / CONFIG)  # relative link that stays inside
    assert read_adapter(good).r == 2
    (good / CONFIG).unlink()
    os.symlink("../good/../elsewhere.json", good / CONFIG)  # climbs out through ..
    with pytest.raises(AdapterError, match="outside the adapter folder"):
        read_adapter(good)


def test_folders_and_dangling_links_are_refused(good):
    (good / CONFIG).unlink()
    (good / CONFIG).mkdir()
    with pytest.raises(AdapterError, match="not a regular file"):
        read_adapter(good)
    (good / CONFIG).rmdir()
    os.symlink("missing.json", good / CONFIG)
    with pytest.raises(AdapterError, match="cannot open"):
        read_adapter(good)


def test_weights_size_cap(good):
    size = (good / WEIGHTS).stat().st_size
    assert read_adapter(good, max_bytes=size).r == 2
    with pytest.raises(AdapterError, match=f"has {size} bytes, more than the limit of {size - 1}"):
        read_adapter(good, max_bytes=size - 1)
    with pytest.raises(ValueError, match="max_bytes"):
        read_adapter(good, max_bytes=0)


# --- the weights file ----------------------------------------------------------------------------------------


def test_empty_safetensors_files_are_refused(good):
    save_file({}, str(good / WEIGHTS))
    with pytest.raises(AdapterError, match="holds no LoRA weights"):
        read_adapter(good)
    (good / WEIGHTS).write_bytes(b"")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        read_adapter(good)


def test_header_is_checked_against_the_file(good):
    data = (good / WEIGHTS).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")

    def write(h):
        raw = json.dumps(h).encode()
        (good / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    bad = json.loads(json.dumps(header))
    bad[key]["data_offsets"] = [0, 10**12]
    write(bad)
    with pytest.raises(AdapterError, match="outside the data"):
        read_adapter(good)
    bad = json.loads(json.dumps(header))
    bad[key]["shape"] = [3, 1000]
    write(bad)
    with pytest.raises(AdapterError, match="bytes for shape"):
        read_adapter(good)
    bad = json.loads(json.dumps(header))
    bad[key]["dtype"] = "I64"
    write(bad)
    with pytest.raises(AdapterError, match="has dtype 'I64'"):
        read_adapter(good)
    (good / WEIGHTS).write_bytes(struct.pack("<Q", 2**63) + data[8:])
    with pytest.raises(AdapterError, match="header length"):
        read_adapter(good)


def test_integer_tensors_are_refused(tmp_path):
    d = _single_module(tmp_path, torch.ones(2, 32, dtype=torch.int64), torch.ones(32, 2, dtype=torch.int64))
    with pytest.raises(AdapterError, match="has dtype 'I64'"):
        read_adapter(d)


def test_values_whose_product_overflows_are_refused(tmp_path):
    d = _single_module(tmp_path, torch.full((2, 32), 1e20), torch.full((32, 2), 1e20))  # finite factors, ΔW = inf
    with pytest.raises(AdapterError, match="would overflow"):
        read_adapter(d)
    shutil.rmtree(d)
    d = _single_module(tmp_path, torch.full((2, 32), 1e3), torch.full((32, 2), 1e3))
    adapter = read_adapter(d)
    assert bool(torch.isfinite(adapter.factors[MODULE].delta()).all())


# --- LoraFactors.scaling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", [float("nan"), 0.0, -1.0, float("inf")])
def test_lora_factors_reject_bad_scaling(scaling):
    with pytest.raises(ValueError, match=r"LoraFactors\.scaling must be finite and > 0"):
        LoraFactors(A=torch.ones(2, 5), B=torch.ones(7, 2), scaling=scaling)
    with pytest.raises(TypeError, match="fan_in_fan_out must be a bool"):
        LoraFactors(A=torch.ones(2, 5), B=torch.ones(7, 2), scaling=1.0, fan_in_fan_out="false")


@pytest.mark.parametrize("scaling", [float("nan"), 0.0, -1.0])
def test_bad_scaling_set_after_construction_is_named_in_clair(scaling):
    g = torch.Generator().manual_seed(0)
    factors = [LoraFactors(A=torch.randn(2, 6, generator=g), B=torch.randn(8, 2, generator=g), scaling=1.0)
               for _ in range(4)]
    factors[2].scaling = scaling
    with pytest.raises(ValueError, match=r"factors\[2\]\.scaling must be finite and > 0"):
        clair(factors)


# --- fuzz ----------------------------------------------------------------------------------------------------

FUZZ_CHILD = CHILD_SETUP + """
import math, random, shutil, struct, time
from pathlib import Path
import torch
root, n_cases = Path(sys.argv[1]), int(sys.argv[2])
good = Path(root / "good")
data, cfg_text = (good / "adapter_model.safetensors").read_bytes(), (good / "adapter_config.json").read_text()
n = struct.unpack("<Q", data[:8])[0]
header = json.loads(data[8 : 8 + n])
rng = random.Random(20240901)
WILD = [None, True, False, 0, -1, 1, 2, 3, 2**40, 1e308, -1e-9, float("nan"), "LORA", "false", [], {}, [2], "2"]

def flip(b, k):
    b = bytearray(b)
    for _ in range(k):
        i = rng.randrange(len(b)); b[i] ^= 1 << rng.randrange(8)
    return bytes(b)

def mutate(kind):
    w, c = data, cfg_text
    if kind == "truncate":
        w = data[: rng.randrange(len(data))]
    elif kind == "bitflip":
        w = flip(data, rng.randint(1, 16))
    elif kind == "header_bitflip":
        w = data[:8] + flip(data[8 : 8 + n], rng.randint(1, 4)) + data[8 + n :]
    elif kind == "header_length":
        w = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, len(data), 2**40, 2**64 - 1])) + data[8:]
    elif kind == "header_fields":
        h = json.loads(json.dumps(header)); key = rng.choice([k for k in h if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        h[key][field] = rng.choice([["F32"], "I8", "F64", "BOOL", [0, 0], [2**40, 0], [0, 2**40], [-1, 5], [1], None,
                                    [0, 10**9], [0, 1, 2]])
        raw = json.dumps(h).encode(); w = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    elif kind == "values":
        h_key = rng.choice([k for k in header if k != "__metadata__"]); b, e = header[h_key]["data_offsets"]
        pos = 8 + n + b + 4 * rng.randrange(max(1, (e - b) // 4))
        w = data[:pos] + struct.pack("<f", rng.choice([float("nan"), float("inf"), 3e38, -3e38, 1e30])) + data[pos + 4 :]
    elif kind == "config_fields":
        cfg = json.loads(cfg_text)
        for _ in range(rng.randint(1, 3)):
            cfg[rng.choice(["r", "lora_alpha", "fan_in_fan_out", "peft_type", "use_dora", "rank_pattern"])] = rng.choice(WILD)
        c = json.dumps(cfg)
    elif kind == "config_bytes":
        c = flip(cfg_text.encode(), rng.randint(1, 8)).decode("latin-1")
        return w, c.encode("latin-1")
    elif kind == "config_truncate":
        c = cfg_text[: rng.randrange(len(cfg_text))]
    elif kind == "config_json":
        c = rng.choice(["[]", "null", '"LORA"', "1e999", "{" * 50, '{"peft_type": "LORA", "r": 1e400}'])
    return w, c.encode("utf-8")

kinds = ["truncate", "bitflip", "header_bitflip", "header_length", "header_fields", "values",
         "config_fields", "config_bytes", "config_truncate", "config_json"]
counts = {k: {"loaded": 0, "AdapterError": 0} for k in kinds}
t0 = time.perf_counter()
for i in range(n_cases):
    kind = kinds[i % len(kinds)]
    w, c = mutate(kind)
    d = root / f"case_{i:04d}"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(w)
    (d / "adapter_config.json").write_bytes(c)
    try:
        a = read_adapter(d)
        assert all(bool(torch.isfinite(f.A).all()) and bool(torch.isfinite(f.B).all()) for f in a.factors.values())
        assert all(bool(torch.isfinite(f.delta()).all()) for f in a.factors.values())
        load_adapter(base, d)  # what the server does next; must not fail in any other way
        counts[kind]["loaded"] += 1
    except AdapterError:
        counts[kind]["AdapterError"] += 1
    shutil.rmtree(d)
print(json.dumps({"counts": counts, "seconds": time.perf_counter() - t0}))
"""


def test_fuzzed_adapter_folders_load_finite_or_raise_adapter_error(good, tmp_path):
    """>= 200 seeded corruptions (truncated, bit-flipped, wrong headers, wrong configs), memory-capped and timed."""
    n_cases = 300
    got = run_limited(
        f"import sys; sys.argv = ['fuzz', {str(tmp_path)!r}, '{n_cases}']\n" + FUZZ_CHILD, timeout_s=180)
    counts = got["counts"]
    total = sum(c["loaded"] + c["AdapterError"] for c in counts.values())
    assert total == n_cases >= 200
    rejected = sum(c["AdapterError"] for c in counts.values())
    assert rejected >= n_cases // 2, counts  # most corruptions must be caught...
    for kind in ("truncate", "header_length", "config_json"):
        assert counts[kind]["loaded"] == 0, (kind, counts[kind])  # ...and these always
    print(f"fuzz: {n_cases} folders, {rejected} AdapterError, {total - rejected} loaded finite, "
          f"{got['seconds']:.1f} s; per kind {counts}")
    assert math.isfinite(got["seconds"])
