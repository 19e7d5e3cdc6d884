"""The copy task's character tokenizer: a fixed table, built in code (no hub, no files needed).

Sequence format (shared with :mod:`~fedlora_lite.experiments.copy_task.sequences`): the
source sits in a field of fixed width ``W = tokenizer.source_width`` (24 by default),
padded with ``<pad>``::

    [BOS] s_1 ... s_m <pad> ... <pad> [SEP] t_1 ... t_n [EOS]      (m <= W)

``source_width=None`` selects the plain variable-length format ``[BOS] source [SEP] target [EOS]``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

__all__ = ["CharTokenizer", "PAD", "BOS", "SEP", "EOS", "DEFAULT_ALPHABET", "DEFAULT_SOURCE_WIDTH"]

PAD, BOS, SEP, EOS = "<pad>", "<bos>", "<sep>", "<eos>"
_SPECIALS = (PAD, BOS, SEP, EOS)
# printable ASCII without tab/newline etc.: space .. '~' (95 characters)
DEFAULT_ALPHABET = "".join(chr(c) for c in range(32, 127))
assert set(DEFAULT_ALPHABET) <= set(string.printable)
#: Width of the padded source field of the default copy-task template.
DEFAULT_SOURCE_WIDTH = 24

#: Where the shipped pretrained base lives (``data/base_copy`` at the repository root).


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


