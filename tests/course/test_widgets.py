"""Widget cells (fedlora_lite.course.widgets): live sliders redraw, batch runs draw one static figure."""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")

import nbformat  # noqa: E402
import pytest  # noqa: E402

from fedlora_lite.course.runner import run_notebooks  # noqa: E402
from fedlora_lite.course.widgets import WIDGETS_ENV, Choice, Slider, interactive_figure, widget_mode  # noqa: E402

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

WIDGET_CELL = '''from fedlora_lite.course.widgets import interactive_figure

def plot(ax, slope, kind):
    ax.plot([0, 1], [0, slope], label=kind)

interactive_figure(plot, sliders={"slope": (0.0, 4.0, 0.5), "kind": ["a", "b"]}, values={"slope": 1.5, "kind": "b"})'''


class Recorder:
    """A plotting function that records its calls and draws a line of height ``a``."""

    def __init__(self):
        self.calls = []

    def __call__(self, ax, a, kind="x"):
        self.calls.append({"a": a, "kind": kind})
        ax.plot([0, 1], [0, a])
        ax.set_title(kind)


def _height(handle):
    return handle.figure.axes[0].lines[0].get_ydata()[1]


def test_static_mode_draws_once_at_the_values(monkeypatch):
    monkeypatch.delenv(WIDGETS_ENV, raising=False)
    rec = Recorder()
    h = interactive_figure(rec, {"a": (0.0, 2.0), "kind": ["x", "y"]}, {"a": 1.25, "kind": "y"})
    assert h.mode == "static"  # plain Python, no kernel
    assert rec.calls == [{"a": 1.25, "kind": "y"}]
    assert h.controls == {} and h.widget is None
    assert _height(h) == 1.25 and h.figure.axes[0].get_title() == "y"
    h.update(a=0.5)  # static: redraw at the new values
    assert rec.calls[-1] == {"a": 0.5, "kind": "y"} and _height(h) == 0.5


def test_live_mode_redraws_in_place_when_a_slider_moves():
    rec = Recorder()
    h = interactive_figure(
        rec,
        {"a": Slider(0.1, 10.0, log=True, label="lambda"), "kind": Choice(("x", "y"))},
        {"a": 1.0, "kind": "x"},
        mode="live",
        figsize=(3, 2),
    )
    assert h.mode == "live" and set(h.controls) == {"a", "kind"}
    slider = h.controls["a"]
    assert type(slider).__name__ == "FloatLogSlider" and (slider.min, slider.max) == pytest.approx((-1.0, 1.0))
    assert slider.description == "lambda" and not slider.continuous_update
    assert h.draws == 1 and _height(h) == 1.0
    first = h.figure
    slider.value = 3.0  # what a user's drag does
    assert h.draws == 2 and _height(h) == pytest.approx(3.0) and h.figure is not first
    h.update(kind="y")  # moves the dropdown, which redraws
    assert h.controls["kind"].value == "y" and rec.calls[-1] == {"a": pytest.approx(3.0), "kind": "y"}
    assert h.draws == 3


def test_slider_kinds_from_shorthand():
    h = interactive_figure(Recorder(), {"a": (1, 9, 2)}, {"a": 3}, mode="live")
    assert type(h.controls["a"]).__name__ == "IntSlider" and (h.controls["a"].min, h.controls["a"].step) == (1, 2)
    h = interactive_figure(Recorder(), {"a": (0.0, 1.0)}, {"a": 0.5}, mode="live")
    assert type(h.controls["a"]).__name__ == "FloatSlider" and h.controls["a"].step == pytest.approx(0.01)


def test_mode_detection(monkeypatch):
    monkeypatch.setenv("JPY_SESSION_NAME", "/nb/x.ipynb")
    monkeypatch.delenv(WIDGETS_ENV, raising=False)
    assert widget_mode() == "static"  # a front-end variable alone is not enough outside a kernel
    monkeypatch.setenv(WIDGETS_ENV, "live")
    assert widget_mode() == "live" and widget_mode("static") == "static"
    monkeypatch.setenv(WIDGETS_ENV, "Static ")
    assert widget_mode() == "static"
    monkeypatch.setenv(WIDGETS_ENV, "sometimes")
    with pytest.raises(ValueError, match=WIDGETS_ENV):
        widget_mode()
    with pytest.raises(ValueError, match="mode"):
        widget_mode("interactive")


