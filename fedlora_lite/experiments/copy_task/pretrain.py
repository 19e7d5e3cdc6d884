"""Pretrain the base model on a generic copy task and save it (one command).

The base learns to copy random strings (uniform lengths ``min_len..max_len``): half of
them uniform over all printable characters, half over lowercase letters and space (the
alphabet of the federated text tasks, where repeated letters are common). Any later
copy-like task then only needs a small LoRA update on top. Regenerate the shipped checkpoint with::

    python -m fedlora_lite.experiments.copy_task.pretrain --out data/base_copy

(defaults: seed 0, CPU, 1 torch thread for bit-reproducible results on one machine;
different hardware or thread counts may change the last bits and so the checksum).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ...core.runtime import make_generator, resolve_device
from ...core.validation import check_fraction
from .checkpoint import BaseCheckpoint, load_base, save_base
from .model import ModelConfig, build_model, count_parameters, max_target_length
from .tokenizer import DEFAULT_SOURCE_WIDTH, CharTokenizer
from .sequences import collate, greedy_exact_match, token_accuracy
from .training import TrainConfig, TrainHistory, train_on_pairs

__all__ = [
    "LOWERCASE",
    "PretrainConfig",
    "PretrainResult",
    "random_copy_pairs",
    "mixed_copy_pairs",
    "pretrain",
    "load_or_pretrain",
    "main",
]


LOWERCASE = "abcdefghijklmnopqrstuvwxyz "
"""Alphabet of the second half of the pretraining strings (letters and space)."""


@dataclass
class PretrainConfig:
    """Everything that determines the pretrained base.

    Attributes:
        model: model size.
        train: optimisation settings.
        source_width: width W of the tokenizer's source field (the template).
        min_len: shortest random string.
        max_len: longest random string (``<= source_width`` and it must fit as a target).
        lowercase_fraction: expected share of strings drawn over :data:`LOWERCASE`
            (the rest is uniform over all printable characters).
        eval_size: held-out random pairs for the final accuracy.
        seed: seeds initialisation, data stream and evaluation set.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=500, batch_size=32, lr=3e-3, warmup_steps=20, schedule="cosine")
    )
    source_width: int = DEFAULT_SOURCE_WIDTH
    min_len: int = 1
    max_len: int = DEFAULT_SOURCE_WIDTH
    lowercase_fraction: float = 0.5
    eval_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}")
        tok = self.tokenizer()
        limit = min(self.source_width, max_target_length(self.model, tok))
        if self.max_len > limit:
            raise ValueError(
                f"max_len={self.max_len} does not fit source_width={self.source_width} / "
                f"n_positions={self.model.n_positions} (at most {limit})"
            )
        check_fraction(self.lowercase_fraction, "lowercase_fraction", inclusive_high=True)

    def tokenizer(self) -> CharTokenizer:
        """The tokenizer (default alphabet, this source width)."""
        return CharTokenizer(source_width=self.source_width)


def random_copy_pairs(
    n: int,
    generator: torch.Generator,
    *,
    alphabet: str,
    min_len: int = 1,
    max_len: int = DEFAULT_SOURCE_WIDTH,
) -> list[tuple[str, str]]:
    """``n`` pairs ``(s, s)`` of random strings with uniform lengths and characters."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator).tolist()
    chars = torch.randint(0, len(alphabet), (sum(lengths),), generator=generator).tolist()
    out, pos = [], 0
    for length in lengths:
        s = "".join(alphabet[c] for c in chars[pos : pos + length])
        pos += length
        out.append((s, s))
    return out


def mixed_copy_pairs(n: int, generator: torch.Generator, cfg: PretrainConfig, tokenizer: CharTokenizer) -> list[tuple[str, str]]:
    """The pretraining distribution: printable-ASCII and lowercase random strings, shuffled."""
    lower = int(torch.binomial(torch.tensor(float(n)), torch.tensor(float(cfg.lowercase_fraction)), generator=generator))
    pairs = random_copy_pairs(n - lower, generator, alphabet=tokenizer.alphabet, min_len=cfg.min_len, max_len=cfg.max_len)
    pairs += random_copy_pairs(lower, generator, alphabet=LOWERCASE, min_len=cfg.min_len, max_len=cfg.max_len)
    order = torch.randperm(n, generator=generator).tolist()
    return [pairs[i] for i in order]


@dataclass
class PretrainResult:
    """Pretrained model plus its evaluation on held-out random strings."""

    model: torch.nn.Module
    tokenizer: CharTokenizer
    config: PretrainConfig
    history: TrainHistory
    token_accuracy: float
    exact_match: float
    num_parameters: int

    def metadata(self) -> dict:
        """JSON facts stored in the checkpoint's config.json (no timings: reproducible)."""
        return {
            "task": "copy random strings (printable ASCII and lowercase+space)",
            "command": "python -m fedlora_lite.experiments.copy_task.pretrain --out <dir>",
            "seed": self.config.seed,
            "source_width": self.config.source_width,
            "min_len": self.config.min_len,
            "max_len": self.config.max_len,
            "lowercase_fraction": self.config.lowercase_fraction,
            "train": asdict(self.config.train),
            "num_parameters": self.num_parameters,
            "final_loss": round(self.history.final_loss, 5),
            "heldout_token_accuracy": round(self.token_accuracy, 5),
            "heldout_exact_match": round(self.exact_match, 5),
        }


