"""The result type every dense aggregator returns, and the small checks the rules share.

Kept apart from the registry (:mod:`fedlora_lite.federated.aggregators`) so that the rule
modules (:mod:`fedlora_lite.federated.robust`) and the registry can both import it
without an import cycle.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["AggregationResult", "accepted_options", "broadcast", "check_count", "check_f", "check_options", "default_f"]


@dataclass
class AggregationResult:
    """Output of :func:`~fedlora_lite.federated.aggregators.aggregate`.

    Attributes:
        method: registered name of the aggregator.
        estimates: (K, d, p) each client's estimate after aggregation.
        flags: (K,) bool, True = the method treated the client as contaminated; None for
            methods that make no such decision.
        info: method-specific diagnostics (e.g. Krum scores, Weiszfeld iterations, the
            :class:`~fedlora_lite.clair.ClairResult` under ``"result"``).
    """

    method: str
    estimates: torch.Tensor
    flags: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def broadcast(center: torch.Tensor, K: int) -> torch.Tensor:
    """(K, *center.shape) copies of one global estimate."""
    return center.unsqueeze(0).expand(K, *center.shape).clone()


def default_f(K: int) -> int:
    """floor((K - 3) / 2): the largest number of Byzantine clients with K > 2f + 2 (Krum's bound)."""
    return max((K - 3) // 2, 0)


def check_count(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high], else a ValueError naming the range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= int(value) <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return int(value)


def check_f(f: int | None, K: int, *, bound: str = "krum") -> int:
    """Validate the assumed number of Byzantine clients f for a rule with the given bound.

    Bounds: ``"krum"`` K > 2f + 2 (default f = floor((K - 3) / 2)); ``"bulyan"`` K >= 4f + 3
    (default floor((K - 3) / 4)); ``"majority"`` K > 2f (default floor((K - 1) / 2)).
    """
    limits = {"krum": ((K - 3) // 2, "K > 2f + 2"), "bulyan": ((K - 3) // 4, "K >= 4f + 3"),
              "majority": ((K - 1) // 2, "K > 2f")}
    if bound not in limits:
        raise ValueError(f"bound must be one of {sorted(limits)}, got {bound!r}")
    largest, rule = limits[bound]
    if f is None:
        return max(largest, 0)
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 0:
        raise ValueError(f"f must be a non-negative int, got {f!r}")
    if f > largest:
        raise ValueError(f"this rule needs {rule}; with K={K} clients f must be <= {max(largest, -1)}, got f={f}")
    return int(f)


def accepted_options(fn: Callable[..., Any]) -> list[str] | None:
    """Keyword-only option names of a rule or attack; None when it takes ``**options`` (anything goes)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def check_options(name: str, fn: Callable[..., Any], options: dict[str, Any], extra: tuple[str, ...] = (),
                  what: str = "method") -> None:
    """TypeError naming the options ``fn`` does not accept (``extra`` are accepted too)."""
    allowed = accepted_options(fn)
    if allowed is None:
        return
    allowed = list(dict.fromkeys([*extra, *allowed]))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{what} {name!r} got unknown options {unknown}; it accepts {allowed or 'no options'}")
