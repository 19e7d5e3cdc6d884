"""Reproducibility and device helpers shared by the library and the notebooks.

One call to :func:`set_seed` seeds Python, NumPy and torch; :func:`resolve_device`
turns ``"auto"`` into CUDA when present and the CPU otherwise, so the same code
runs on a laptop and on a GPU node.
"""

from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch

__all__ = ["set_seed", "resolve_device", "environment_info", "make_generator"]


def set_seed(seed: int) -> torch.Generator:
    """Seed ``random``, NumPy and torch (all devices) and return a torch CPU generator.

    Args:
        seed: non-negative integer seed.

    Returns:
        A ``torch.Generator`` seeded with ``seed``, to pass explicitly to sampling code.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    return make_generator(seed)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh torch generator seeded with ``seed`` (on ``device``, checked by :func:`resolve_device`).

    Raises:
        ValueError: ``device`` is not a device or names an absent accelerator.
    """
    gen = torch.Generator(device=resolve_device(device))
    gen.manual_seed(int(seed))
    return gen


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Map ``"auto"``/``None`` to CUDA if available, else CPU; validate anything else.

    Args:
        device: ``"auto"``, ``None``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a
            ``torch.device``.

    Raises:
        ValueError: the string is not a device, or it names an accelerator that is absent.
    """
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda[:i]' or a torch.device, got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} requested but MPS is not available; use device='auto' or 'cpu'")
    return dev


def environment_info(device: torch.device | None = None) -> dict[str, str]:
    """Versions of the key packages and the device, for the setup cell of each notebook."""
    import importlib.metadata as md

    info = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("numpy", "transformers", "peft", "fedlora-lite"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    info["torch_threads"] = str(torch.get_num_threads())
    return info
