"""Live-exploration cells for the notebooks: sliders that redraw a matplotlib figure in place.

One function, :func:`interactive_figure`, turns a plotting function into a notebook cell
that works everywhere the course runs:

* **live** (JupyterLab, Notebook 7, VS Code, Colab): ipywidgets sliders above an output
  area; moving a slider re-runs the plotting function with the new values and replaces
  the figure in place;
* **static** (papermill, nbval, ``jupyter nbconvert --execute``, plain Python): the
  plotting function runs **once**, at the given ``values``, and the cell shows one
  ordinary figure. No widget is created, so executed and committed notebooks carry no
  widget state and nbval sees a plain ``image/png`` output.

Example (a notebook cell)::

    from fedlora_lite.course.widgets import Slider, interactive_figure

    def plot(ax, lam, threshold):
        res = clair(fed.theta, lam=lam, threshold=threshold)
        plot_client_scores(res.scores, res.threshold, contaminated=fed.contaminated, ax=ax)

    interactive_figure(
        plot,
        sliders={"lam": Slider(lam0 / 10, lam0 * 10, log=True), "threshold": (0.05, 0.95, 0.05)},
        values={"lam": lam0, "threshold": 0.5},
    )

Slider specifications: a :class:`Slider`, a tuple ``(low, high)`` or ``(low, high, step)``
(integers give an integer slider, like ``ipywidgets.interact``), a :class:`Choice` or a
list of options (a dropdown). ``values`` gives every control's starting value; it is also
what the static figure shows, so choose values whose figure the surrounding text describes.

How the mode is chosen (:func:`widget_mode`): ``mode="live"`` or ``"static"`` forces it;
otherwise the environment variable ``FEDLORA_LITE_WIDGETS`` (``live`` | ``static`` |
``auto``) decides when set (the course runner and the test suite set ``static`` in the
kernels they start); otherwise the cell is live only inside an IPython kernel that an
interactive front end started (Jupyter Server sets ``JPY_SESSION_NAME`` in its kernels'
environment; VS Code and Colab are recognised by ``VSCODE_PID`` / ``COLAB_RELEASE_TAG``)
and when ipywidgets is installed. Everything else is static, so a batch run never depends
on a widget front end.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.validation import check_choice

__all__ = ["WIDGETS_ENV", "Slider", "Choice", "InteractiveFigure", "interactive_figure", "widget_mode"]

WIDGETS_ENV = "FEDLORA_LITE_WIDGETS"
"""Environment variable that forces the mode: ``live``, ``static`` or ``auto``."""

_MODES = ("auto", "live", "static")
# variables that interactive front ends put in the environment of the kernels they start
_FRONTEND_ENV = ("JPY_SESSION_NAME", "VSCODE_PID", "COLAB_RELEASE_TAG")


@dataclass(frozen=True)
class Slider:
    """A numeric slider from ``low`` to ``high``.

    Attributes:
        low, high: the range (``low < high``); with ``log=True`` both must be positive.
        step: increment; default 1/100 of the range (linear), 1/50 of the decades (log),
            1 for integer sliders.
        log: logarithmic slider (``ipywidgets.FloatLogSlider``), e.g. for λ.
        integer: integer slider; default: True when ``low``, ``high`` (and ``step``) are ints.
        label: text shown beside the slider; default the parameter's name.
    """

    low: float
    high: float
    step: float | None = None
    log: bool = False
    integer: bool | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        for name in ("low", "high") + (("step",) if self.step is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"Slider {name} must be a finite number, got {v!r}")
        if not self.low < self.high:
            raise ValueError(f"Slider needs low < high, got low={self.low}, high={self.high}")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"Slider step must be positive, got {self.step}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log Slider needs low > 0, got low={self.low}")
        if self.integer is None:
            ints = all(isinstance(v, int) for v in (self.low, self.high, self.step) if v is not None)
            object.__setattr__(self, "integer", ints and not self.log)
        if self.integer and self.log:
            raise ValueError("a Slider cannot be both integer and log")

    def check(self, value: Any, name: str) -> Any:
        """Return ``value`` if it is a number inside the range; else raise naming ``name``."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"values[{name!r}] must be a finite number, got {value!r}")
        if self.integer and int(value) != value:
            raise ValueError(f"values[{name!r}] must be an integer for an integer slider, got {value!r}")
        if not self.low <= value <= self.high:
            raise ValueError(f"values[{name!r}] = {value!r} is outside its slider's range [{self.low}, {self.high}]")
        return int(value) if self.integer else value


@dataclass(frozen=True)
class Choice:
    """A dropdown over a few options (strings or numbers), e.g. a contamination kind."""

    options: tuple[Any, ...]
    label: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.options, (str, bytes)) or not isinstance(self.options, Sequence) or not self.options:
            raise TypeError(f"Choice options must be a non-empty sequence, got {self.options!r}")
        object.__setattr__(self, "options", tuple(self.options))

    def check(self, value: Any, name: str) -> Any:
        """Return ``value`` if it is one of the options; else raise naming ``name``."""
        if value not in self.options:
            raise ValueError(f"values[{name!r}] = {value!r} is not one of its options {list(self.options)}")
        return value


