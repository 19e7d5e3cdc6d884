"""Small matplotlib helpers shared by the notebooks.

Each helper draws on a given Axes (or a new one), labels its axes and returns the Axes;
none calls ``plt.show()`` (the notebook does, so figures render once under nbval):

* :func:`plot_phase_transition`: a heatmap over a 2-D parameter grid (e.g. success rate
  against contamination fraction and rank);
* :func:`plot_sweep`: mean +- std over repeated trials of several methods along a sweep;
* :func:`plot_client_scores`: per-client contamination scores with the flag threshold;
* :func:`plot_singular_values`: a singular-value spectrum with the chosen rank marked;
* :func:`plot_block_matrix`: a stacked matrix M = [M_1, ..., M_K] (or L-hat, S-hat) as a
  heatmap with the client block boundaries drawn and contaminated clients marked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["plot_block_matrix", "plot_client_scores", "plot_phase_transition", "plot_singular_values", "plot_sweep"]


def _axes(ax: Any, figsize: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=float)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf values")
    return arr


def _tick_labels(values: Sequence[Any]) -> list[str]:
    return [f"{v:g}" if isinstance(v, (int, float, np.integer, np.floating)) else str(v) for v in values]


def plot_phase_transition(
    values: Any,
    row_values: Sequence[Any],
    col_values: Sequence[Any],
    *,
    row_label: str,
    col_label: str,
    title: str | None = None,
    colorbar_label: str = "success rate",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    cmap: str = "viridis",
    annotate: bool = True,
    ax: Any = None,
) -> Any:
    """Heatmap of ``values[i, j]`` over a grid (row i = ``row_values[i]``, column j = ``col_values[j]``).

    Args:
        values: (R, C) array (numpy or torch).
        row_values: R labels for the y-axis (drawn bottom to top).
        col_values: C labels for the x-axis.
        row_label, col_label: axis labels.
        title: optional title.
        colorbar_label: label of the colour bar.
        vmin, vmax: colour limits (default [0, 1] for rates; None = data range).
        cmap: matplotlib colormap name.
        annotate: write each cell's value in the cell.
        ax: Axes to draw on; default a new figure.

    Returns:
        The Axes.
    """
    arr = _to_numpy(values, "values")
    if arr.ndim != 2 or arr.shape != (len(row_values), len(col_values)):
        raise ValueError(
            f"values must have shape (len(row_values), len(col_values)) = ({len(row_values)}, {len(col_values)}), got {arr.shape}"
        )
    ax = _axes(ax, (1.0 + 0.7 * arr.shape[1], 1.0 + 0.5 * arr.shape[0]))
    im = ax.imshow(arr, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(arr.shape[1]), _tick_labels(col_values))
    ax.set_yticks(range(arr.shape[0]), _tick_labels(row_values))
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    if title:
        ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, label=colorbar_label)
    if annotate:
        lo = np.min(arr) if vmin is None else vmin
        hi = np.max(arr) if vmax is None else vmax
        mid = 0.5 * (lo + hi)
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                colour = "black" if arr[i, j] > mid else "white"
                ax.text(j, i, f"{arr[i, j]:.2g}", ha="center", va="center", fontsize=8, color=colour)
    return ax


def plot_sweep(
    x: Sequence[float],
    results: Mapping[str, Any],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
    band: bool = True,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
    ax: Any = None,
) -> Any:
    """Mean +- one standard deviation of several methods along a sweep.

    Args:
        x: the S swept values.
        results: method name -> array of shape (S,) (one run) or (T, S) (T trials; the
            mean and std are taken over trials).
        xlabel, ylabel, title: labels.
        logx, logy: logarithmic axes.
        band: shade mean +- std (otherwise draw error bars).
        styles: optional per-method keyword arguments for ``ax.plot`` (colour, linestyle...).
        ax: Axes to draw on; default a new figure.

    Returns:
        The Axes.
    """
    xs = _to_numpy(x, "x")
    if xs.ndim != 1:
        raise ValueError(f"x must be 1-D, got shape {xs.shape}")
    if not results:
        raise ValueError("results must name at least one method")
    ax = _axes(ax, (6.0, 4.0))
    styles = styles or {}
    for name, values in results.items():
        arr = _to_numpy(values, f"results[{name!r}]")
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != xs.size:
            raise ValueError(f"results[{name!r}] must have shape ({xs.size},) or (trials, {xs.size}), got {arr.shape}")
        mean, std = arr.mean(axis=0), arr.std(axis=0)
        style = {"marker": "o", "markersize": 4, **styles.get(name, {})}
        if band or arr.shape[0] == 1:
            (line,) = ax.plot(xs, mean, label=name, **style)
            if arr.shape[0] > 1:
                lower = np.maximum(mean - std, mean * 1e-3) if logy else mean - std
                ax.fill_between(xs, lower, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        else:
            ax.errorbar(xs, mean, yerr=std, label=name, capsize=3, **style)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_client_scores(
    scores: Any,
    threshold: float | str | None = None,
    *,
    contaminated: Any = None,
    flags: Any = None,
    title: str | None = None,
    ylabel: str = "score  ||S_k||_F / ||M_k||_F",
    ax: Any = None,
) -> Any:
    """Bar chart of per-client contamination scores, the flag threshold and the flags.

    Args:
        scores: (K,) scores.
        threshold: a fixed flag threshold (drawn as a dashed line); ``"auto"``/None draws none
            (CLAIR's data-driven rule has no single threshold: pass ``flags``).
        contaminated: optional (K,) bool truth; contaminated clients are drawn in red.
        flags: optional (K,) bool decision; flagged clients get a black outline and an "x".
        title, ylabel: labels.
        ax: Axes to draw on; default a new figure.

    Returns:
        The Axes.
    """
    s = _to_numpy(scores, "scores")
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    ax = _axes(ax, (max(4.0, 0.3 * s.size + 1.5), 3.0))
    colours = ["tab:blue"] * s.size
    if contaminated is not None:
        c = np.asarray(contaminated.detach().cpu() if hasattr(contaminated, "detach") else contaminated, dtype=bool)
        if c.shape != s.shape:
            raise ValueError(f"contaminated must have shape {s.shape}, got {c.shape}")
        colours = ["tab:red" if ci else "tab:blue" for ci in c]
        from matplotlib.patches import Patch

        handles = [Patch(color="tab:blue", label="benign"), Patch(color="tab:red", label="contaminated")]
    else:
        handles = []
    ax.bar(np.arange(s.size), s, color=colours)
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        handles.append(ax.axhline(float(threshold), color="black", linestyle="--", linewidth=1,
                                  label=f"threshold {threshold:g}"))
    if flags is not None:
        f = np.asarray(flags.detach().cpu() if hasattr(flags, "detach") else flags, dtype=bool)
        if f.shape != s.shape:
            raise ValueError(f"flags must have shape {s.shape}, got {f.shape}")
        (marks,) = ax.plot(np.nonzero(f)[0], s[f] + 0.03, "kx", label="flagged")
        handles.append(marks)
    if handles:
        ax.legend(handles=handles, fontsize=8)
    ax.set_xlabel("client k")
    ax.set_ylabel(ylabel)
    ax.set_xticks(np.arange(s.size))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylim(0, max(1.0, float(s.max()) * 1.05) if s.size else 1.0)
    if title:
        ax.set_title(title)
    return ax


def plot_singular_values(
    singular_values: Any,
    *,
    rank: int | None = None,
    label: str | None = None,
    logy: bool = True,
    title: str | None = None,
    ax: Any = None,
) -> Any:
    """Singular-value spectrum (index starting at 1), with the chosen rank marked.

    Args:
        singular_values: (m,) non-negative values, descending.
        rank: if given, a vertical dotted line between index ``rank`` and ``rank + 1``.
        label: legend label of the spectrum.
        logy: logarithmic y-axis (zeros are clipped to the smallest positive value).
        title: optional title.
        ax: Axes to draw on; default a new figure.

    Returns:
        The Axes.
    """
    s = _to_numpy(singular_values, "singular_values").ravel()
    if np.any(s < 0):
        raise ValueError("singular_values must be non-negative")
    ax = _axes(ax, (5.0, 3.5))
    idx = np.arange(1, s.size + 1)
    if logy:
        positive = s[s > 0]
        floor = positive.min() * 0.5 if positive.size else 1.0
        ax.semilogy(idx, np.maximum(s, floor), "o-", markersize=4, label=label)
    else:
        ax.plot(idx, s, "o-", markersize=4, label=label)
    if rank is not None:
        ax.axvline(rank + 0.5, color="gray", linestyle=":", label=f"rank {rank}")
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value  s_i")
    if title:
        ax.set_title(title)
    if label is not None or rank is not None:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return ax


def plot_block_matrix(
    matrix: Any,
    block_sizes: Sequence[int],
    *,
    contaminated: Any = None,
    vmax: float | None = None,
    cmap: str = "PuOr_r",
    title: str | None = None,
    colorbar: bool = True,
    ax: Any = None,
) -> Any:
    """Heatmap of a stacked (d, sum p_k) matrix with its client blocks separated.

    Values are drawn on a symmetric diverging scale (a purple/orange map by default, so it
    never collides with the red/blue benign/contaminated convention of the other helpers);
    thin lines separate the K blocks, the x ticks name the clients at their block centres
    and contaminated clients' tick labels are red and bold.

    Args:
        matrix: (d, n) array, n = sum(block_sizes).
        block_sizes: width p_k of each client's block.
        contaminated: optional (K,) bool truth.
        vmax: colour limit (the scale is [-vmax, vmax]); default the largest absolute value.
            Pass the same value to several calls to compare M, L-hat and S-hat.
        cmap: a diverging matplotlib colormap name.
        title: optional title.
        colorbar: draw a colour bar.
        ax: Axes to draw on; default a new figure.

    Returns:
        The Axes.
    """
    arr = _to_numpy(matrix, "matrix")
    sizes = [int(b) for b in block_sizes]
    if arr.ndim != 2:
        raise ValueError(f"matrix must be 2-D (d, sum of block sizes), got shape {arr.shape}")
    if not sizes or any(b < 1 for b in sizes) or sum(sizes) != arr.shape[1]:
        raise ValueError(f"block_sizes must be positive and sum to the matrix width {arr.shape[1]}, got {sizes}")
    flags = None
    if contaminated is not None:
        flags = np.asarray(contaminated.detach().cpu() if hasattr(contaminated, "detach") else contaminated, dtype=bool)
        if flags.shape != (len(sizes),):
            raise ValueError(f"contaminated must have shape ({len(sizes)},), got {flags.shape}")
    ax = _axes(ax, (min(12.0, 2.0 + 0.06 * arr.shape[1]), 1.0 + 0.08 * arr.shape[0]))
    scale = float(np.max(np.abs(arr))) if vmax is None else float(vmax)
    scale = scale if scale > 0 else 1.0
    im = ax.imshow(arr, aspect="auto", cmap=cmap, vmin=-scale, vmax=scale, interpolation="nearest")
    edges = np.cumsum([0] + sizes) - 0.5
    for x in edges[1:-1]:
        ax.axvline(x, color="0.3", linewidth=0.6)
    centres = (edges[:-1] + edges[1:]) / 2
    ax.set_xticks(centres, [str(k) for k in range(len(sizes))])
    ax.tick_params(axis="x", labelsize=7, length=0)
    if flags is not None:
        for label, bad in zip(ax.get_xticklabels(), flags):
            if bad:
                label.set_color("tab:red")
                label.set_fontweight("bold")
    ax.set_xlabel("client block k" + (" (red: contaminated)" if flags is not None and flags.any() else ""))
    ax.set_ylabel("row i")
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    return ax
