"""Batching and metrics for the copy-task sequence format.

A copy-task example is a pair of strings ``(source, target)``; the model reads the
source and must write the target (plain copy: ``target == source``; transformed copy:
``target = f(source)``). The template comes from the tokenizer
(see :mod:`fedlora_lite.experiments.copy_task.model`)::

    [BOS] source <pad>*(W - len(source)) [SEP] target [EOS]

:func:`collate` turns pairs into right-padded tensors whose ``labels`` are ``-100``
everywhere except on the target characters and the closing ``EOS`` (the Hugging Face
convention: the model shifts labels internally, so ``labels[t]`` is predicted from
position ``t - 1``). The ``<pad>`` tokens *inside* the source field are ordinary input
(attention mask 1); only the batch padding after ``EOS`` is masked.

Metrics:
    * :func:`token_accuracy` — teacher-forced: the fraction of target tokens (incl. EOS)
      whose arg-max prediction is right given the true prefix. One forward pass.
    * :func:`greedy_exact_match` — the model writes the whole target itself (greedy,
      no teacher forcing); a sequence counts if it equals the target exactly and is
      followed by EOS. Costs one forward pass per generated token.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tokenizer import CharTokenizer

__all__ = ["SequenceBatch", "encode_prompt", "encode_pair", "collate", "sequence_loss", "token_accuracy", "greedy_decode", "greedy_exact_match"]

IGNORE_INDEX = -100


@dataclass
class SequenceBatch:
    """A right-padded batch of copy-task sequences.

    Attributes:
        input_ids: (B, T) token ids, ``<pad>`` after each sequence's ``<eos>``.
        attention_mask: (B, T) 1 on real tokens, 0 on padding.
        labels: (B, T) target ids on target/EOS positions, -100 elsewhere.
        prompt_lengths: (B,) length of the prompt ``[BOS] source <pad>... [SEP]`` per sequence.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: torch.Tensor

    def to(self, device: str | torch.device) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.prompt_lengths)))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _check_pair(pair: object, k: int) -> tuple[str, str]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
        raise TypeError(f"pairs[{k}] must be a (source, target) pair of str, got {pair!r}")
    return pair[0], pair[1]


def encode_prompt(tokenizer: CharTokenizer, source: str) -> list[int]:
    """``[BOS] source <pad>... [SEP]`` (the source field padded to ``tokenizer.source_width``).

    Raises:
        ValueError: the source is longer than the field, or has characters outside the alphabet.
    """
    src = tokenizer.encode(source)
    width = tokenizer.source_width
    if width is None:
        return [tokenizer.bos_id, *src, tokenizer.sep_id]
    if len(src) > width:
        raise ValueError(f"source has {len(src)} characters but the tokenizer's source field holds {width}: {source!r}")
    return [tokenizer.bos_id, *src, *[tokenizer.pad_id] * (width - len(src)), tokenizer.sep_id]