def _as_control(spec: Any, name: str) -> Slider | Choice:
    if isinstance(spec, (Slider, Choice)):
        return spec
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        return Slider(*spec)
    if isinstance(spec, list):
        return Choice(tuple(spec))
    raise TypeError(
        f"sliders[{name!r}] must be a Slider, a Choice, a tuple (low, high[, step]) or a list of options, got {spec!r}"
    )


def widget_mode(mode: str = "auto") -> str:
    """Decide whether a widget cell is ``"live"`` or ``"static"`` here (see the module docstring).

    Raises:
        ValueError: ``mode`` or the ``FEDLORA_LITE_WIDGETS`` variable is not one of
            ``auto``, ``live``, ``static``.
    """
    check_choice(mode, "mode", _MODES)
    if mode != "auto":
        return mode
    env = os.environ.get(WIDGETS_ENV, "").strip().lower()
    if env:
        check_choice(env, f"the environment variable {WIDGETS_ENV}", _MODES)
        if env != "auto":
            return env
    if not _in_kernel():
        return "static"
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return "static"
    return "live" if any(os.environ.get(k) for k in _FRONTEND_ENV) else "static"


def _in_kernel() -> bool:
    """True inside an IPython *kernel* (a terminal IPython cannot show widgets)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _show(fig: Any) -> None:
    """Display ``fig`` in the current cell / output widget (when in IPython), then release it."""
    import matplotlib.pyplot as plt

    if _in_kernel():
        from IPython.display import display

        display(fig)
    plt.close(fig)  # the handle keeps the Figure; pyplot (and the inline backend) forget it


class InteractiveFigure:
    """What :func:`interactive_figure` returns: the current values, the last figure, the controls.

    Attributes:
        mode: ``"live"`` or ``"static"``.
        values: the parameter values of the figure shown now.
        figure: the last matplotlib ``Figure`` drawn.
        controls: ``{name: ipywidgets control}`` (live mode; empty when static).
        widget: the ipywidgets box holding controls and figure (live mode; None when static).
        draws: how many times the plotting function ran.
    """

    def __init__(self, plot_fn: Callable[..., Any], controls: dict[str, Slider | Choice], values: dict[str, Any],
                 *, mode: str, figsize: tuple[float, float], nrows: int, ncols: int, continuous_update: bool) -> None:
        self.mode = mode
        self.values = dict(values)
        self.figure: Any = None
        self.controls: dict[str, Any] = {}
        self.widget: Any = None
        self.draws = 0
        self._plot_fn, self._specs = plot_fn, controls
        self._figsize, self._grid = figsize, (nrows, ncols)
        self._shown = False
        if mode == "live":
            self._build_widgets(continuous_update)

    def _draw(self) -> Any:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(*self._grid, figsize=self._figsize, squeeze=True)
        try:
            self._plot_fn(axes, **self.values)
        except BaseException:
            plt.close(fig)
            raise
        self.draws += 1
        self.figure = fig
        return fig

    def _build_widgets(self, continuous_update: bool) -> None:
        try:
            import ipywidgets as w
        except ImportError as exc:  # pragma: no cover - ipywidgets is in the [course] extra
            raise ImportError("mode='live' needs ipywidgets: pip install 'fedlora-lite[course]'") from exc
        style = {"description_width": "initial"}
        layout = w.Layout(width="22rem")
        for name, spec in self._specs.items():
            desc, value = spec.label or name, self.values[name]
            if isinstance(spec, Choice):
                ctrl = w.Dropdown(options=list(spec.options), value=value, description=desc, style=style)
            elif spec.log:
                lo, hi = math.log10(spec.low), math.log10(spec.high)
                ctrl = w.FloatLogSlider(value=value, base=10, min=lo, max=hi, step=spec.step or (hi - lo) / 50,
                                        description=desc, readout_format=".3",  # d3: 3 digits, no trailing 0s
                                        continuous_update=continuous_update, style=style, layout=layout)
            elif spec.integer:
                ctrl = w.IntSlider(value=value, min=spec.low, max=spec.high, step=spec.step or 1, description=desc,
                                   continuous_update=continuous_update, style=style, layout=layout)
            else:
                ctrl = w.FloatSlider(value=value, min=spec.low, max=spec.high,
                                     step=spec.step or (spec.high - spec.low) / 100, description=desc,
                                     readout_format=".3", continuous_update=continuous_update,
                                     style=style, layout=layout)
            ctrl.observe(self._on_change, names="value")
            self.controls[name] = ctrl
        self._output = w.Output()
        self.widget = w.VBox([w.HBox(list(self.controls.values()), layout=w.Layout(flex_flow="row wrap")),
                              self._output])

    def _on_change(self, change: Mapping[str, Any]) -> None:
        name = next(n for n, c in self.controls.items() if c is change["owner"])
        self.values[name] = change["new"]
        self._redraw()

    def _redraw(self) -> None:
        if self.mode == "live":
            with self._output:  # an exception in plot_fn is shown inside the output area
                self._output.clear_output(wait=True)  # wait: no flicker between old and new figure
                _show(self._draw())
        else:
            _show(self._draw())

    def update(self, **values: Any) -> None:
        """Set some parameters and redraw (live: moves the sliders, which redraws once per change).

        Raises:
            ValueError/TypeError: an unknown name, or a value outside its control's range.
        """
        checked = _check_values(self._specs, {**self.values, **values}, partial_keys=values)
        if self.mode == "live":
            for name in values:
                self.controls[name].value = checked[name]
        else:
            self.values = checked
            self._redraw()

    def show(self) -> None:
        """Display the cell's content: the controls and figure (live) or the figure (static)."""
        self._shown = True
        if self.mode == "live":
            from IPython.display import display

            display(self.widget)
            if self.figure is None:
                self._redraw()
        else:
            _show(self._draw())

    def _ipython_display_(self) -> None:
        # interactive_figure shows itself; ending a cell with the call must not show it twice
        if not self._shown:
            self.show()

    def __repr__(self) -> str:
        return f"InteractiveFigure(mode={self.mode!r}, values={self.values!r}, draws={self.draws})"


