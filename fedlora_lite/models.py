"""A character tokenizer and a small GPT-2-style decoder, both built in code.

Nothing here touches the Hugging Face hub: the tokenizer is a fixed character table and
the model is a :class:`transformers.GPT2LMHeadModel` constructed from a
:class:`transformers.GPT2Config` that :class:`ModelConfig` fills in. A pretrained base
(see :mod:`fedlora_lite.pretrain`) is stored as three small files plus checksums::

    <dir>/model.safetensors   fp32 weights (safetensors, never pickle)
    <dir>/config.json         {"model": ModelConfig fields, "pretraining": {...}}
    <dir>/tokenizer.json      CharTokenizer table
    <dir>/SHA256SUMS          sha256 of the three files above (``sha256sum -c`` format)

:func:`load_base` verifies the checksums before building anything.

Sequence format of the copy tasks (shared with :mod:`fedlora_lite.sequences` and
:mod:`fedlora_lite.tasks`). The source sits in a field of fixed width
``W = tokenizer.source_width`` (24 by default), padded with ``<pad>``::

    [BOS] s_1 ... s_m <pad> ... <pad> [SEP] t_1 ... t_n [EOS]      (m <= W)
    |<------------- W + 2 positions ------->|

so target character j always sits exactly ``W + 1`` positions after source character j,
whatever the source length. With learned absolute position embeddings this makes copying
a fixed-offset lookup that a 2-layer model learns in a few hundred steps (with a
variable-length source it needs thousands). The loss and teacher-forced accuracy use
only ``t_1 .. t_n, EOS``; a target fits when ``n <= n_positions - W - 3``
(:func:`max_target_length`). ``source_width=None`` selects the plain variable-length
format ``[BOS] source [SEP] target [EOS]``.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .runtime import resolve_device

__all__ = [
    "CharTokenizer",
    "ModelConfig",
    "BaseCheckpoint",
    "build_model",
    "count_parameters",
    "max_target_length",
    "save_base",
    "load_base",
    "verify_checksums",
    "sha256_file",
    "DEFAULT_BASE_DIR",
    "PAD",
    "BOS",
    "SEP",
    "EOS",
]

PAD, BOS, SEP, EOS = "<pad>", "<bos>", "<sep>", "<eos>"
_SPECIALS = (PAD, BOS, SEP, EOS)
# printable ASCII without tab/newline etc.: space .. '~' (95 characters)
DEFAULT_ALPHABET = "".join(chr(c) for c in range(32, 127))
assert set(DEFAULT_ALPHABET) <= set(string.printable)
#: Width of the padded source field of the default copy-task template.
DEFAULT_SOURCE_WIDTH = 24

#: Where the shipped pretrained base lives (``data/base_copy`` at the repository root).
DEFAULT_BASE_DIR = Path(__file__).resolve().parent.parent / "data" / "base_copy"

_WEIGHTS, _CONFIG, _TOKENIZER, _SUMS = "model.safetensors", "config.json", "tokenizer.json", "SHA256SUMS"


class CharTokenizer:
    """Character-level tokenizer with four special tokens and deterministic ids.

    Ids: ``<pad>=0, <bos>=1, <sep>=2, <eos>=3``, then one id per alphabet character in
    alphabet order (default: printable ASCII from space to ``~``, so ``vocab_size == 99``).
    It also fixes the copy-task template (see the module docstring), the way a Hugging Face
    tokenizer carries its chat template.

    Args:
        alphabet: the characters to support, each once.
        source_width: width W of the padded source field (``None``: variable-length
            format without field padding).
    """

    def __init__(self, alphabet: str = DEFAULT_ALPHABET, source_width: int | None = DEFAULT_SOURCE_WIDTH) -> None:
        if not isinstance(alphabet, str) or not alphabet:
            raise TypeError("alphabet must be a non-empty str")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet must not contain repeated characters")
        if source_width is not None and (isinstance(source_width, bool) or not isinstance(source_width, int) or source_width < 1):
            raise ValueError(f"source_width must be a positive int or None, got {source_width!r}")
        self.alphabet = alphabet
        self.source_width = source_width
        self.specials = _SPECIALS
        self._id_of = {c: i + len(_SPECIALS) for i, c in enumerate(alphabet)}
        self._tok_of = list(_SPECIALS) + list(alphabet)

    pad_id, bos_id, sep_id, eos_id = 0, 1, 2, 3

    @property
    def vocab_size(self) -> int:
        """Number of ids (specials + alphabet)."""
        return len(self._tok_of)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, source_width={self.source_width})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and (other.alphabet, other.source_width) == (self.alphabet, self.source_width)

    def encode(self, text: str) -> list[int]:
        """Map each character of ``text`` to its id (no special tokens added).

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: a character is outside the alphabet (the message names it).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return [self._id_of[c] for c in text]
        except KeyError as exc:
            pos = next(i for i, c in enumerate(text) if c not in self._id_of)
            raise ValueError(f"text contains {text[pos]!r} at position {pos}, which is not in the tokenizer alphabet") from exc

    def decode(self, ids: Any, *, skip_special: bool = True, stop_at_eos: bool = False) -> str:
        """Map ids back to a string.

        Args:
            ids: a sequence of ints or a 1-D integer tensor.
            skip_special: drop ``<pad>/<bos>/<sep>/<eos>`` instead of writing them out.
            stop_at_eos: ignore everything from the first ``<eos>`` on.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if stop_at_eos and i == self.eos_id:
                break
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside [0, {self.vocab_size})")
            if i < len(_SPECIALS) and skip_special:
                continue
            out.append(self._tok_of[i])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "CharTokenizer", "version": 1, "specials": list(_SPECIALS), "alphabet": self.alphabet,
            "source_width": self.source_width,
        }

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer table as JSON and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        if data.get("type") != "CharTokenizer" or tuple(data.get("specials", ())) != _SPECIALS:
            raise ValueError(f"{path} is not a CharTokenizer file with specials {_SPECIALS}")
        return cls(data["alphabet"], source_width=data.get("source_width"))


@dataclass
class ModelConfig:
    """Size of the GPT-2-style decoder (defaults: the ≈0.4M-parameter CPU model).

    Attributes:
        n_layer: transformer blocks.
        n_embd: model width.
        n_head: attention heads (must divide ``n_embd``).
        n_positions: maximum sequence length (BOS + source + SEP + target + EOS).
        dropout: residual/embedding/attention dropout (0 keeps LoRA deltas deterministic).
    """

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_embd", "n_head", "n_positions"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelConfig.n_head={self.n_head} must divide n_embd={self.n_embd}")
        if self.n_positions < 5:
            raise ValueError(f"ModelConfig.n_positions must be >= 5 to hold BOS a SEP b EOS, got {self.n_positions}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"ModelConfig.dropout must lie in [0, 1), got {self.dropout!r}")

    def to_gpt2_config(self, tokenizer: CharTokenizer) -> GPT2Config:
        """The equivalent :class:`transformers.GPT2Config` for ``tokenizer``'s vocabulary."""
        return GPT2Config(
            vocab_size=tokenizer.vocab_size,
            n_positions=self.n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            resid_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            attn_pdrop=self.dropout,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            tie_word_embeddings=True,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**data)


