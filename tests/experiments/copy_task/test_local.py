"""The local-adapter cache (fedlora_lite.experiments.copy_task.local): corrupt entries are retrained, not fatal."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fedlora_lite.core import make_generator
from fedlora_lite.experiments.copy_task import (
    CopyTaskConfig,
    LocalTrainingConfig,
    load_base,
    make_client_pool,
    train_local_adapters,
)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def setting():
    model, tok, _ = load_base()
    pool = make_client_pool(CopyTaskConfig(letters="abcdefghijklmnop", num_shared=4, train_size=(3, 3), eval_size=2),
                            6, 0, make_generator(0))
    return model, tok, pool.clients, LocalTrainingConfig(steps=2)


def _corrupt(path, how: str) -> None:
    if how == "config_list":
        (path / CONFIG).write_text("[]")
    elif how == "config_latin1":
        (path / CONFIG).write_bytes(b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "x": "\xe9"}')
    elif how == "weights_fifo":
        (path / WEIGHTS).unlink()
        os.mkfifo(path / WEIGHTS)
    elif how == "weights_truncated":
        data = (path / WEIGHTS).read_bytes()
        (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    elif how == "entry_is_a_file":
        shutil.rmtree(path)
        path.write_text("not a folder")
    else:  # "config_link_out": a link leaving the entry
        (path / CONFIG).unlink()
        os.symlink("/etc/hostname", path / CONFIG)


def test_corrupt_cache_entries_are_retrained_with_a_warning(setting, tmp_path):
    model, tok, clients, cfg = setting
    first = train_local_adapters(model, tok, clients, cfg, seed=0, cache_dir=tmp_path)
    assert (first.trained, first.loaded) == (6, 0)
    kinds = ["config_list", "config_latin1", "weights_fifo", "weights_truncated", "entry_is_a_file", "config_link_out"]
    for k, how in enumerate(kinds):
        _corrupt(tmp_path / f"client_{k:03d}", how)
    with pytest.warns(RuntimeWarning, match="ignoring cached adapter of client") as record:
        again = train_local_adapters(model, tok, clients, cfg, seed=0, cache_dir=tmp_path)
    assert (again.trained, again.loaded) == (6, 0)
    assert len([w for w in record if "ignoring cached adapter" in str(w.message)]) == 6
    for a, b in zip(first.adapters, again.adapters):  # retraining reproduces the adapters exactly
        assert all(torch.equal(a.factors[n].B, b.factors[n].B) for n in a.module_names)
    third = train_local_adapters(model, tok, clients, cfg, seed=0, cache_dir=tmp_path)  # entries were rewritten
    assert (third.trained, third.loaded) == (0, 6)
