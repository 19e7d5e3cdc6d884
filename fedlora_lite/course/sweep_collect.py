"""Aggregate a finished (or partly finished) sweep: a tidy CSV, mean ± CI per grid point, plots.

``fedlora-lite sweep collect <out>`` reads ``<out>/sweep.json`` and the marked
``results.json`` of every finished run (:mod:`fedlora_lite.course.sweep`) and writes

* ``<out>/sweep_tidy.csv``: one row per (run, metric): ``run_id``, one column per grid
  parameter, ``metric`` (the dotted key in ``results.json``), ``value``. Booleans count as
  0/1, so their mean is a rate; strings and lists are left out.
* ``<out>/sweep_summary.csv``: one row per (metric, grid point without the ``over`` axis):
  ``n``, ``mean``, ``std`` (sample), ``ci_low``, ``ci_high`` — a two-sided Student-t
  confidence interval for the mean over the ``over`` repeats (seeds), level ``level``.
* ``<out>/sweep.png``: one panel per metric, the mean against ``x`` with the confidence
  band shaded, one line per combination of the remaining grid parameters.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sweep import completed_results

__all__ = ["CollectReport", "collect_sweep", "mean_ci"]

_MAX_PANELS = 12


@dataclass
class CollectReport:
    """What :func:`collect_sweep` wrote and from how many runs."""

    tidy_csv: Path
    summary_csv: Path
    figure: Path | None
    x: str | None
    over: str | None
    metrics: list[str]
    runs_total: int
    runs_done: int
    rows: list[dict[str, Any]] = field(default_factory=list)  # the summary rows


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std and the two-sided Student-t confidence interval for the mean.

    With one value the std is 0 and the interval is the point itself (nothing to
    estimate a spread from).

    Returns:
        ``(mean, std, ci_low, ci_high)``.

    Raises:
        ValueError: no values, or ``level`` not in (0, 1).
    """
    if not values:
        raise ValueError("values must not be empty")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    from scipy import stats

    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0, mean, mean
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def _numbers(results: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Numeric leaves of a nested results mapping as (dotted key, value), in order; bools as 0/1.

    Strings, lists and non-finite numbers are not metrics a band can be drawn for and are skipped.
    """
    out: list[tuple[str, float]] = []
    stack: list[tuple[str, Any]] = list(reversed(list(results.items())))
    while stack:
        key, value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend((f"{key}.{k}", v) for k, v in reversed(list(value.items())))
        elif isinstance(value, (bool, int, float)) and math.isfinite(value):
            out.append((key, float(value)))
    return out


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


def collect_sweep(
    out: str | Path,
    *,
    x: str | None = None,
    over: str | None = None,
    metrics: Sequence[str] | None = None,
    level: float = 0.95,
    plot: bool = True,
) -> CollectReport:
    """Aggregate the finished runs of the sweep in ``out`` (see the module docstring).

    Args:
        out: the sweep folder (``out`` of the sweep file).
        x: grid parameter on the x axis; default the sweep file's ``[collect] x``, else the
            non-``over`` grid parameter with the most values (None when the grid has none).
        over: grid parameter the interval is taken over; default ``[collect] over`` or
            ``"seed"`` when the grid has it (None: every grid point is its own group).
        metrics: dotted result keys to summarise and plot; default ``[collect] metrics``,
            else every numeric key (the plot shows the first 12).
        level: confidence level of the band.
        plot: write ``sweep.png``.

    Raises:
        FileNotFoundError: ``out`` is not a sweep folder.
        ValueError: no finished run yet, or ``x``/``over``/``metrics`` name something the
            sweep does not have.
    """
    out = Path(out)
    manifest, done = completed_results(out)
    grid: dict[str, list[Any]] = manifest["grid"]
    collect = manifest.get("collect", {})
    if not done:
        raise ValueError(f"{out}: no finished run yet ({len(manifest['runs'])} planned); run the sweep first")
    over = over if over is not None else collect.get("over", "seed" if "seed" in grid else None)
    if over is not None and over not in grid:
        raise ValueError(f"over must be a grid parameter {list(grid)}, got {over!r}")
    axes = [k for k in grid if k != over]
    x = x if x is not None else collect.get("x", max(axes, key=lambda k: len(grid[k])) if axes else None)
    if x is not None and x not in axes:
        raise ValueError(f"x must be a grid parameter other than over={over!r}: {axes}, got {x!r}")

    tidy = []
    for payload in done:
        marker = payload["sweep"]
        point = {k: marker["parameters"][k] for k in grid}
        for metric, value in _numbers(payload.get("results", {})):
            tidy.append({"run_id": marker["run_id"], **point, "metric": metric, "value": value})
    available = list(dict.fromkeys(r["metric"] for r in tidy))
    wanted = list(metrics) if metrics is not None else collect.get("metrics") or available
    missing = [m for m in wanted if m not in available]
    if missing:
        raise ValueError(f"metrics {missing} are not numeric keys of the results; available: {available}")

    groups: dict[tuple[Any, ...], list[float]] = {}
    for r in tidy:
        if r["metric"] in wanted:
            key = (r["metric"], *(json.dumps(r[a]) for a in axes))
            groups.setdefault(key, []).append(r["value"])
    rows = []
    for key, values in groups.items():
        mean, std, lo, hi = mean_ci(values, level)
        point = {a: json.loads(v) for a, v in zip(axes, key[1:])}
        rows.append({"metric": key[0], **point, "n": len(values), "mean": mean, "std": std,
                     "ci_low": lo, "ci_high": hi})
    rows.sort(key=lambda r: (wanted.index(r["metric"]), *(_sort_key(r[a]) for a in axes)))

    tidy_csv = _write_csv(out / "sweep_tidy.csv", ["run_id", *grid, "metric", "value"], tidy)
    summary_csv = _write_csv(out / "sweep_summary.csv", ["metric", *axes, "n", "mean", "std", "ci_low", "ci_high"],
                             rows)
    figure = _plot(out / "sweep.png", rows, wanted[:_MAX_PANELS], x, [a for a in axes if a != x], over, level,
                   manifest["notebook"]) if plot else None
    return CollectReport(tidy_csv=tidy_csv, summary_csv=summary_csv, figure=figure, x=x, over=over,
                         metrics=list(wanted), runs_total=len(manifest["runs"]), runs_done=len(done), rows=rows)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict, bool)) else v for k, v in r.items()})
    return path


def _plot(path: Path, rows: list[dict[str, Any]], metrics: list[str], x: str | None, hue: list[str],
          over: str | None, level: float, title: str) -> Path:
    from matplotlib.figure import Figure  # no pyplot: works headless and leaves no global figure

    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    axs = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axs, metrics):
        mine = [r for r in rows if r["metric"] == metric]
        combos = sorted({tuple(json.dumps(r[h]) for h in hue) for r in mine})
        for combo in combos:
            line = [r for r in mine if tuple(json.dumps(r[h]) for h in hue) == combo]
            line.sort(key=lambda r: _sort_key(r[x]) if x else 0)
            xs = [r[x] for r in line] if x else list(range(len(line)))
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
            pos = xs if numeric else list(range(len(xs)))
            label = ", ".join(f"{h}={json.loads(c)}" for h, c in zip(hue, combo)) or None
            (ln,) = ax.plot(pos, [r["mean"] for r in line], "o-", ms=4, label=label)
            if any(r["n"] > 1 for r in line):
                ax.fill_between(pos, [r["ci_low"] for r in line], [r["ci_high"] for r in line],
                                color=ln.get_color(), alpha=0.2, linewidth=0)
            if not numeric:
                ax.set_xticks(pos, [str(v) for v in xs])
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(x or "run")
        ax.grid(True, alpha=0.3)
        if len(combos) > 1:
            ax.legend(fontsize=7)
    for ax in axs[len(metrics):]:
        ax.set_visible(False)
    ns = sorted({r["n"] for r in rows if r["metric"] in metrics})
    count = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]}"
    band = f"mean ± {level:.0%} CI over {over}, {count} per point" if over else "one run per point"
    fig.suptitle(f"sweep of {title} ({band})", fontsize=10)
    fig.savefig(path, dpi=110)
    return path