def _check_values(controls: Mapping[str, Slider | Choice], values: Mapping[str, Any],
                  partial_keys: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise TypeError(f"values must be a mapping of parameter name to value, got {type(values).__name__}")
    unknown = sorted(set(partial_keys if partial_keys is not None else values) - set(controls))
    if unknown:
        raise ValueError(f"values {unknown} have no slider; sliders: {list(controls)}")
    missing = [n for n in controls if n not in values]
    if missing:
        raise ValueError(f"values must give a starting value for every slider; missing {missing}")
    return {n: spec.check(values[n], n) for n, spec in controls.items()}


def interactive_figure(
    plot_fn: Callable[..., Any],
    sliders: Mapping[str, Any],
    values: Mapping[str, Any],
    *,
    mode: str = "auto",
    figsize: tuple[float, float] = (7.0, 3.6),
    nrows: int = 1,
    ncols: int = 1,
    continuous_update: bool = False,
    show: bool = True,
) -> InteractiveFigure:
    """A figure with sliders in a live notebook, one static figure in batch runs.

    Args:
        plot_fn: ``plot_fn(ax, **params)`` draws on ``ax`` (one matplotlib Axes, or an
            array of Axes when ``nrows * ncols > 1``); it must not call ``plt.show()``.
            It runs once per slider change, so keep it under a second or so.
        sliders: ``{param: spec}``; a spec is a :class:`Slider`, a tuple
            ``(low, high[, step])``, a :class:`Choice` or a list of options.
        values: the starting value of every slider, which is also what the static
            figure shows.
        mode: ``"auto"`` (see :func:`widget_mode`), ``"live"`` or ``"static"``.
        figsize: figure size in inches.
        nrows, ncols: subplot grid passed to ``plt.subplots``.
        continuous_update: live only; redraw while a slider is dragged (default: on
            release, which suits plotting functions that fit a model).
        show: display now (default). With False, display the returned object later.

    Returns:
        An :class:`InteractiveFigure` (its ``values``, ``figure``, ``controls``).

    Raises:
        TypeError: ``plot_fn`` is not callable, a bad slider spec or value type.
        ValueError: a missing or unknown value, a value outside its slider's range, bad
            ``mode``, ``figsize``, ``nrows`` or ``ncols``.
    """
    if not callable(plot_fn):
        raise TypeError(f"plot_fn must be callable as plot_fn(ax, **params), got {type(plot_fn).__name__}")
    if not isinstance(sliders, Mapping) or not sliders:
        raise TypeError("sliders must be a non-empty mapping {parameter name: slider spec}")
    bad = [n for n in sliders if not (isinstance(n, str) and n.isidentifier())]
    if bad:
        raise ValueError(f"slider names must be Python identifiers (plot_fn keyword arguments), got {bad}")
    controls = {name: _as_control(spec, name) for name, spec in sliders.items()}
    checked = _check_values(controls, values)
    if (not isinstance(figsize, (tuple, list)) or len(figsize) != 2
            or not all(isinstance(v, (int, float)) and v > 0 for v in figsize)):
        raise ValueError(f"figsize must be (width, height) in inches, got {figsize!r}")
    for name, n in (("nrows", nrows), ("ncols", ncols)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    handle = InteractiveFigure(plot_fn, controls, checked, mode=widget_mode(mode), figsize=tuple(figsize),
                               nrows=nrows, ncols=ncols, continuous_update=bool(continuous_update))
    if show:
        handle.show()
    return handle
