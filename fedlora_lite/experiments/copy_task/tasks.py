"""The federated text-copying task: shared structure, client-specific data, contamination.

Every client holds a handful of ``(source, target)`` string pairs (the sequence format of
:mod:`fedlora_lite.experiments.copy_task.sequences`). Sources are generated "sentences": words of lowercase
letters separated by spaces. The base model (:mod:`fedlora_lite.experiments.copy_task.pretrain`) already copies
any string; each client asks for a *transformed* copy.

Benign clients (the collaborative set C)
    * share one **letter substitution** ``shared_map``: a derangement of a fixed set A of
      ``num_shared`` letters (e.g. ``a->q, q->e, e->a``); every other letter is copied.
      This is the structure they have in common, and it is what makes their LoRA updates
      share a subspace: a substitution on A is written by the same few directions of every
      adapted weight (read "letter x of A at the aligned source position", write
      "pi(x) instead of x"), whichever client learns it;
    * write about **different things**: client k draws letters from its own distribution,
      which puts ``focus_mass`` of the probability on a client-specific set of
      ``focus_size`` letters (its "topic"), so its few examples cover only part of A;
    * optionally also have a **private substitution** (``num_private`` > 0): a
      client-specific derangement of a second letter set B (disjoint from A), a part of
      the task that no other client shares;
    * are **data-scarce and unequal**: client k has ``n_k`` training pairs with n_k drawn
      uniformly from ``train_size = (low, high)``.

With few examples a client sees some letters of A rarely or never, so local fine-tuning
alone cannot learn the whole shared substitution; averaging the benign clients' updates
can. Held-out evaluation pairs of client k come from client k's own distribution and
task, so a method is scored on what *that client* needs.

Contaminated clients (same topics and data sizes, so nothing but their targets gives
them away) come in several kinds (:data:`CONTAMINATION_KINDS`). Each contaminated client
draws its own corruption, so contaminated clients do not collude (``colluding=True``
makes all clients of a kind share one draw, a coordinated attack):

* ``"corrupted"`` — corrupted targets: the client's labels are scrambled by its own
  random permutation of the whole alphabet (systematic label flipping, e.g. a broken
  preprocessing pipeline);
* ``"conflicting"`` — a conflicting task: a substitution on ``num_shared`` *other*
  letters (outside A and B), which benign clients need copied unchanged; an average that
  includes these clients starts substituting those letters for everyone;
* ``"remapped"`` — a different derangement of the *same* letters A. Its update reads the
  same letters and writes into the same output directions as the benign updates, only
  with different coefficients, so it lies (nearly) inside their shared subspace: a
  deliberately hard case for any subspace-based detector;
* ``"noisy"`` — pure label noise: every target letter is a fresh uniformly random
  letter. The *expected* update is the same for every such client ("forget the
  source"), so several noisy clients look alike;
* ``"reversed"`` — the target is the source written backwards (a different, coherent
  task that moves attention rather than letters).

Everything is drawn from an explicit ``torch.Generator``: the same seed and configuration
give the same clients, strings and maps.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ...core.validation import check_choice, check_fraction

__all__ = [
    "CONTAMINATION_KINDS",
    "CopyTaskConfig",
    "CopyClient",
    "FederatedCopyTask",
    "make_copy_task",
    "make_client_pool",
    "random_derangement",
    "apply_substitution",
]

CONTAMINATION_KINDS: tuple[str, ...] = ("corrupted", "conflicting", "remapped", "noisy", "reversed")
"""Names of the contaminated-client kinds :func:`make_copy_task` can generate."""

_BENIGN = "benign"


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_range(value: Any, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be an int or a (low, high) pair of ints, got {value!r}")
    low = _check_int(value[0], f"{name}[0]", minimum)
    high = _check_int(value[1], f"{name}[1]", minimum)
    if high < low:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r}")
    return low, high


@dataclass(frozen=True)
class CopyTaskConfig:
    """Everything that defines a federated copy task (sizes, structure, contamination).

    Attributes:
        num_clients: K, number of clients (>= 3).
        contamination: fraction of contaminated clients in [0, 1); the count is
            ``round(contamination * K)``.
        kinds: contaminated-client kinds, assigned in turn (see :data:`CONTAMINATION_KINDS`).
        letters: the alphabet of the generated text (space separates words).
        num_shared: |A|, letters moved by the shared substitution (>= 2).
        num_private: |B|, letters of each benign client's private substitution (0 = none,
            else >= 2); A and B are disjoint.
        focus_size: letters in a client's topic.
        focus_mass: probability mass on the topic letters (the rest is uniform).
        train_size: (low, high) training pairs per client, drawn uniformly (inclusive).
        eval_size: held-out pairs per client (the test data every method is scored on).
        val_size: a client's small validation split (default 0): extra pairs from its own
            distribution that no method trains on; clients use them to choose among the
            candidates a server sends (client-side validation).
        length: (low, high) source length in characters, drawn uniformly (inclusive).
        word_length: (low, high) letters per word.
        colluding: contaminated clients of one kind share a single corruption draw.
    """

    num_clients: int = 10
    contamination: float = 0.3
    kinds: tuple[str, ...] = ("corrupted", "conflicting")
    letters: str = string.ascii_lowercase
    num_shared: int = 8
    num_private: int = 0
    focus_size: int = 6
    focus_mass: float = 0.8
    train_size: tuple[int, int] = (4, 12)
    eval_size: int = 64
    val_size: int = 0
    length: tuple[int, int] = (8, 16)
    word_length: tuple[int, int] = (2, 6)
    colluding: bool = False

    def __post_init__(self) -> None:
        _check_int(self.num_clients, "num_clients", 3)
        check_fraction(self.contamination, "contamination")
        kinds = tuple(self.kinds) if isinstance(self.kinds, (list, tuple)) else None
        if not kinds:
            raise ValueError(f"kinds must be a non-empty tuple drawn from {CONTAMINATION_KINDS}, got {self.kinds!r}")
        for k in kinds:
            check_choice(k, "kinds", CONTAMINATION_KINDS)
        object.__setattr__(self, "kinds", kinds)
        if not isinstance(self.letters, str) or len(set(self.letters)) != len(self.letters) or " " in self.letters:
            raise ValueError("letters must be a str of distinct non-space characters")
        _check_int(self.num_shared, "num_shared", 2)
        _check_int(self.num_private, "num_private", 0)

        if self.num_private == 1:
            raise ValueError("num_private must be 0 or >= 2 (a substitution needs two letters)")
        needed = 2 * self.num_shared + self.num_private
        if needed > len(self.letters):
            raise ValueError(
                f"2 * num_shared + num_private = {needed} exceeds the {len(self.letters)} letters "
                "(A, B and a conflicting client's num_shared letters must be disjoint)"
            )
        _check_int(self.focus_size, "focus_size", 1)
        if self.focus_size > len(self.letters):
            raise ValueError(f"focus_size={self.focus_size} exceeds the {len(self.letters)} letters")
        check_fraction(self.focus_mass, "focus_mass", inclusive_high=True)
        object.__setattr__(self, "train_size", _check_range(self.train_size, "train_size", 0))
        _check_int(self.eval_size, "eval_size", 1)
        _check_int(self.val_size, "val_size", 0)
        object.__setattr__(self, "length", _check_range(self.length, "length", 1))
        object.__setattr__(self, "word_length", _check_range(self.word_length, "word_length", 1))
        if not isinstance(self.colluding, bool):
            raise TypeError(f"colluding must be a bool, got {type(self.colluding).__name__}")

    @property
    def num_contaminated(self) -> int:
        """round(contamination * K) (Python rounding), at most K - 1."""
        return min(int(math.floor(self.contamination * self.num_clients + 0.5)), self.num_clients - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (used in cache keys and results files)."""
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        d["train_size"], d["length"], d["word_length"] = list(self.train_size), list(self.length), list(self.word_length)
        return d


