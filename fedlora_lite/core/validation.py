"""Input validation shared by every public entry point.

All checks raise ``TypeError``/``ValueError`` naming the offending argument, so that bad
client updates (wrong shapes, NaN/Inf, too few clients) fail loudly at the boundary
instead of deep inside a linear-algebra kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["as_matrix", "as_update_stack", "as_block_list", "check_positive", "check_fraction", "check_choice"]

_FLOAT_DTYPES = (torch.float32, torch.float64)


def as_matrix(x: Any, name: str, *, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Convert a 2-D tensor/array to a finite floating torch tensor.

    Integer inputs are promoted to float64; float16/bfloat16 to float32 (the solver needs
    at least single precision). Device is preserved unless ``device`` is given.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":  # object, string, datetime, complex ...: torch's error would not name x
            raise TypeError(f"{name} must be a real numeric array, got numpy dtype {x.dtype}")
        if not x.dtype.isnative:  # e.g. big-endian data read from a file: same values, native byte order
            x = x.astype(x.dtype.newbyteorder("="))
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    elif t.dtype not in _FLOAT_DTYPES:
        t = t.to(torch.float32)
    if dtype is not None:
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return t


def as_block_list(
    blocks: Any,
    name: str = "updates",
    *,
    min_clients: int = 3,
    same_width: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> list[torch.Tensor]:
    """Validate K client matrices and return them as a list of tensors on one device/dtype.

    Args:
        blocks: a sequence of K matrices (d x p_k) or a 3-D tensor/array of shape (K, d, p).
        name: argument name used in error messages.
        min_clients: minimum K.
        same_width: require every p_k equal (dense updates); False allows ragged widths
            (LoRA-factored blocks of different ranks).
        dtype: target dtype; default is the widest dtype among the inputs.
        device: target device; default is the device of the first block.

    Returns:
        List of K tensors of shape (d, p_k).
    """
    if isinstance(blocks, (torch.Tensor, np.ndarray)):
        if blocks.ndim != 3:
            raise ValueError(f"{name} as an array must have shape (K, d, p), got {tuple(blocks.shape)}")
        seq = [blocks[k] for k in range(blocks.shape[0])]
    elif isinstance(blocks, Sequence) and not isinstance(blocks, (str, bytes)):
        seq = list(blocks)
    else:
        raise TypeError(f"{name} must be a sequence of matrices or a (K, d, p) tensor, got {type(blocks).__name__}")
    if len(seq) < min_clients:
        raise ValueError(f"{name} needs at least {min_clients} clients, got {len(seq)}")
    mats = [as_matrix(b, f"{name}[{k}]") for k, b in enumerate(seq)]
    d = mats[0].shape[0]
    for k, m in enumerate(mats):
        if m.shape[0] != d:
            raise ValueError(f"{name}[{k}] has {m.shape[0]} rows but {name}[0] has {d}; all clients must share d")
        if same_width and m.shape[1] != mats[0].shape[1]:
            raise ValueError(
                f"{name}[{k}] has shape {tuple(m.shape)} but {name}[0] has {tuple(mats[0].shape)}; all clients must share (d, p)"
            )
        if m.shape[1] == 0 or d == 0:
            raise ValueError(f"{name}[{k}] is empty (shape {tuple(m.shape)})")
    if dtype is None:
        dtype = torch.float64 if any(m.dtype == torch.float64 for m in mats) else torch.float32
    if device is None:
        device = mats[0].device
    return [m.to(device=device, dtype=dtype) for m in mats]


def as_update_stack(updates: Any, name: str = "updates", *, min_clients: int = 3, **kw: Any) -> torch.Tensor:
    """Validate K equal-shape client matrices and stack them into a (K, d, p) tensor."""
    return torch.stack(as_block_list(updates, name, min_clients=min_clients, same_width=True, **kw))


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float after checking it is finite and > 0 (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def check_fraction(value: Any, name: str, *, low: float = 0.0, high: float = 1.0, inclusive_high: bool = False) -> float:
    """Return ``value`` as a float in [low, high) (or [low, high])."""
    v = check_positive(value, name, allow_zero=True)
    ok = low <= v <= high if inclusive_high else low <= v < high
    if not ok:
        rb = "]" if inclusive_high else ")"
        raise ValueError(f"{name} must lie in [{low}, {high}{rb}, got {value!r}")
    return v


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``; else raise naming the valid options."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value
