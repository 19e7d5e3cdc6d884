"""Greedy decoding (fedlora_lite.experiments.copy_task.sequences) uses transformers' current cache API."""

from __future__ import annotations

import logging

from fedlora_lite.experiments.copy_task import CharTokenizer, ModelConfig, build_model, greedy_decode
from fedlora_lite.lora import attach_lora


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_greedy_decode_passes_no_deprecated_cache_argument():
    tok = CharTokenizer(source_width=6)
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=24), tok, seed=0)
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process: make this call count
    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        plain = greedy_decode(model, tok, ["abc", "de"], max_new_tokens=4)
        peft = greedy_decode(attach_lora(model, r=2), tok, ["abc", "de"], max_new_tokens=4)  # B = 0: same model
    finally:
        logger.removeHandler(handler)
    assert plain == peft
    assert not [m for m in handler.messages if "deprecated" in m], handler.messages