@dataclass
class CopyClient:
    """One client's data and ground truth.

    Attributes:
        index: position in the federation.
        kind: ``"benign"`` or one of :data:`CONTAMINATION_KINDS`.
        train: the client's training pairs (may be empty for a broken client).
        eval: held-out pairs from the client's own distribution and task.
        mapping: the letter substitution the client's targets follow (empty for kinds
            that are not substitutions).
        topic: the client's focus letters.
        letter_probs: (len(letters),) probabilities of the client's letters.
        val: the client's validation pairs (``val_size`` of them; never trained on).
    """

    index: int
    kind: str
    train: list[tuple[str, str]]
    eval: list[tuple[str, str]]
    mapping: dict[str, str]
    topic: str
    letter_probs: torch.Tensor = field(repr=False)
    val: list[tuple[str, str]] = field(default_factory=list)

    @property
    def benign(self) -> bool:
        return self.kind == _BENIGN

    @property
    def num_train(self) -> int:
        return len(self.train)


@dataclass
class FederatedCopyTask:
    """K clients plus the ground truth (which are benign, the shared map).

    Attributes:
        config: the generating configuration.
        clients: K :class:`CopyClient` objects.
        shared_map: the benign clients' common substitution on A.
        shared_letters: A, the letters moved by ``shared_map``.
        private_letters: B (empty when ``num_private == 0``).
        other_letters: the letters outside A and B (where conflicting clients substitute).
    """

    config: CopyTaskConfig
    clients: list[CopyClient]
    shared_map: dict[str, str]
    shared_letters: str
    private_letters: str
    other_letters: str = ""

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def benign(self) -> torch.Tensor:
        """(K,) bool, True for benign clients."""
        return torch.tensor([c.benign for c in self.clients], dtype=torch.bool)

    @property
    def contaminated(self) -> torch.Tensor:
        """(K,) bool, True for contaminated clients."""
        return ~self.benign

    @property
    def kinds(self) -> list[str]:
        return [c.kind for c in self.clients]

    def subset(self, indices: Sequence[int]) -> FederatedCopyTask:
        """A federation made of some of these clients (re-indexed 0..len-1, data shared).

        Used to reuse one pool of locally fine-tuned clients across contamination fractions.
        """
        idx = [int(i) for i in indices]
        if len(idx) < 3 or len(set(idx)) != len(idx) or not all(0 <= i < self.num_clients for i in idx):
            raise ValueError(f"indices must be >= 3 distinct client indices in [0, {self.num_clients}), got {indices!r}")
        clients = [
            CopyClient(j, c.kind, c.train, c.eval, c.mapping, c.topic, c.letter_probs, c.val)
            for j, c in enumerate(self.clients[i] for i in idx)
        ]
        n_cont = sum(not c.benign for c in clients)
        cfg = CopyTaskConfig(**{**asdict(self.config), "num_clients": len(idx), "contamination": n_cont / len(idx)})
        return FederatedCopyTask(cfg, clients, self.shared_map, self.shared_letters, self.private_letters, self.other_letters)


