"""Evaluation of per-client estimates: base + ΔW on held-out pairs, one estimate or many at once.

:class:`Evaluator` keeps one copy of the base. :meth:`Evaluator.token_accuracy` scores one
estimate (weights merged in place); :meth:`Evaluator.token_accuracies` scores M candidate
estimates of one client in ONE forward pass: the client's B held-out sequences are repeated
M times and every adapted module adds ``x @ ΔW_m^T`` for the m-th group through a forward
hook, a batched matmul. That is what makes a sweep over many methods, clients, seeds and
regimes affordable on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from .sequences import IGNORE_INDEX, SequenceBatch, greedy_exact_match, token_accuracy
from .tokenizer import CharTokenizer

__all__ = ["Evaluator"]


class Evaluator:
    """A copy of the base whose adapted modules take base + ΔW per evaluation.

    Args:
        base: the plain base model (not modified).
        tokenizer: its tokenizer.
        names: the adapted module names.
        fan_in_fan_out: per module, True if the base weight is stored (in, out) (GPT-2 Conv1D).
        max_batch: most sequences in one forward pass of :meth:`token_accuracies`.
    """

    def __init__(self, base: torch.nn.Module, tokenizer: CharTokenizer, names: Sequence[str],
                 fan_in_fan_out: Mapping[str, bool], *, max_batch: int = 4096):
        self.model = copy.deepcopy(base).eval()
        self.tokenizer = tokenizer
        self.device = next(self.model.parameters()).device
        self.modules = {n: self.model.get_submodule(n) for n in names}
        self.base_w = {n: m.weight.detach().clone() for n, m in self.modules.items()}
        self.fifo = dict(fan_in_fan_out)
        self.max_batch = int(max_batch)

    def load(self, deltas: Mapping[str, torch.Tensor] | None) -> None:
        """Set weights to base + ΔW (ΔW in out_in orientation); None restores the base."""
        with torch.no_grad():
            for n, m in self.modules.items():
                w = self.base_w[n]
                if deltas is not None:
                    d = deltas[n].T if self.fifo[n] else deltas[n]
                    w = w + d.to(device=w.device, dtype=w.dtype)
                m.weight.copy_(w)

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def token_accuracy(self, batch: SequenceBatch) -> float:
        with self._autocast():
            return float(token_accuracy(self.model, batch))

    def exact_match(self, pairs: Sequence[tuple[str, str]]) -> float:
        with self._autocast():
            return float(greedy_exact_match(self.model, self.tokenizer, [s for s, _ in pairs], [t for _, t in pairs]))

    @torch.no_grad()
    def token_accuracies(self, batch: SequenceBatch, candidates: Sequence[Mapping[str, torch.Tensor] | None]) -> list[float]:
        """Teacher-forced token accuracy of M candidate estimates on one client's batch.

        Args:
            batch: the client's held-out pairs (B sequences).
            candidates: M mappings module name -> ΔW (out, in), or None for the base.

        Returns:
            M accuracies; equal (up to float rounding) to :meth:`token_accuracy` after
            :meth:`load` of each candidate.
        """
        if len(candidates) == 0:
            return []
        self.load(None)
        B = len(batch)
        per_pass = max(1, self.max_batch // max(B, 1))
        out: list[float] = []
        for start in range(0, len(candidates), per_pass):
            out += self._accuracies(batch, candidates[start : start + per_pass])
        return out

    def _accuracies(self, batch: SequenceBatch, candidates: Sequence[Mapping[str, torch.Tensor] | None]) -> list[float]:
        M, B = len(candidates), len(batch)
        batch = batch.to(self.device)
        stacks = {}
        for n, m in self.modules.items():
            w = self.base_w[n]
            out_f = w.shape[1] if self.fifo[n] else w.shape[0]
            in_f = w.shape[0] if self.fifo[n] else w.shape[1]
            zero = torch.zeros(out_f, in_f, dtype=w.dtype, device=self.device)
            stacks[n] = torch.stack([zero if c is None else c[n].to(device=self.device, dtype=w.dtype) for c in candidates])

        def hook(name):
            def add_delta(module, inputs, output):
                x = inputs[0]
                extra = torch.bmm(x.reshape(M, -1, x.shape[-1]), stacks[name].transpose(1, 2))
                return output + extra.reshape(output.shape).to(output.dtype)
            return add_delta

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        try:
            with self._autocast():
                ids = batch.input_ids.repeat(M, 1)
                mask = batch.attention_mask.repeat(M, 1)
                logits = self.model(input_ids=ids, attention_mask=mask).logits
        finally:
            for h in handles:
                h.remove()
        pred = logits[:, :-1].argmax(-1)
        gold = batch.labels[:, 1:].repeat(M, 1)
        valid = gold != IGNORE_INDEX
        correct = ((pred == gold) & valid).reshape(M, B, -1).sum(dim=(1, 2))
        total = valid.reshape(M, B, -1).sum(dim=(1, 2)).clamp_min(1)
        return [float(c) / float(t) for c, t in zip(correct, total)]
