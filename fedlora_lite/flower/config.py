"""One run's settings, :class:`FlowerRunConfig`, and its transport as a Flower run config.

A Flower app receives its settings as ``context.run_config``: a flat mapping of scalars
(from ``[tool.flwr.app.config]`` of the app's ``pyproject.toml``, overridden by
``flwr run --run-config 'k=v ...'``). :meth:`FlowerRunConfig.to_run_config` writes such a
mapping and :meth:`FlowerRunConfig.from_run_config` reads it back, so the same dataclass
drives a simulation from Python (where the config travels inside the app objects) and a
deployment (where it travels as a run config). The nested configurations (the copy task,
local LoRA training, CLAIR, per-method options) travel as JSON strings, so options the
:class:`~fedlora_lite.clair.ClairConfig` gains later pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..clair.config import REFINE_MODES, ClairConfig
from ..core.validation import check_choice, check_fraction, check_positive
from ..experiments.copy_task.config import LocalTrainingConfig
from ..experiments.copy_task.tasks import CopyTaskConfig

__all__ = ["METHODS", "DOWNLINKS", "FLAGGED_POLICIES", "FAULTS", "FlowerRunConfig", "paper_clair_config"]

METHODS: tuple[str, ...] = ("fedavg", "median", "trimmed_mean", "geometric_median", "krum", "multi_krum",
                            "detect_average", "clair", "clair_paper")
"""Strategies a run can compare (see :func:`fedlora_lite.flower.strategies.build_strategy`)."""

DOWNLINKS: tuple[str, ...] = ("rank", "exact")
"""How a node's model is sent: ``rank`` = truncated SVD to the LoRA rank r (a standard peft
adapter, the uplink's size); ``exact`` = an exact adapter of the update's numerical rank."""

FLAGGED_POLICIES: tuple[str, ...] = ("own", "collaborative", "unchanged")
"""What CLAIR sends a flagged node: its own update (``own``, the in-process convention),
the collaborative set's average (``collaborative``) or its previous model (``unchanged``)."""

FAULTS: tuple[str, ...] = ("nan", "keys", "rank", "crash")
"""Malformed replies a node can be told to send (tests and demonstrations of the screening)."""


def _default_task() -> CopyTaskConfig:
    # the copy-task experiment's task (notebook 05), 10 nodes, 30% contaminated
    return CopyTaskConfig(num_clients=10, contamination=0.3, letters="abcdefghijklmnop", num_shared=6, focus_size=6,
                          focus_mass=0.2, train_size=(2, 5), eval_size=64, length=(8, 16))


def paper_clair_config(config: ClairConfig | None = None) -> ClairConfig:
    """``config`` with the paper's refinement (own in-subspace part + collaborative average off it).

    The refinement mode the library calls the paper's is ``"paper"`` where it exists and
    ``"average"`` otherwise (``docs/CLAIR.md``); every other option of ``config`` is kept.
    """
    base = ClairConfig() if config is None else config
    return base.with_options(refine="paper" if "paper" in REFINE_MODES else "average")


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _parse_faults(value: Any) -> dict[int, str]:
    if isinstance(value, str):
        items = [p.split(":", 1) for p in value.replace(" ", "").split(",") if p]
        if any(len(p) != 2 or not p[0].isdigit() for p in items):
            raise ValueError(f"faults must look like '3:nan,5:rank', got {value!r}")
        value = {int(p): kind for p, kind in items}
    if not isinstance(value, Mapping):
        raise TypeError(f"faults must be a mapping partition -> kind or a 'p:kind,...' string, got {type(value).__name__}")
    out = {}
    for p, kind in value.items():
        out[_int(p, "faults partition", 0)] = check_choice(kind, "faults kind", FAULTS)
    return dict(sorted(out.items()))