def random_derangement(letters: str, generator: torch.Generator, *, avoid: dict[str, str] | None = None) -> dict[str, str]:
    """A random permutation of ``letters`` with no fixed point (and no agreement with ``avoid``).

    Args:
        letters: >= 2 distinct characters.
        generator: torch generator.
        avoid: a map whose assignments the result must not repeat (used for the
            conflicting task: no letter of A goes where the shared map sends it).

    Returns:
        dict letter -> letter, a bijection on ``letters``.
    """
    if len(letters) < 2:
        raise ValueError(f"letters must hold at least 2 characters, got {letters!r}")
    if avoid is not None and len(letters) == 2 and all(avoid.get(c) == d for c, d in zip(letters, letters[::-1])):
        raise ValueError("no derangement of 2 letters avoids the only other derangement")
    for _ in range(10_000):
        perm = torch.randperm(len(letters), generator=generator).tolist()
        out = {c: letters[j] for c, j in zip(letters, perm)}
        if any(out[c] == c for c in letters):
            continue
        if avoid is not None and any(avoid.get(c) == out[c] for c in letters):
            continue
        return out
    raise RuntimeError("could not draw a derangement")  # pragma: no cover - probability ~0


def apply_substitution(text: str, mapping: dict[str, str]) -> str:
    """Replace every character of ``text`` that ``mapping`` moves; copy the others."""
    return "".join(mapping.get(ch, ch) for ch in text)


