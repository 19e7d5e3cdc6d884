"""One folder per experiment, each built only from the library's public pieces.

* :mod:`fedlora_lite.experiments.copy_task` — the paper's headline experiment: federated
  LoRA fine-tuning of a small GPT-2-style model on a text-copying task with contaminated
  clients.
"""
