"""Tests for fedlora_lite.course.plotting: each helper draws labelled content and returns its Axes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from fedlora_lite.course.plotting import (
    plot_block_matrix,
    plot_client_scores,
    plot_phase_transition,
    plot_singular_values,
    plot_sweep,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_phase_transition_heatmap():
    vals = np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 0.2]])
    ax = plot_phase_transition(vals, [1, 2], [0.1, 0.2, 0.3], row_label="rank", col_label="contamination")
    assert ax.get_xlabel() == "contamination" and ax.get_ylabel() == "rank"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "0.2", "0.3"]
    assert len(ax.texts) == 6
    np.testing.assert_array_equal(ax.images[0].get_array(), vals)
    with pytest.raises(ValueError, match="shape"):
        plot_phase_transition(vals, [1], [0.1, 0.2, 0.3], row_label="r", col_label="c")


def test_sweep_mean_and_band():
    x = [0.1, 0.2, 0.4]
    trials = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    _, ax = plt.subplots()
    out = plot_sweep(x, {"clair": trials, "local": [2.0, 2.0, 2.0]}, xlabel="noise", ylabel="error", logx=True, ax=ax)
    assert out is ax and ax.get_xscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["clair"].get_ydata(), [2.0, 3.0, 4.0])
    assert len(ax.collections) == 1  # one std band (the single-run method has none)
    with pytest.raises(ValueError, match="shape"):
        plot_sweep(x, {"bad": [1.0, 2.0]}, xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="at least one"):
        plot_sweep(x, {}, xlabel="x", ylabel="y")


def test_client_scores_colours_and_threshold():
    scores = torch.tensor([0.0, 0.9, 0.1])
    ax = plot_client_scores(scores, 0.5, contaminated=torch.tensor([False, True, False]))
    bars = ax.patches
    assert len(bars) == 3 and bars[1].get_facecolor() != bars[0].get_facecolor()
    assert any(np.allclose(line.get_ydata(), 0.5) for line in ax.get_lines())
    with pytest.raises(ValueError, match="contaminated"):
        plot_client_scores(scores, 0.5, contaminated=[True])


def test_singular_values_marks_the_rank():
    ax = plot_singular_values(torch.tensor([5.0, 3.0, 1.0, 0.0]), rank=3, label="L-hat")
    assert ax.get_yscale() == "log"
    assert any(np.allclose(line.get_xdata(), 3.5) for line in ax.get_lines())
    with pytest.raises(ValueError, match="non-negative"):
        plot_singular_values([1.0, -1.0])


def test_block_matrix_boundaries_and_marks():
    mat = torch.arange(24.0).reshape(3, 8) - 12.0
    ax = plot_block_matrix(mat, [2, 2, 4], contaminated=[False, True, False], vmax=20.0, title="M")
    assert [round(float(line.get_xdata()[0]), 1) for line in ax.get_lines()] == [1.5, 3.5]  # two inner boundaries
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert [t.get_color() for t in ax.get_xticklabels()][1] == "tab:red"
    assert ax.images[0].get_clim() == (-20.0, 20.0)
    with pytest.raises(ValueError, match="sum to the matrix width"):
        plot_block_matrix(mat, [2, 2])
    with pytest.raises(ValueError, match="contaminated"):
        plot_block_matrix(mat, [4, 4], contaminated=[True])
