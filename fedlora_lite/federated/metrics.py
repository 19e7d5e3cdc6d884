"""Metrics for CLAIR experiments: subspace recovery, detection quality and estimation error.

* :func:`sin_theta` / :func:`principal_angle_sines`: how far an estimated subspace is from
  the true one (largest principal-angle sine);
* :func:`detection_metrics`: precision, recall, F1 and false-positive rate of contamination
  flags against the true contaminated set, with every 0/0 case defined;
* :func:`relative_errors` and :func:`refinement_gain`: per-client relative estimation error
  and the gain of a method over local estimation on a set of clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.validation import as_matrix, as_update_stack

__all__ = [
    "DetectionMetrics",
    "RefinementGain",
    "detection_metrics",
    "principal_angle_sines",
    "refinement_gain",
    "relative_errors",
    "sin_theta",
]


def _orthonormal_basis(A: torch.Tensor, rtol: float | None) -> torch.Tensor:
    """Orthonormal basis (d, r') of span(A); directions below ``rtol * s_max`` are dropped."""
    if A.shape[1] == 0:
        return A
    Q, s, _ = torch.linalg.svd(A, full_matrices=False)
    if rtol is None:
        rtol = max(A.shape) * torch.finfo(A.dtype).eps
    if s.numel() == 0 or float(s[0]) == 0.0:
        return Q[:, :0]
    return Q[:, s > rtol * s[0]]


def _bases(U_hat: Any, U: Any, rtol: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    A = as_matrix(U_hat, "U_hat")
    B = as_matrix(U, "U", device=A.device)
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"U_hat has {A.shape[0]} rows but U has {B.shape[0]}; both must be (d, r) bases of R^d")
    dtype = torch.promote_types(A.dtype, B.dtype)
    return _orthonormal_basis(A.to(dtype), rtol), _orthonormal_basis(B.to(dtype), rtol)


def principal_angle_sines(U_hat: Any, U: Any, *, rtol: float | None = None) -> torch.Tensor:
    """Sines of the principal angles between span(U_hat) and span(U), descending.

    Args:
        U_hat: (d, r_hat) matrix whose columns span the estimate (need not be orthonormal).
        U: (d, r) matrix whose columns span the truth.
        rtol: columns' singular values below ``rtol * s_max`` are treated as zero
            (default ``max(d, r) * eps``), so a rank-deficient input spans fewer directions.

    Returns:
        Tensor of min(r_hat, r) sines in [0, 1], largest first.
    """
    A, B = _bases(U_hat, U, rtol)
    if A.shape[1] == 0 or B.shape[1] == 0:
        return torch.zeros(0, dtype=A.dtype, device=A.device)
    small, big = (A, B) if A.shape[1] <= B.shape[1] else (B, A)
    # The residual of the smaller basis after projecting on the bigger one has singular
    # values sin(theta_i); computing it directly keeps tiny angles accurate (no 1 - cos^2).
    resid = small - big @ (big.mT @ small)
    sines = torch.linalg.svdvals(resid).clamp(0.0, 1.0)
    return torch.sort(sines, descending=True).values


def sin_theta(U_hat: Any, U: Any, *, one_sided: bool = False, rtol: float | None = None) -> float:
    """Largest principal-angle sine between span(U_hat) and span(U) (0 = identical).

    With equal dimensions this is ``||(I - P_U) U_hat||_2 = ||P_{U_hat} - P_U||_2``. When the
    dimensions differ it is the projector distance ``||P_{U_hat} - P_U||_2``, which is 1.0:
    a lower-dimensional estimate misses a true direction and a higher-dimensional one
    contains a spurious one. ``one_sided=True`` instead measures only whether the truth is
    covered, ``||(I - P_{U_hat}) P_U||_2``: 0 when span(U_hat) contains span(U) (extra
    directions are free), 1.0 when U_hat has fewer dimensions than U.

    Args:
        U_hat: (d, r_hat) estimated basis (orthonormalised internally).
        U: (d, r) true basis.
        one_sided: measure coverage of span(U) only (see above).
        rtol: rank tolerance, see :func:`principal_angle_sines`.

    Returns:
        A float in [0, 1].
    """
    A, B = _bases(U_hat, U, rtol)
    ra, rb = A.shape[1], B.shape[1]
    if rb == 0:
        return 0.0 if (one_sided or ra == 0) else 1.0
    if ra < rb or (ra > rb and not one_sided):
        return 1.0
    resid = B - A @ (A.mT @ B)  # (d, r): the truth's part outside the estimate
    return float(torch.linalg.matrix_norm(resid, ord=2).clamp(0.0, 1.0))


@dataclass
class DetectionMetrics:
    """Quality of contamination flags against the true contaminated set.

    Conventions for empty denominators (so every field is always a number):

    * precision = TP / (TP + FP), and 1.0 when nothing is flagged (no false alarm raised);
    * recall = TP / (TP + FN), and 1.0 when nothing is contaminated (nothing to miss);
    * f1 = 2 P R / (P + R), and 0.0 when P + R = 0;
    * fpr = FP / (FP + TN), and 0.0 when every client is contaminated.

    So "nothing contaminated, nothing flagged" gives precision = recall = f1 = 1 and fpr = 0,
    while "something contaminated, nothing flagged" gives precision 1, recall 0, f1 0.

    Attributes:
        precision, recall, f1, fpr: as above, in [0, 1].
        tp, fp, fn, tn: confusion-matrix counts.
        exact: flagged set == contaminated set.
    """

    precision: float
    recall: float
    f1: float
    fpr: float
    tp: int
    fp: int
    fn: int
    tn: int
    exact: bool


def _as_mask(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, (list, tuple)):
        x = torch.tensor(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor, array or list, got {type(x).__name__}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per client), got shape {tuple(x.shape)}")
    if x.dtype != torch.bool:
        if x.is_floating_point() or x.is_complex() or not bool(((x == 0) | (x == 1)).all()):
            raise TypeError(f"{name} must be boolean (or 0/1 integers), got dtype {x.dtype}")
        x = x.bool()
    return x.detach().cpu()


def detection_metrics(flags: Any, contaminated: Any) -> DetectionMetrics:
    """Compare flags with the true contaminated set.

    Args:
        flags: (K,) bool, True = flagged as contaminated.
        contaminated: (K,) bool, True = truly contaminated (e.g. ``~federation.benign``).

    Returns:
        A :class:`DetectionMetrics`.
    """
    f = _as_mask(flags, "flags")
    c = _as_mask(contaminated, "contaminated")
    if f.shape != c.shape:
        raise ValueError(f"flags has {f.numel()} entries but contaminated has {c.numel()}; they must match")
    tp = int((f & c).sum())
    fp = int((f & ~c).sum())
    fn = int((~f & c).sum())
    tn = int((~f & ~c).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    return DetectionMetrics(precision, recall, f1, fpr, tp, fp, fn, tn, exact=fp == 0 and fn == 0)


def relative_errors(estimates: Any, truth: Any) -> torch.Tensor:
    """Per-client relative error ``||Theta-tilde_k - Theta_k||_F / ||Theta_k||_F``.

    Args:
        estimates: (K, d, p) estimates (or K matrices).
        truth: (K, d, p) true parameters; every ||Theta_k||_F must be > 0.

    Returns:
        Tensor of shape (K,), on the estimates' device, in the promoted dtype.
    """
    est = as_update_stack(estimates, "estimates", min_clients=1)
    tru = as_update_stack(truth, "truth", min_clients=1, device=est.device)
    if est.shape != tru.shape:
        raise ValueError(f"estimates has shape {tuple(est.shape)} but truth has {tuple(tru.shape)}; they must match")
    dtype = torch.promote_types(est.dtype, tru.dtype)
    est, tru = est.to(dtype), tru.to(dtype)
    norms = torch.linalg.matrix_norm(tru)
    if bool((norms == 0).any()):
        bad = torch.nonzero(norms == 0).flatten().tolist()
        raise ValueError(f"truth has zero-norm clients {bad}; relative error is undefined for them")
    return torch.linalg.matrix_norm(est - tru) / norms


@dataclass
class RefinementGain:
    """Mean error of a method versus local estimation on a set of clients.

    Attributes:
        local: mean local error over the selected clients.
        method: mean method error over the same clients.
        gain: ``local - method``; positive means the method is better than local.
        ratio: ``method / local``; below 1 means the method is better (inf if local is 0
            and method is not, 1.0 if both are 0).
        num_clients: number of clients averaged over.
    """

    local: float
    method: float
    gain: float
    ratio: float
    num_clients: int


def refinement_gain(local_err: Any, method_err: Any, mask: Any = None) -> RefinementGain:
    """Gain of a method over local estimation, averaged over ``mask`` (e.g. benign clients).

    Args:
        local_err: (K,) per-client errors of the local estimators (e.g. from
            :func:`relative_errors`).
        method_err: (K,) per-client errors of the method.
        mask: (K,) bool selecting the clients to average over; None = all clients.

    Returns:
        A :class:`RefinementGain` (positive ``gain`` / ``ratio < 1`` = the method helps).
    """
    a = torch.as_tensor(local_err).detach().double().cpu()
    b = torch.as_tensor(method_err).detach().double().cpu()
    if a.ndim != 1 or b.shape != a.shape:
        raise ValueError(f"local_err and method_err must be 1-D of equal length, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not bool(torch.isfinite(a).all() & torch.isfinite(b).all()):
        raise ValueError("local_err and method_err must be finite")
    sel = torch.ones_like(a, dtype=torch.bool) if mask is None else _as_mask(mask, "mask")
    if sel.shape != a.shape:
        raise ValueError(f"mask has {sel.numel()} entries but the errors have {a.numel()}")
    n = int(sel.sum())
    if n == 0:
        raise ValueError("mask selects no client")
    local, method = float(a[sel].mean()), float(b[sel].mean())
    if local > 0:
        ratio = method / local
    else:
        ratio = 1.0 if method == 0 else float("inf")
    return RefinementGain(local=local, method=method, gain=local - method, ratio=ratio, num_clients=n)
