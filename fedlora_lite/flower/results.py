"""Reading a Flower run's ``flower_results.json``: per-round accuracy, flags, exclusions, bytes.

The ServerApp (:mod:`fedlora_lite.flower.server`) writes one history per method: a record
per round (round 0 = the untouched base) with the sampled and participating partitions,
the excluded ones and why, CLAIR's flags and scores, each node's train metrics and
held-out accuracy, and the bytes of every phase. :class:`FlowerResult` turns it into the
tables the notebook and the README show.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FlowerResult", "BYTE_FIELDS"]

BYTE_FIELDS: tuple[str, ...] = ("train_down", "train_up", "evaluate_down", "evaluate_up")


@dataclass
class FlowerResult:
    """A run's results (the parsed ``flower_results.json``).

    Attributes:
        data: the JSON payload.
        path: the file it was read from (None when built in memory).
    """

    data: dict[str, Any]
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> FlowerResult:
        """Read ``path`` (a ``flower_results.json`` or the folder holding it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "flower_results.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: did the ServerApp run with this output_dir?")
        return cls(json.loads(p.read_text()), p)

    @property
    def methods(self) -> list[str]:
        return list(self.data["methods"])

    @property
    def config(self) -> dict[str, Any]:
        return self.data["config"]

    def history(self, method: str) -> list[dict[str, Any]]:
        if method not in self.data["methods"]:
            raise KeyError(f"no method {method!r} in this run; it has {self.methods}")
        return self.data["methods"][method]["history"]

    def rounds(self, method: str) -> list[int]:
        return [h["round"] for h in self.history(method)]

    def accuracy(self, method: str, which: str = "benign") -> list[float | None]:
        """Per round, the mean held-out token accuracy of the benign (or ``"contaminated"``) nodes."""
        return [h.get(f"accuracy_{which}") for h in self.history(method)]

    def accuracy_table(self, which: str = "benign") -> dict[str, list[float | None]]:
        """Method -> per-round mean accuracy (round 0 first when the base was evaluated)."""
        return {m: self.accuracy(m, which) for m in self.methods}

    def flagged(self, method: str) -> dict[int, list[int] | None]:
        """Round -> partitions the method flagged (None for rules that flag nobody by design)."""
        return {h["round"]: h.get("flagged") for h in self.history(method) if h["round"] > 0}

    def excluded(self, method: str) -> dict[int, dict[str, str]]:
        """Round -> {partition: reason} of the uploads that were not used."""
        return {h["round"]: h.get("excluded", {}) for h in self.history(method) if h["round"] > 0}

    def bytes(self, method: str) -> list[dict[str, int]]:
        """Per round: bytes sent down and up in the train and evaluate phases (Flower's record counts)."""
        return [{"round": h["round"], **{k: int(h["bytes"].get(k, 0)) for k in BYTE_FIELDS}} for h in self.history(method)]

    def bytes_per_node(self, method: str, from_round: int = 1) -> dict[str, float]:
        """Mean training-phase bytes per sampled node and round (rounds >= ``from_round``): ``{"down", "up"}``."""
        rows = [h for h in self.history(method) if h["round"] >= max(from_round, 1) and h.get("sampled_nodes")]
        if not rows:
            return {"down": 0.0, "up": 0.0}
        return {d: sum(h["bytes"][f"train_{d}"] / h["sampled_nodes"] for h in rows) / len(rows) for d in ("down", "up")}

    def format_accuracy_table(self, digits: int = 3, which: str = "benign") -> str:
        """A Markdown table methods x rounds of the mean accuracy of the ``which`` nodes."""
        table = self.accuracy_table(which)
        rounds = max((self.rounds(m) for m in self.methods), key=len)
        head = "| method | " + " | ".join(f"round {r}" for r in rounds) + " |"
        rows = [head, "|---|" + "---|" * len(rounds)]
        for m, vals in table.items():
            cells = ["" if v is None else f"{v:.{digits}f}" for v in vals] + [""] * (len(rounds) - len(vals))
            rows.append(f"| {m} | " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def format_bytes_table(self, methods: Sequence[str] | None = None) -> str:
        """A Markdown table of bytes per training round (mean over rounds) and per node, by method and phase."""
        rows = ["| method | train down / round | train up / round | evaluate down / round | down / node | up / node |",
                "|---|---|---|---|---|---|"]
        for m in methods or self.methods:
            b = [x for x in self.bytes(m) if x["round"] > 0]
            if not b:
                continue
            mean = {k: sum(x[k] for x in b) / len(b) for k in BYTE_FIELDS}
            per = self.bytes_per_node(m)
            rows.append(f"| {m} | {mean['train_down']:,.0f} | {mean['train_up']:,.0f} | {mean['evaluate_down']:,.0f} | "
                        f"{per['down']:,.0f} | {per['up']:,.0f} |")
        return "\n".join(rows)