@dataclass(frozen=True, kw_only=True)
class FlowerRunConfig:
    """Everything a federated run on Flower needs (server and clients read the same one).

    Attributes:
        methods: strategies to run one after the other on the same federation (:data:`METHODS`).
        num_rounds: R rounds of local training -> aggregation -> evaluation per method.
        task: the copy task; ``task.num_clients`` is the number of nodes K (partition ids
            0..K-1) and ``task.contamination`` the contaminated fraction. Node p holds client
            p of ``make_client_pool(task, K - n_c, n_c, make_generator(seed))``: benign
            first, then the contaminated kinds in turn (so partitions K - n_c .. K - 1 are
            contaminated).
        local: local LoRA training of every node (rank, alpha, steps, lr, targets).
        clair: CLAIR's options (default ``ClairConfig()``); ``clair_paper`` uses
            :func:`paper_clair_config` of it, ``detect_average`` its flags.
        seed: run seed (task, LoRA initialisation, batch order, node sampling).
        downlink: :data:`DOWNLINKS`.
        flagged_policy: :data:`FLAGGED_POLICIES` (CLAIR only).
        fraction_train: fraction of the connected nodes sampled per round (partial participation).
        min_replies: fewest valid replies a round needs to aggregate (else the round keeps
            every model and records why); at least 3.
        weighted: FedAvg and detect-then-average weight updates by the examples a node trained on.
        method_options: per-method options of :func:`fedlora_lite.federated.aggregate`
            (e.g. ``{"trimmed_mean": {"trim": 0.2}, "krum": {"f": 2}}``).
        round_timeout: seconds to wait for the replies of one phase (stragglers past it are
            recorded as missing).
        output_dir: where ``flower_results.json`` and the checkpoints go (None = no files).
        resume: continue a method from its last completed round found under ``output_dir``.
        evaluate_base: evaluate the untouched base on every node before round 1 (round 0).
        base_dir: checkpoint of the base; None = the shipped ``data/base_copy``.
        faults: partition -> :data:`FAULTS` kind: that node sends a malformed reply.
        threads: torch threads a node uses (0 = leave torch's setting).
        save_updates: also write every round's uploads and estimates next to the checkpoints
            (the equivalence check reads them).
    """

    methods: tuple[str, ...] = ("clair",)
    num_rounds: int = 5
    task: CopyTaskConfig = field(default_factory=_default_task)
    local: LocalTrainingConfig = field(default_factory=lambda: LocalTrainingConfig(steps=10))
    clair: ClairConfig = field(default_factory=ClairConfig)
    seed: int = 0
    downlink: str = "rank"
    flagged_policy: str = "own"
    fraction_train: float = 1.0
    min_replies: int = 3
    weighted: bool = True
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: {"trimmed_mean": {"trim": 0.2}})
    round_timeout: float = 600.0
    output_dir: str | None = None
    resume: bool = True
    evaluate_base: bool = True
    base_dir: str | None = None
    faults: Mapping[int, str] = field(default_factory=dict)
    threads: int = 1
    save_updates: bool = False

    def __post_init__(self) -> None:
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        if not methods:
            raise ValueError(f"methods must name at least one of {METHODS}")
        for m in methods:
            check_choice(m, "methods", METHODS)
        object.__setattr__(self, "methods", tuple(dict.fromkeys(methods)))
        _int(self.num_rounds, "num_rounds", 1)
        for name, cls in (("task", CopyTaskConfig), ("local", LocalTrainingConfig), ("clair", ClairConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        _int(self.seed, "seed", 0)
        check_choice(self.downlink, "downlink", DOWNLINKS)
        check_choice(self.flagged_policy, "flagged_policy", FLAGGED_POLICIES)
        check_fraction(self.fraction_train, "fraction_train", inclusive_high=True)
        if self.fraction_train == 0:
            raise ValueError("fraction_train must be > 0")
        _int(self.min_replies, "min_replies", 3)
        for name in ("weighted", "resume", "evaluate_base", "save_updates"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.method_options, Mapping) or any(m not in METHODS for m in self.method_options):
            raise ValueError(f"method_options must map names from {METHODS} to option dicts, got {self.method_options!r}")
        object.__setattr__(self, "method_options", {m: dict(o) for m, o in self.method_options.items()})
        check_positive(self.round_timeout, "round_timeout")
        faults = _parse_faults(self.faults)
        if any(p >= self.num_nodes for p in faults):
            raise ValueError(f"faults name partitions outside [0, {self.num_nodes}): {sorted(faults)}")
        object.__setattr__(self, "faults", faults)
        _int(self.threads, "threads", 0)

    @property
    def num_nodes(self) -> int:
        """K, the number of nodes (partitions)."""
        return self.task.num_clients

    @property
    def num_contaminated(self) -> int:
        """round(contamination K): the last partitions are contaminated."""
        return min(int(math.floor(self.task.contamination * self.num_nodes + 0.5)), self.num_nodes - 1)

    def replace(self, **changes: Any) -> FlowerRunConfig:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """The flat Flower run config (scalars only; nested configs as JSON strings)."""
        return {
            "methods": ",".join(self.methods),
            "num-server-rounds": self.num_rounds,
            "num-nodes": self.num_nodes,
            "contamination": float(self.task.contamination),
            "seed": self.seed,
            "task": json.dumps(self.task.to_dict(), sort_keys=True),
            "local": json.dumps({**dataclasses.asdict(self.local), "target_modules": list(self.local.target_modules)},
                                sort_keys=True),
            "clair": json.dumps(self.clair.to_dict(), sort_keys=True),
            "downlink": self.downlink,
            "flagged-policy": self.flagged_policy,
            "fraction-train": float(self.fraction_train),
            "min-replies": self.min_replies,
            "weighted": self.weighted,
            "method-options": json.dumps(self.method_options, sort_keys=True),
            "round-timeout": float(self.round_timeout),
            "output-dir": self.output_dir or "",
            "resume": self.resume,
            "evaluate-base": self.evaluate_base,
            "base-dir": self.base_dir or "",
            "faults": ",".join(f"{p}:{k}" for p, k in self.faults.items()),
            "threads": self.threads,
            "save-updates": self.save_updates,
        }

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], base: FlowerRunConfig | None = None) -> FlowerRunConfig:
        """``base`` (default ``FlowerRunConfig()``) with the keys present in ``run_config`` applied.

        Raises:
            ValueError: an unknown key (the message lists the valid ones) or a bad value.
        """
        cfg = cls() if base is None else base
        if not run_config:
            return cfg
        known = set(cfg.to_run_config())
        unknown = sorted(set(run_config) - known)
        if unknown:
            raise ValueError(f"unknown run-config keys {unknown}; valid keys are {sorted(known)}")
        rc = dict(run_config)
        changes: dict[str, Any] = {}
        task = cfg.task.to_dict()
        if "task" in rc:
            task.update(json.loads(rc["task"]))
        if "num-nodes" in rc:
            task["num_clients"] = int(rc["num-nodes"])
        if "contamination" in rc:
            task["contamination"] = float(rc["contamination"])
        for key in ("kinds", "train_size", "length", "word_length"):
            task[key] = tuple(task[key])
        changes["task"] = CopyTaskConfig(**task)
        if "local" in rc:
            changes["local"] = LocalTrainingConfig(**json.loads(rc["local"]))
        if "clair" in rc:
            changes["clair"] = ClairConfig(**json.loads(rc["clair"]))
        if "method-options" in rc:
            changes["method_options"] = json.loads(rc["method-options"])
        simple = {"methods": ("methods", lambda v: tuple(m for m in str(v).split(",") if m)),
                  "num-server-rounds": ("num_rounds", int), "seed": ("seed", int), "downlink": ("downlink", str),
                  "flagged-policy": ("flagged_policy", str), "fraction-train": ("fraction_train", float),
                  "min-replies": ("min_replies", int), "weighted": ("weighted", bool),
                  "round-timeout": ("round_timeout", float), "output-dir": ("output_dir", lambda v: str(v) or None),
                  "resume": ("resume", bool), "evaluate-base": ("evaluate_base", bool),
                  "base-dir": ("base_dir", lambda v: str(v) or None), "faults": ("faults", str), "threads": ("threads", int),
                  "save-updates": ("save_updates", bool)}
        for key, (name, conv) in simple.items():
            if key in rc:
                changes[name] = conv(rc[key])
        return dataclasses.replace(cfg, **changes)

    def fingerprint(self) -> str:
        """Hash of everything that determines the trajectory of a method (checkpoints are keyed by it)."""
        rc = self.to_run_config()
        for key in ("methods", "num-server-rounds", "output-dir", "resume", "round-timeout", "evaluate-base", "threads", "save-updates"):
            rc.pop(key)
        return hashlib.sha256(json.dumps(rc, sort_keys=True).encode()).hexdigest()[:16]
