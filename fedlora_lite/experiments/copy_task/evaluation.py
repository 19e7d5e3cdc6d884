"""Evaluation of per-client estimates: base + ΔW merged into one model copy, scored on held-out pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .tokenizer import CharTokenizer
from .sequences import greedy_exact_match, token_accuracy

__all__ = ["Evaluator"]


class Evaluator:
    """A copy of the base whose adapted weights are overwritten with base + ΔW per evaluation."""

    def __init__(self, base: torch.nn.Module, tokenizer: CharTokenizer, names: Sequence[str], fan_in_fan_out: Mapping[str, bool]):
        import copy

        self.model = copy.deepcopy(base).eval()
        self.tokenizer = tokenizer
        self.device = next(self.model.parameters()).device
        self.modules = {n: self.model.get_submodule(n) for n in names}
        self.base_w = {n: m.weight.detach().clone() for n, m in self.modules.items()}
        self.fifo = dict(fan_in_fan_out)

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

    def token_accuracy(self, batch) -> float:
        with self._autocast():
            return float(token_accuracy(self.model, batch))

    def exact_match(self, pairs: Sequence[tuple[str, str]]) -> float:
        with self._autocast():
            return float(greedy_exact_match(self.model, self.tokenizer, [s for s, _ in pairs], [t for _, t in pairs]))