@pytest.mark.parametrize(
    ("sliders", "values", "error", "match"),
    [
        ({"a": (0.0, 1.0)}, {}, ValueError, "missing"),
        ({"a": (0.0, 1.0)}, {"a": 0.5, "b": 1}, ValueError, "no slider"),
        ({"a": (0.0, 1.0)}, {"a": 2.0}, ValueError, "outside"),
        ({"a": (0, 5)}, {"a": 2.5}, ValueError, "integer"),
        ({"a": (0.0, 1.0)}, {"a": "high"}, TypeError, "number"),
        ({"a": ["x", "y"]}, {"a": "z"}, ValueError, "options"),
        ({"a": (1.0, 0.0)}, {"a": 0.5}, ValueError, "low < high"),
        ({"a": (0.0,)}, {"a": 0.0}, TypeError, "Slider, a Choice"),
        ({"a b": (0.0, 1.0)}, {"a b": 0.5}, ValueError, "identifiers"),
        ({}, {}, TypeError, "non-empty"),
    ],
)
def test_bad_input_is_refused(sliders, values, error, match):
    with pytest.raises(error, match=match):
        interactive_figure(Recorder(), sliders, values, mode="static")


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="plot_fn"):
        interactive_figure("plot", {"a": (0.0, 1.0)}, {"a": 0.5})
    with pytest.raises(ValueError, match="log Slider needs low > 0"):
        Slider(0.0, 1.0, log=True)
    with pytest.raises(ValueError, match="figsize"):
        interactive_figure(Recorder(), {"a": (0.0, 1.0)}, {"a": 0.5}, figsize=(0, 3))
    h = interactive_figure(Recorder(), {"a": (0.0, 1.0)}, {"a": 0.5}, mode="live")
    with pytest.raises(ValueError, match="outside"):
        h.update(a=7.0)
    with pytest.raises(ValueError, match="no slider"):
        h.update(b=0.1)


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_runner_executes_a_widget_cell_as_one_static_figure(make_notebook, tmp_path, monkeypatch):
    """Under papermill (the course runner) the cell shows one PNG and no widget, even if the caller asked for live."""
    monkeypatch.setenv(WIDGETS_ENV, "live")  # the runner's kernels override it: there is no front end
    from tests.conftest import SAVE_CELL

    make_notebook("00_widget", [WIDGET_CELL, SAVE_CELL.format(name="00_widget")])
    report = run_notebooks("smoke", out=tmp_path / "o", progress=False, notebooks_dir=tmp_path / "notebooks")
    assert report.ok, report.format_failures()
    executed = nbformat.read(tmp_path / "o" / "00_widget.ipynb", as_version=4)
    cell = next(c for c in executed.cells if c.source.startswith("from fedlora_lite.course.widgets"))
    assert [o["output_type"] for o in cell.outputs] == ["display_data"]  # one figure, no repr of the handle
    assert "image/png" in cell.outputs[0]["data"]
    assert WIDGET_MIME not in json.dumps(_outputs(executed)) and "widgets" not in executed.metadata


def test_a_kernel_started_by_a_front_end_gets_live_widgets(tmp_path, monkeypatch, notebook_builder):
    """A kernel with Jupyter Server's JPY_SESSION_NAME (and no override) shows the widget view."""
    from nbclient import NotebookClient

    kdir = tmp_path / "kernels" / "fedlora-widgets-test"
    kdir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kdir / "kernel.json").write_text(json.dumps({"argv": argv, "language": "python", "display_name": "t"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.delenv(WIDGETS_ENV, raising=False)
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "widget.ipynb"))
    nb = notebook_builder("live", [WIDGET_CELL])
    NotebookClient(nb, kernel_name="fedlora-widgets-test", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    outputs = nb.cells[-1].outputs
    assert len(outputs) == 1 and WIDGET_MIME in outputs[0]["data"]  # the controls + output box, nothing else