def pretrain(cfg: PretrainConfig | None = None, *, device: str | torch.device = "cpu", progress: bool = False) -> PretrainResult:
    """Build the base from ``cfg.model`` and train it on the random-string copy task.

    Args:
        cfg: settings (default :class:`PretrainConfig`).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        progress: tqdm bar.

    Returns:
        :class:`PretrainResult` with held-out teacher-forced token accuracy and greedy
        exact match on ``cfg.eval_size`` fresh pairs of the same distribution.
    """
    cfg = cfg or PretrainConfig()
    device = resolve_device(device)
    tokenizer = cfg.tokenizer()
    model = build_model(cfg.model, tokenizer, seed=cfg.seed, device=device)
    gen = make_generator(cfg.seed)

    def sample(batch_size: int, g: torch.Generator) -> list[tuple[str, str]]:
        return mixed_copy_pairs(batch_size, g, cfg, tokenizer)

    history = train_on_pairs(model, tokenizer, sample, cfg.train, generator=gen, progress=progress, desc="pretrain")
    eval_pairs = mixed_copy_pairs(cfg.eval_size, make_generator(cfg.seed + 10_000), cfg, tokenizer)
    acc = token_accuracy(model, collate(tokenizer, eval_pairs, device=device))
    em = greedy_exact_match(model, tokenizer, [s for s, _ in eval_pairs], [t for _, t in eval_pairs])
    return PretrainResult(model, tokenizer, cfg, history, float(acc), float(em), count_parameters(model))


def load_or_pretrain(
    path: str | Path,
    cfg: PretrainConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> BaseCheckpoint:
    """Load the base at ``path`` if it was trained with ``cfg``; otherwise pretrain and save it there.

    The cache key is the full configuration (model size, template, data, optimisation,
    seed) stored in the checkpoint's ``config.json``; a checkpoint made with different
    settings is retrained, never silently reused. Use it for bases other than the shipped
    one (e.g. a larger ``full``-profile model on a GPU, cached under a run's output dir).

    Returns:
        :class:`~fedlora_lite.experiments.copy_task.model.BaseCheckpoint` ``(model, tokenizer, config)`` on ``device``.
    """
    cfg = cfg or PretrainConfig()
    path = Path(path)
    want = {"model": asdict(cfg.model), "settings": _settings(cfg)}
    if (path / "config.json").is_file():
        have = json.loads((path / "config.json").read_text())
        if {"model": have.get("model"), "settings": _settings_from_metadata(have.get("pretraining", {}))} == want:
            return load_base(path, device)
    res = pretrain(cfg, device=device, progress=progress)
    save_base(res.model.cpu(), res.tokenizer, cfg.model, path, metadata=res.metadata())
    return load_base(path, device)


_SETTING_KEYS = ("seed", "source_width", "min_len", "max_len", "lowercase_fraction", "train")


def _settings(cfg: PretrainConfig) -> dict:
    return {k: (asdict(cfg.train) if k == "train" else getattr(cfg, k)) for k in _SETTING_KEYS}


def _settings_from_metadata(meta: dict) -> dict:
    return {k: meta.get(k) for k in _SETTING_KEYS}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m fedlora_lite.experiments.copy_task.pretrain --out DIR``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory for the checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu: reproducible checksum)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = reproducible)")
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--n-positions", type=int, default=None)
    p.add_argument("--source-width", type=int, default=DEFAULT_SOURCE_WIDTH, help="width of the source field")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "n_positions": args.n_positions}
    model_cfg = ModelConfig(**{k: v for k, v in sizes.items() if v is not None})
    cfg = PretrainConfig(model=model_cfg, seed=args.seed, source_width=args.source_width, max_len=args.source_width)
    if args.steps is not None:
        cfg.train = TrainConfig(**{**asdict(cfg.train), "steps": args.steps})
    t0 = time.perf_counter()
    res = pretrain(cfg, device=args.device, progress=args.progress)
    elapsed = time.perf_counter() - t0
    meta = res.metadata()
    out = save_base(res.model.cpu(), res.tokenizer, cfg.model, args.out, metadata=meta)
    print(json.dumps({**meta, "seconds": round(elapsed, 1), "out": str(out)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
