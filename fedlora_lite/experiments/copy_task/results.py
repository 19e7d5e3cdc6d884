"""The copy-task experiment's results: per-client records, detection, spectra, and tables over seeds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import ExperimentConfig

__all__ = ["ExperimentResult"]


@dataclass
class ExperimentResult:
    """Everything measured by :func:`run_copy_experiment`.

    Attributes:
        config: the configuration.
        records: one dict per (seed, contamination, method, benign client) with
            ``token_accuracy``, ``exact_match`` (None where not measured) and ``choice`` (the
            candidate the client kept).
        detection: one dict per (seed, contamination, flagging method) with precision,
            recall, F1, flagged and truly contaminated clients, kinds (and for CLAIR the
            joint scores and the residual ratio of its flag rule).
        spectra: per seed, per module: singular values of the stacked updates (output
            side) — ``local_all``, ``local_benign`` (true benign) and ``clair_refined``
            (CLAIR's collaborative set after refinement) — at the headline fraction.
        clair_ranks: per seed, per module: the shared rank CLAIR chose (headline fraction).
        excluded: per seed, client index -> reason.
        timings: seconds per stage (local training, aggregation, evaluation, total).
        cache: {"trained": n, "loaded": m} adapters over all seeds.
        detection_paths: per seed, at the headline fraction, what CLAIR's flag rule saw
            (rank path, leave-one-out residuals per rank and client, the stable run, the
            residual ratio, flags, the decomposition's scores, the truth).
    """

    config: ExperimentConfig
    records: list[dict[str, Any]]
    detection: list[dict[str, Any]]
    spectra: dict[int, dict[str, dict[str, list[float]]]]
    clair_ranks: dict[int, dict[str, int]]
    excluded: dict[int, dict[int, str]]
    timings: dict[str, float]
    cache: dict[str, int]
    detection_paths: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.records))

    def per_seed(self, metric: str = "token_accuracy", contamination: float | None = None) -> dict[str, np.ndarray]:
        """Method -> (S,) mean over benign clients of ``metric`` for each seed."""
        f = self.config.task.contamination if contamination is None else contamination
        out: dict[str, np.ndarray] = {}
        for m in self.methods:
            vals = []
            for s in self.config.seeds:
                xs = [r[metric] for r in self.records if r["method"] == m and r["seed"] == s
                      and abs(r["contamination"] - f) < 1e-9 and r[metric] is not None]
                if xs:
                    vals.append(float(np.mean(xs)))
            if vals:
                out[m] = np.array(vals)
        return out

    def table(self, contamination: float | None = None) -> list[dict[str, Any]]:
        """Rows (one per method) of mean ± std over seeds of the benign-client mean metrics."""
        acc = self.per_seed("token_accuracy", contamination)
        em = self.per_seed("exact_match", contamination)
        rows = []
        for m, v in acc.items():
            e = em.get(m)
            rows.append({"method": m, "token_accuracy_mean": float(v.mean()), "token_accuracy_std": float(v.std()),
                         "exact_match_mean": None if e is None else float(e.mean()),
                         "exact_match_std": None if e is None else float(e.std()), "seeds": int(v.size)})
        return rows

    def detection_summary(self, method: str = "clair") -> list[dict[str, Any]]:
        """Per contamination fraction: a method's precision / recall / F1, mean and std over seeds."""
        rows = []
        for f in self.config.sweep:
            ds = [d for d in self.detection if abs(d["contamination"] - f) < 1e-9 and d.get("method", "clair") == method]
            if not ds:
                continue
            row: dict[str, Any] = {"contamination": f}
            for key in ("precision", "recall", "f1"):
                v = np.array([d[key] for d in ds])
                row[f"{key}_mean"], row[f"{key}_std"] = float(v.mean()), float(v.std())
            row["exact"] = sum(bool(d["exact"]) for d in ds)
            rows.append(row)
        return rows

    def paired(self, method: str, reference: str, metric: str = "token_accuracy",
               contamination: float | None = None) -> np.ndarray:
        """(S,) per-seed differences method - reference of the benign-client means (paired by seed)."""
        per = self.per_seed(metric, contamination)
        return per[method] - per[reference]

    def choices(self, method: str = "clair", contamination: float | None = None) -> dict[str, int]:
        """How often each candidate setting was kept by the clients (headline fraction by default)."""
        f = self.config.task.contamination if contamination is None else contamination
        out: dict[str, int] = {}
        for r in self.records:
            if r["method"] == method and abs(r["contamination"] - f) < 1e-9:
                out[r["choice"]] = out.get(r["choice"], 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def sweep_curves(self, metric: str = "token_accuracy") -> dict[str, np.ndarray]:
        """Method -> (S, F) benign-client mean ``metric`` per seed and sweep fraction."""
        curves: dict[str, list[list[float]]] = {}
        for f in self.config.sweep:
            per = self.per_seed(metric, f)
            for m, v in per.items():
                curves.setdefault(m, []).append(list(v))
        return {m: np.array(v).T for m, v in curves.items() if len(v) == len(self.config.sweep)}