def encode_pair(tokenizer: CharTokenizer, source: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (no batch padding).

    Returns:
        ``ids = [BOS] source <pad>... [SEP] target [EOS]`` and ``labels`` of the same
        length with -100 on the prompt ``[BOS] source <pad>... [SEP]``.
    """
    prompt = encode_prompt(tokenizer, source)
    answer = [*tokenizer.encode(target), tokenizer.eos_id]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def collate(
    tokenizer: CharTokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    max_length: int | None = None,
    device: str | torch.device | None = None,
) -> SequenceBatch:
    """Encode and right-pad a list of ``(source, target)`` pairs.

    Args:
        tokenizer: the character tokenizer.
        pairs: B pairs of strings.
        max_length: raise if any sequence is longer (pass the model's ``n_positions``).
        device: where to put the tensors (default CPU).

    Raises:
        ValueError: empty ``pairs``, an unknown character, or a sequence over ``max_length``.
    """
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a sequence of (source, target) pairs, got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty: a client or batch needs at least one example")
    encoded = []
    for k, pair in enumerate(pairs):
        src, tgt = _check_pair(pair, k)
        ids, labels = encode_pair(tokenizer, src, tgt)
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"pairs[{k}] needs {len(ids)} positions (len(source)={len(src)}, len(target)={len(tgt)}, +3 specials) "
                f"but max_length={max_length}"
            )
        encoded.append((ids, labels, len(ids) - len(tgt) - 1))
    width = max(len(e[0]) for e in encoded)
    B = len(encoded)
    input_ids = torch.full((B, width), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for b, (ids, lab, _) in enumerate(encoded):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(ids)] = 1
    prompt_lengths = torch.tensor([e[2] for e in encoded], dtype=torch.long)
    batch = SequenceBatch(input_ids, mask, labels, prompt_lengths)
    return batch.to(device) if device is not None else batch


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def sequence_loss(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Mean cross-entropy over target tokens (scalar tensor, differentiable)."""
    batch = batch.to(_model_device(model))
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss


@torch.no_grad()
def token_accuracy(model: torch.nn.Module, batch: SequenceBatch, *, reduction: str = "mean") -> float | torch.Tensor:
    """Teacher-forced accuracy on target tokens (target characters and the closing EOS).

    Args:
        model: a causal LM (plain or peft-wrapped).
        batch: from :func:`collate`.
        reduction: ``"mean"`` — fraction over all target tokens of the batch (float);
            ``"none"`` — per-sequence fractions, a (B,) CPU tensor.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    was_training = model.training
    model.eval()
    batch = batch.to(_model_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    model.train(was_training)
    pred = logits[:, :-1].argmax(-1)
    gold = batch.labels[:, 1:]
    valid = gold != IGNORE_INDEX
    correct = (pred == gold) & valid
    if reduction == "mean":
        return float(correct.sum()) / max(int(valid.sum()), 1)
    return (correct.sum(1).double() / valid.sum(1).clamp_min(1).double()).cpu()


def _cache_keyword(model: torch.nn.Module) -> str:
    """The name of the key/value-cache argument (and output) of ``model.forward``.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name is deprecated,
    with a warning, and scheduled for removal); older releases only know
    ``past_key_values``. Read it from the signature of the underlying model's ``forward``
    (a peft model forwards ``**kwargs``) instead of pinning one transformers generation.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module,
    tokenizer: CharTokenizer,
    sources: Sequence[str],
    *,
    max_new_tokens: int | Sequence[int] | None = None,
    batch_size: int = 128,
) -> list[str]:
    """Greedy continuation of the prompt ``[BOS] source <pad>... [SEP]`` until EOS.

    Prompts are grouped by length (all equal in the fixed-width format) so no padding is
    needed: deterministic, and the same computation on any device.

    Args:
        model: a Hugging Face causal LM (plain or peft); decoding uses its key/value cache
            (``cache``, ``past_key_values`` before transformers 5), so each step feeds one new token.
        tokenizer: the character tokenizer.
        sources: N source strings.
        max_new_tokens: generation budget, one int for all or one per source; default
            ``n_positions - prompt length``.
        batch_size: sequences per forward pass.

    Returns:
        N decoded strings (without specials, cut at the first EOS).
    """
    sources = list(sources)
    n_pos = int(getattr(getattr(model, "config", None), "n_positions", 1 << 30))
    if isinstance(max_new_tokens, Sequence):
        budgets = [int(b) for b in max_new_tokens]
        if len(budgets) != len(sources):
            raise ValueError(f"max_new_tokens has {len(budgets)} entries for {len(sources)} sources")
    else:
        budgets = [n_pos if max_new_tokens is None else int(max_new_tokens)] * len(sources)
    prompts = [encode_prompt(tokenizer, s) for s in sources]
    budgets = [min(b, n_pos - len(p)) for b, p in zip(budgets, prompts)]
    if any(b < 1 for b in budgets):
        raise ValueError(f"a source is too long to leave room for an answer in n_positions={n_pos}")
    was_training = model.training
    model.eval()
    device = _model_device(model)
    cache_kw = _cache_keyword(model)
    outputs: list[str] = [""] * len(sources)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for _, idx_all in sorted(by_len.items()):
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start : start + batch_size]
            seq = torch.tensor([prompts[i] for i in idx], dtype=torch.long, device=device)
            steps = max(budgets[i] for i in idx)
            done = torch.zeros(len(idx), dtype=torch.bool, device=device)
            step_input, past = seq, None
            for _ in range(steps):
                # key/value cache: each step feeds only the newest token
                out = model(input_ids=step_input, use_cache=True, **{cache_kw: past})
                past = getattr(out, cache_kw)
                nxt = out.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, tokenizer.eos_id), nxt)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                step_input = nxt[:, None]
                done |= nxt == tokenizer.eos_id
                if bool(done.all()):
                    break
            for row, i in enumerate(idx):
                gen = seq[row, len(prompts[i]) : len(prompts[i]) + budgets[i]]
                outputs[i] = tokenizer.decode(gen, stop_at_eos=True)
    model.train(was_training)
    return outputs


def greedy_exact_match(
    model: torch.nn.Module,
    tokenizer: CharTokenizer,
    sources: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 128,
    reduction: str = "mean",
) -> float | torch.Tensor:
    """Fraction of sources whose greedy output equals the target exactly (then EOS).

    The budget per sequence is ``len(target) + 1`` tokens, so a model that does not stop
    with EOS right after the target scores 0 on that sequence.

    Args:
        reduction: ``"mean"`` (float) or ``"none"`` ((N,) bool CPU tensor).
    """
    if len(sources) != len(targets):
        raise ValueError(f"sources has {len(sources)} entries but targets has {len(targets)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if len(sources) == 0:
        raise ValueError("sources is empty")
    budgets = [len(t) + 1 for t in targets]
    outs = greedy_decode(model, tokenizer, sources, max_new_tokens=budgets, batch_size=batch_size)
    # decode(stop_at_eos) drops EOS; require that EOS was produced within budget
    hits = []
    for o, t, b in zip(outs, targets, budgets):
        hits.append(o == t and len(o) < b)
    hits_t = torch.tensor(hits, dtype=torch.bool)
    return float(hits_t.double().mean()) if reduction == "mean" else hits_t