def max_target_length(cfg: ModelConfig, tokenizer: CharTokenizer) -> int:
    """Longest target (in characters) that fits after a full source field.

    Fixed-width format: ``n_positions - source_width - 3``; variable format: the longest
    ``n`` with ``n + n + 3 <= n_positions`` (equal-length source and target).
    """
    if tokenizer.source_width is None:
        return (cfg.n_positions - 3) // 2
    return cfg.n_positions - tokenizer.source_width - 3


def build_model(
    cfg: ModelConfig,
    tokenizer: CharTokenizer,
    *,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
) -> GPT2LMHeadModel:
    """Build a freshly initialised :class:`GPT2LMHeadModel` (no download).

    Args:
        cfg: model size.
        tokenizer: fixes ``vocab_size`` and the special token ids.
        seed: seeds the weight initialisation without touching the global RNG state
            (``None`` uses the current global state).
        device: where to put the model.

    Returns:
        The model in eval mode; embeddings and LM head are tied. GPT-2's attention and MLP
        projections (``c_attn``, ``c_proj``, ``c_fc``) are ``transformers`` ``Conv1D``
        layers whose weight has shape (in_features, out_features) — transposed relative to
        ``nn.Linear``.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(tokenizer, CharTokenizer):
        raise TypeError(f"tokenizer must be a CharTokenizer, got {type(tokenizer).__name__}")
    if tokenizer.source_width is not None and tokenizer.source_width + 4 > cfg.n_positions:
        raise ValueError(
            f"tokenizer.source_width={tokenizer.source_width} leaves no room for a target in n_positions={cfg.n_positions}"
        )
    gcfg = cfg.to_gpt2_config(tokenizer)
    if seed is None:
        model = GPT2LMHeadModel(gcfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = GPT2LMHeadModel(gcfg)
    # transformers infers the loss from the class name; "GPT2LMHeadModel" maps to nothing and
    # triggers a warning on first use. It is a causal LM loss: say so explicitly.
    model.loss_type = "ForCausalLM"
    return model.to(resolve_device(device)).eval()


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(sums_file: str | Path) -> dict[str, str]:
    """Check every ``<sha256>  <relative path>`` line of a ``sha256sum`` file.

    Returns:
        Mapping relative path -> sha256 (all verified).

    Raises:
        FileNotFoundError: the sums file or a listed file is missing.
        ValueError: a line is malformed or a checksum does not match (names the file).
    """
    sums_file = Path(sums_file)
    if not sums_file.is_file():
        raise FileNotFoundError(f"checksum file {sums_file} not found")
    out: dict[str, str] = {}
    for n, line in enumerate(sums_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{sums_file}:{n}: expected '<sha256>  <path>', got {line!r}")
        digest, rel = parts[0].lower(), parts[1].strip().lstrip("*")
        target = sums_file.parent / rel
        if not target.is_file():
            raise FileNotFoundError(f"{sums_file}:{n}: listed file {target} is missing")
        actual = sha256_file(target)
        if actual != digest:
            raise ValueError(f"checksum mismatch for {target}: expected {digest}, got {actual}")
        out[rel] = digest
    return out


def save_base(
    model: GPT2LMHeadModel,
    tokenizer: CharTokenizer,
    cfg: ModelConfig,
    path: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save a base model as safetensors + JSON config + tokenizer + SHA256SUMS.

    Args:
        model: a (non-peft) model built by :func:`build_model`.
        tokenizer: its tokenizer.
        cfg: its config.
        path: output directory (created).
        metadata: JSON-serialisable facts stored under ``"pretraining"`` in config.json.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    if not isinstance(model, GPT2LMHeadModel):
        raise TypeError(f"model must be a GPT2LMHeadModel (merge or unload adapters first), got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # the LM head is tied to the token embedding: store it once
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    # a single metadata key: safetensors writes metadata in hash-map order, and more keys
    # would make the bytes (and the checksum) differ from run to run
    save_file(state, str(path / _WEIGHTS), metadata={"format": "pt"})
    cfg_json = {"model": asdict(cfg), "tied_weights": {"lm_head.weight": "transformer.wte.weight"}, "pretraining": metadata or {}}
    (path / _CONFIG).write_text(json.dumps(cfg_json, indent=1, sort_keys=True) + "\n")
    tokenizer.save(path / _TOKENIZER)
    lines = [f"{sha256_file(path / f)}  {f}" for f in (_WEIGHTS, _CONFIG, _TOKENIZER)]
    (path / _SUMS).write_text("\n".join(lines) + "\n")
    return path


@dataclass
class BaseCheckpoint:
    """What :func:`load_base` returns (also unpackable as ``model, tokenizer, cfg``)."""

    model: GPT2LMHeadModel
    tokenizer: CharTokenizer
    config: ModelConfig
    metadata: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.config))


def load_base(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    verify: bool = True,
) -> BaseCheckpoint:
    """Load a base written by :func:`save_base` (default: the shipped ``data/base_copy``).

    Args:
        path: checkpoint directory; ``None`` means :data:`DEFAULT_BASE_DIR`.
        device: where to put the model (``"auto"`` allowed).
        verify: check ``SHA256SUMS`` before loading (recommended; the checkpoint may have
            been downloaded or edited).

    Returns:
        :class:`BaseCheckpoint` ``(model, tokenizer, config)`` with the model in eval mode.

    Raises:
        FileNotFoundError: the directory or a file is missing.
        ValueError: checksum mismatch or inconsistent files.
    """
    from safetensors.torch import load_file

    path = Path(DEFAULT_BASE_DIR if path is None else path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"base checkpoint directory {path} not found; create it with `python -m fedlora_lite.pretrain --out {path}`"
        )
    if verify:
        verify_checksums(path / _SUMS)
    cfg_json = json.loads((path / _CONFIG).read_text())
    cfg = ModelConfig.from_dict(cfg_json["model"])
    tokenizer = CharTokenizer.load(path / _TOKENIZER)
    model = build_model(cfg, tokenizer, seed=0, device="cpu")
    state = load_file(str(path / _WEIGHTS))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # non-persistent buffers (e.g. attention masks) may legitimately be absent
    missing = [k for k in missing if k in dict(model.named_parameters())]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match ModelConfig: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    return BaseCheckpoint(model.to(resolve_device(device)).eval(), tokenizer, cfg, cfg_json.get("pretraining", {}))