def _letter_probs(cfg: CopyTaskConfig, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    n = len(cfg.letters)
    topic_idx = torch.randperm(n, generator=generator)[: cfg.focus_size]
    probs = torch.full((n,), (1.0 - cfg.focus_mass) / n, dtype=torch.float64)
    probs[topic_idx] += cfg.focus_mass / cfg.focus_size
    topic = "".join(cfg.letters[i] for i in sorted(topic_idx.tolist()))
    return probs / probs.sum(), topic


def _sentence(cfg: CopyTaskConfig, probs: torch.Tensor, generator: torch.Generator) -> str:
    lo, hi = cfg.length
    total = int(torch.randint(lo, hi + 1, (1,), generator=generator))
    letters = torch.multinomial(probs, total, replacement=True, generator=generator).tolist()
    chars = [cfg.letters[i] for i in letters]
    # word boundaries: a space after every word of random length, never leading or trailing
    wlo, whi = cfg.word_length
    pos = int(torch.randint(wlo, whi + 1, (1,), generator=generator))
    while pos < total - 1:
        chars[pos] = " "
        pos += 1 + int(torch.randint(wlo, whi + 1, (1,), generator=generator))
    return "".join(chars)


def _target(kind: str, src: str, mapping: dict[str, str], cfg: CopyTaskConfig, generator: torch.Generator) -> str:
    if kind == "noisy":
        idx = torch.randint(0, len(cfg.letters), (len(src),), generator=generator).tolist()
        return "".join(ch if ch == " " else cfg.letters[i] for ch, i in zip(src, idx))
    if kind == "reversed":
        return src[::-1]
    return apply_substitution(src, mapping)


def _make_client(
    index: int, kind: str, mapping: dict[str, str], cfg: CopyTaskConfig, generator: torch.Generator
) -> CopyClient:
    # one seed per client from the pool's stream, then separate streams for the training and the
    # held-out pairs: changing eval_size never changes anybody's training data
    client_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    g_train = torch.Generator().manual_seed(client_seed)
    g_eval = torch.Generator().manual_seed(client_seed ^ 0x5DEECE66D)
    probs, topic = _letter_probs(cfg, g_train)
    lo, hi = cfg.train_size
    n_train = int(torch.randint(lo, hi + 1, (1,), generator=g_train))
    train = [(s, _target(kind, s, mapping, cfg, g_train)) for s in (_sentence(cfg, probs, g_train) for _ in range(n_train))]
    ev = [(s, _target(kind, s, mapping, cfg, g_eval)) for s in (_sentence(cfg, probs, g_eval) for _ in range(cfg.eval_size))]
    g_val = torch.Generator().manual_seed(client_seed ^ 0x2545F4914F6CDD1D)  # its own stream: val_size changes nothing else
    val = [(s, _target(kind, s, mapping, cfg, g_val)) for s in (_sentence(cfg, probs, g_val) for _ in range(cfg.val_size))]
    return CopyClient(index, kind, train, ev, dict(mapping), topic, probs, val)


def _draw_structure(cfg: CopyTaskConfig, generator: torch.Generator) -> tuple[str, str, str, dict[str, str]]:
    perm = torch.randperm(len(cfg.letters), generator=generator).tolist()
    a, b = cfg.num_shared, cfg.num_private

    def pick(idx: list[int]) -> str:
        return "".join(sorted(cfg.letters[i] for i in idx))

    shared, private, other = pick(perm[:a]), pick(perm[a : a + b]), pick(perm[a + b :])
    return shared, private, other, random_derangement(shared, generator)


def _contamination_map(kind: str, task_letters: tuple[str, str, str, dict[str, str]], cfg: CopyTaskConfig,
                       generator: torch.Generator) -> dict[str, str]:
    shared, _, other, shared_map = task_letters
    if kind == "corrupted":
        return random_derangement(cfg.letters, generator)
    if kind == "conflicting":
        chosen = torch.randperm(len(other), generator=generator)[: cfg.num_shared].tolist()
        return random_derangement("".join(sorted(other[i] for i in chosen)), generator)
    if kind == "remapped":
        return random_derangement(shared, generator, avoid=shared_map)
    return {}


def make_client_pool(
    cfg: CopyTaskConfig, num_benign: int, num_contaminated: int, generator: torch.Generator
) -> FederatedCopyTask:
    """A pool of clients with explicit counts: benign first, then contaminated kinds in turn.

    Sub-federations with any contamination fraction are then
    ``pool.subset(benign_ids[:n_b] + contaminated_ids[:n_c])``, so the clients (and their
    locally fine-tuned adapters) are shared across a sweep. ``cfg.num_clients`` and
    ``cfg.contamination`` are ignored; every other field applies.

    Args:
        cfg: task configuration.
        num_benign: benign clients (>= 1).
        num_contaminated: contaminated clients (>= 0); kind j is ``cfg.kinds[j % len]``.
        generator: torch generator (consumed).

    Returns:
        A :class:`FederatedCopyTask` with ``num_benign + num_contaminated`` clients.
    """
    if not isinstance(cfg, CopyTaskConfig):
        raise TypeError(f"cfg must be a CopyTaskConfig, got {type(cfg).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _check_int(num_benign, "num_benign", 1)
    _check_int(num_contaminated, "num_contaminated", 0)
    K = num_benign + num_contaminated
    if K < 3:
        raise ValueError(f"a federation needs at least 3 clients, got num_benign + num_contaminated = {K}")
    structure = _draw_structure(cfg, generator)
    shared, private, other, shared_map = structure
    clients: list[CopyClient] = []
    for i in range(num_benign):
        mapping = dict(shared_map)
        if cfg.num_private:
            mapping.update(random_derangement(private, generator))
        clients.append(_make_client(i, _BENIGN, mapping, cfg, generator))
    colluding_maps: dict[str, dict[str, str]] = {}
    for j in range(num_contaminated):
        kind = cfg.kinds[j % len(cfg.kinds)]
        if cfg.colluding:
            if kind not in colluding_maps:
                colluding_maps[kind] = _contamination_map(kind, structure, cfg, generator)
            mapping = colluding_maps[kind]
        else:
            mapping = _contamination_map(kind, structure, cfg, generator)
        clients.append(_make_client(num_benign + j, kind, mapping, cfg, generator))
    pool_cfg = CopyTaskConfig(**{**asdict(cfg), "num_clients": K, "contamination": num_contaminated / K})
    return FederatedCopyTask(pool_cfg, clients, shared_map, shared, private, other)


def make_copy_task(cfg: CopyTaskConfig, generator: torch.Generator) -> FederatedCopyTask:
    """Generate a federation of ``cfg.num_clients`` clients, contaminated ones at random positions.

    Args:
        cfg: task configuration.
        generator: torch generator (consumed); same state and cfg => same task.

    Returns:
        A :class:`FederatedCopyTask`; ``task.benign`` is the ground-truth collaborative set.
    """
    if not isinstance(cfg, CopyTaskConfig):
        raise TypeError(f"cfg must be a CopyTaskConfig, got {type(cfg).__name__}")
    n_cont = cfg.num_contaminated
    pool = make_client_pool(cfg, cfg.num_clients - n_cont, n_cont, generator)
    order = torch.randperm(cfg.num_clients, generator=generator).tolist()
    task = pool.subset(order)
    return FederatedCopyTask(cfg, task.clients, task.shared_map, task.shared_letters, task.private_letters, task.other_letters)
