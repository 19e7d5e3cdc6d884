"""Tokenizer, model construction, sequence format/metrics, training loop and the shipped base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from fedlora_lite.experiments.copy_task import (
    DEFAULT_BASE_DIR,
    CharTokenizer,
    ModelConfig,
    TrainConfig,
    build_model,
    collate,
    count_parameters,
    encode_pair,
    encode_prompt,
    greedy_decode,
    greedy_exact_match,
    load_base,
    max_target_length,
    random_copy_pairs,
    save_base,
    token_accuracy,
    train_on_pairs,
    verify_checksums,
)
from fedlora_lite.experiments.copy_task.sequences import IGNORE_INDEX

DATA_DIR = Path(__file__).resolve().parents[3] / "data"
TINY = ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=32)


def test_tokenizer_round_trip_and_ids(tmp_path):
    tok = CharTokenizer()
    assert tok.vocab_size == 99 and len(tok) == 99
    assert (tok.pad_id, tok.bos_id, tok.sep_id, tok.eos_id) == (0, 1, 2, 3)
    text = "Hello, World! ~ 0123 {x}"
    ids = tok.encode(text)
    assert min(ids) >= 4 and tok.decode(ids) == text
    assert tok.encode(" ") == [4] and tok.encode("~") == [98]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, 10]) == text + "&"
    assert tok.decode([*ids, tok.eos_id, 10], stop_at_eos=True) == text
    assert tok.decode([tok.sep_id], skip_special=False) == "<sep>"
    path = tok.save(tmp_path / "tok.json")
    assert CharTokenizer.load(path) == tok and tok.source_width == 24
    var = CharTokenizer(source_width=None)
    assert CharTokenizer.load(var.save(tmp_path / "var.json")) == var != tok
    with pytest.raises(ValueError, match=r"'é' at position 1"):
        tok.encode("aé")
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"abc")
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("aa")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([120])


def test_model_config_validation():
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"n_layers": 2})
    assert max_target_length(ModelConfig(n_positions=64), CharTokenizer()) == 64 - 24 - 3
    assert max_target_length(ModelConfig(n_positions=64), CharTokenizer(source_width=None)) == 30
    with pytest.raises(ValueError, match="source_width"):
        build_model(ModelConfig(n_positions=16), CharTokenizer(source_width=14))
    with pytest.raises(ValueError, match="source_width"):
        CharTokenizer(source_width=0)


def test_build_model_is_seeded_and_uses_conv1d():
    tok = CharTokenizer()
    state = torch.random.get_rng_state()
    a, b = build_model(TINY, tok, seed=3), build_model(TINY, tok, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert isinstance(a, GPT2LMHeadModel)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_model(TINY, tok, seed=4)
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    assert a.lm_head.weight is a.transformer.wte.weight
    assert type(a.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert tuple(a.transformer.h[0].attn.c_attn.weight.shape) == (32, 96)  # (in, out)
    # default model: ~0.4M parameters, tied head counted once
    assert 380_000 < count_parameters(build_model(ModelConfig(), tok)) < 460_000


def test_fixed_width_sequence_format():
    tok = CharTokenizer(source_width=5)
    assert encode_prompt(tok, "ab") == [1, *tok.encode("ab"), 0, 0, 0, 2]
    ids, labels = encode_pair(tok, "ab", "xyz")
    assert ids == [1, *tok.encode("ab"), 0, 0, 0, 2, *tok.encode("xyz"), 3]
    assert labels == [IGNORE_INDEX] * 7 + [*tok.encode("xyz"), 3]
    # target character j always sits source_width + 1 positions after source character j
    for src in ("a", "abcde"):
        ids, _ = encode_pair(tok, src, src)
        assert all(ids[1 + j] == ids[1 + j + 6] for j in range(len(src)))
    batch = collate(tok, [("ab", "xyz"), ("hello", "hello")])
    assert batch.input_ids.shape == (2, 13)
    assert batch.attention_mask.sum(1).tolist() == [11, 13]  # field padding is input, batch padding is not
    assert batch.prompt_lengths.tolist() == [7, 7]
    with pytest.raises(ValueError, match="source field holds 5"):
        encode_pair(tok, "abcdef", "x")


def test_variable_sequence_format_and_collate():
    tok = CharTokenizer(source_width=None)
    ids, labels = encode_pair(tok, "ab", "xyz")
    assert ids == [1, *tok.encode("ab"), 2, *tok.encode("xyz"), 3]
    assert labels == [IGNORE_INDEX] * 4 + [*tok.encode("xyz"), 3]
    batch = collate(tok, [("ab", "xyz"), ("hello", "hello")])
    assert batch.input_ids.shape == (2, 13)
    assert batch.attention_mask.sum(1).tolist() == [8, 13]
    assert batch.prompt_lengths.tolist() == [4, 7]
    assert batch.num_target_tokens == 4 + 6
    assert (batch.labels[0, 8:] == IGNORE_INDEX).all() and (batch.input_ids[0, 8:] == tok.pad_id).all()
    with pytest.raises(ValueError, match="empty"):
        collate(tok, [])
    with pytest.raises(ValueError, match="max_length=8"):
        collate(tok, [("abcd", "abcd")], max_length=8)
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        collate(tok, [("a", 3)])


class _Oracle(torch.nn.Module):
    """A fake LM that predicts ``labels`` perfectly for one fixed batch (tests the metrics)."""

    def __init__(self, vocab: int, answers: dict[tuple[int, ...], int]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.answers = vocab, answers
        self.config = type("C", (), {"n_positions": 64})()

    def forward(self, input_ids, attention_mask=None, labels=None, past_key_values=None, use_cache=False):
        # the "cache" is simply the prefix seen so far, like a real KV cache it lets the caller feed new tokens only
        full = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], dim=1)
        B, T = input_ids.shape
        offset = full.shape[1] - T
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            for t in range(T):
                nxt = self.answers.get(tuple(full[b, : offset + t + 1].tolist()), 0)
                logits[b, t, nxt] = 1.0
        return type("O", (), {"logits": logits, "past_key_values": full if use_cache else None})()


def _copy_oracle(tok, pairs, wrong_at=None):
    answers = {}
    for src, tgt in pairs:
        ids, _ = encode_pair(tok, src, tgt)
        p = len(encode_prompt(tok, src))
        for t in range(p - 1, len(ids) - 1):
            answers[tuple(ids[: t + 1])] = ids[t + 1]
    if wrong_at is not None:
        answers[wrong_at] = 5
    return answers


@pytest.mark.parametrize("width", [None, 6])
def test_metrics_on_a_perfect_and_a_flawed_model(width):
    tok = CharTokenizer(source_width=width)
    pairs = [("abc", "cba"), ("hi", "hi"), ("xyz!", "x")]
    perfect = _Oracle(tok.vocab_size, _copy_oracle(tok, pairs))
    batch = collate(tok, pairs)
    assert token_accuracy(perfect, batch) == 1.0
    assert greedy_decode(perfect, tok, [s for s, _ in pairs]) == [t for _, t in pairs]
    assert greedy_exact_match(perfect, tok, [s for s, _ in pairs], [t for _, t in pairs]) == 1.0
    # one wrong token (the first target token of "hi"): 1 of 4+3+2 target tokens (incl. EOS)
    prompt = encode_prompt(tok, "hi")
    flawed = _Oracle(tok.vocab_size, _copy_oracle(tok, pairs, wrong_at=tuple(prompt)))
    assert token_accuracy(flawed, batch) == pytest.approx(8 / 9)
    per = token_accuracy(flawed, batch, reduction="none")
    assert per.tolist() == pytest.approx([1.0, 2 / 3, 1.0])
    em = greedy_exact_match(flawed, tok, [s for s, _ in pairs], [t for _, t in pairs], reduction="none")
    assert em.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="targets"):
        greedy_exact_match(perfect, tok, ["a"], [])


def test_training_loop_learns_and_is_reproducible(one_thread):
    tok = CharTokenizer("abcdef", source_width=4)
    pairs = [("abc", "abc"), ("fed", "fed"), ("bad", "bad"), ("cab", "cab")]
    cfg = TrainConfig(steps=60, batch_size=4, lr=1e-2)
    runs = []
    for _ in range(2):
        model = build_model(TINY, tok, seed=0)
        before = token_accuracy(model, collate(tok, pairs))
        hist = train_on_pairs(model, tok, pairs, cfg, generator=torch.Generator().manual_seed(0))
        runs.append(hist.losses)
    assert runs[0] == runs[1]
    assert hist.losses[-1] < 0.5 * hist.losses[0]
    assert token_accuracy(model, collate(tok, pairs)) > max(before, 0.8)
    with pytest.raises(ValueError, match="no examples"):
        train_on_pairs(model, tok, [], cfg, generator=torch.Generator())
    frozen = build_model(TINY, tok).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        train_on_pairs(frozen, tok, pairs, cfg, generator=torch.Generator())
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_random_copy_pairs_seeded():
    a = random_copy_pairs(20, torch.Generator().manual_seed(1), alphabet="xyz", min_len=2, max_len=5)
    b = random_copy_pairs(20, torch.Generator().manual_seed(1), alphabet="xyz", min_len=2, max_len=5)
    assert a == b and all(s == t and 2 <= len(s) <= 5 and set(s) <= set("xyz") for s, t in a)


def test_save_load_base_round_trip(tmp_path):
    tok = CharTokenizer()
    model = build_model(TINY, tok, seed=1)
    out = save_base(model, tok, TINY, tmp_path / "base", metadata={"note": "test"})
    assert verify_checksums(out / "SHA256SUMS").keys() == {"model.safetensors", "config.json", "tokenizer.json"}
    ck = load_base(out)
    m2, tok2, cfg2 = ck
    assert cfg2 == TINY and tok2 == tok and ck.metadata == {"note": "test"}
    x = torch.randint(4, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m2(input_ids=x).logits, model(input_ids=x).logits)
    assert m2.lm_head.weight is m2.transformer.wte.weight
    # tampering is detected before loading
    with open(out / "model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_base(out)
    with pytest.raises(FileNotFoundError, match="fedlora_lite.experiments.copy_task.pretrain"):
        load_base(tmp_path / "nowhere")


def test_data_checksums_match():
    sums = verify_checksums(DATA_DIR / "SHA256SUMS")
    assert "base_copy/model.safetensors" in sums
    verify_checksums(DEFAULT_BASE_DIR / "SHA256SUMS")


def test_shipped_base_copies_heldout_strings(one_thread):
    ck = load_base()  # verifies checksums
    model, tok, cfg = ck
    assert (DEFAULT_BASE_DIR / "model.safetensors").stat().st_size < 4_000_000
    g = torch.Generator().manual_seed(12345)  # not the pretraining or evaluation seed
    printable = random_copy_pairs(64, g, alphabet=tok.alphabet, min_len=4, max_len=20)
    words = [(s, s) for s in ("the quick brown fox", "hello world", "copy me exactly", "aaab bbba", "mississippi")]
    assert token_accuracy(model, collate(tok, printable)) >= 0.95
    assert token_accuracy(model, collate(tok, words)) >= 0.95
    assert greedy_exact_match(model, tok, [s for s, _ in words], [t for _, t in words]) >= 0.8
    assert json.loads((DEFAULT_BASE_DIR / "config.json").read_text())["model"] == cfg.__dict__


def test_load_base_copy_of_shipped_checkpoint(tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(DEFAULT_BASE_DIR, dst)
    (dst / "tokenizer.json").write_text((dst / "tokenizer.json").read_text().replace("~", "~ "))
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_base(dst)


def test_pretrain_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    from fedlora_lite.experiments.copy_task import PretrainConfig
    from fedlora_lite.experiments.copy_task.pretrain import main

    out = tmp_path / "base"
    argv = ["--out", str(out), "--steps", "3", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--source-width", "8"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["steps"] == 3 and report["source_width"] == 8
    model, tok, cfg = load_base(out)
    assert cfg.n_embd == 32 and tok.source_width == 8
    assert json.loads((out / "config.json").read_text())["pretraining"]["num_parameters"] == count_parameters(model)
    with pytest.raises(ValueError, match="max_len"):
        PretrainConfig(source_width=8, max_len=9)


def test_load_or_pretrain_reuses_matching_checkpoints(tmp_path):
    from fedlora_lite.experiments.copy_task import PretrainConfig, load_or_pretrain

    shipped = load_or_pretrain(DEFAULT_BASE_DIR, PretrainConfig())  # the shipped base matches the defaults: no training
    assert shipped.metadata["heldout_token_accuracy"] >= 0.99
    tiny = PretrainConfig(
        model=ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=24), source_width=8, max_len=8, eval_size=8,
        train=TrainConfig(steps=2, batch_size=4),
    )
    first = load_or_pretrain(tmp_path / "tiny", tiny)
    stamp = (tmp_path / "tiny" / "model.safetensors").stat().st_mtime_ns
    again = load_or_pretrain(tmp_path / "tiny", tiny)
    assert (tmp_path / "tiny" / "model.safetensors").stat().st_mtime_ns == stamp  # cache hit
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), again.model.parameters()))
    changed = PretrainConfig(**{**tiny.__dict__, "seed": 1})
    load_or_pretrain(tmp_path / "tiny", changed)
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["pretraining"]["seed"] == 1  # retrained


def test_greedy_decode_with_cache_matches_naive_loop():
    tok = CharTokenizer(source_width=6)
    model = build_model(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=24), tok, seed=7)
    sources = ["abc", "hello", "x", "zzzzzz", "a b"]
    fast = greedy_decode(model, tok, sources, max_new_tokens=9, batch_size=2)
    slow = []
    with torch.no_grad():
        for src in sources:
            ids = torch.tensor([encode_prompt(tok, src)])
            out = []
            for _ in range(9):
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                if nxt == tok.eos_id:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            slow.append(tok.decode(out))
    assert fast == slow
