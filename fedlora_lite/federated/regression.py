"""Federated multi-output linear regression under CLAIR's model: data, local estimators, noise levels.

:func:`make_regression_federation` adds per-client regression data ``Y_k = X_k Theta_k +
sigma E_k`` to an :func:`~fedlora_lite.federated.synthetic.make_update_federation` draw;
:func:`fit_local` gives each client's preliminary estimator (OLS or ridge), whose error
sets how much CLAIR's refinement can gain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.runtime import make_generator, resolve_device
from ..core.validation import as_matrix, check_positive
from .synthetic import (
    UpdateFederation,
    _check_int,
    _per_client,
    _resolve_generator,
    make_update_federation,
)

__all__ = ["RegressionFederation", "make_regression_federation", "least_squares", "fit_local", "expected_ols_error",
           "ols_noise_level"]


@dataclass
class RegressionFederation(UpdateFederation):
    """A federation of multi-output linear regressions ``Y_k = X_k Theta_k + noise_k E_k``.

    Attributes (in addition to :class:`UpdateFederation`'s):
        X: per-client designs, K tensors of shape (n_k, d), rows ~ N(0, I_d).
        Y: per-client responses, K tensors of shape (n_k, p).
        samples: n_k per client.
        noise: response-noise standard deviation per client.
    """

    X: list[torch.Tensor]
    Y: list[torch.Tensor]
    samples: tuple[int, ...]
    noise: tuple[float, ...]



def make_regression_federation(
    num_clients: int = 20,
    dim: int = 30,
    outputs: int = 8,
    rank: int = 3,
    contamination: float = 0.3,
    kind: str = "random",
    *,
    samples: int | Sequence[int] = 200,
    noise: float | Sequence[float] = 0.0,
    heterogeneity: float = 0.0,
    separation: float = 1.0,
    scale: float | None = None,
    similarity: float = 0.0,
    offset: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
) -> RegressionFederation:
    """A federation of linear regressions whose true parameters follow CLAIR's model.

    Client k observes ``Y_k = X_k Theta_k + noise_k * E_k`` with X_k (n_k x d) and E_k
    (n_k x p) standard Gaussian. With ``noise=0`` and ``n_k >= d`` the OLS estimate
    (:func:`fit_local`) equals Theta_k up to rounding. The truths are drawn exactly as by
    :func:`make_update_federation` with the same arguments and generator state.

    Args:
        samples: n_k, an int or one int per client (>= 1; OLS needs n_k >= d).
        noise: response-noise standard deviation, a float or one per client (>= 0).
        Others: as in :func:`make_update_federation`.

    Returns:
        A :class:`RegressionFederation`.
    """
    device = None if device is None else resolve_device(device)  # a clear error before any drawing
    K = _check_int(num_clients, "num_clients", 3)
    n = _per_client(samples, "samples", K, lambda v, nm: _check_int(v, nm, 1))
    sigma = _per_client(noise, "noise", K, lambda v, nm: check_positive(v, nm, allow_zero=True))
    gen = _resolve_generator(generator, seed)
    truth = make_update_federation(
        K, dim, outputs, rank, contamination, kind,
        heterogeneity=heterogeneity, separation=separation, scale=scale, similarity=similarity,
        offset=offset, generator=gen,
        dtype=torch.float64, device="cpu",
    )
    g_data = make_generator(int(torch.randint(0, 2**62, (1,), generator=gen)))
    X, Y = [], []
    for k in range(K):
        Xk = torch.randn(n[k], truth.dim, generator=g_data, dtype=torch.float64)
        Ek = torch.randn(n[k], truth.outputs, generator=g_data, dtype=torch.float64)
        X.append(Xk.to(dtype=dtype, device=device))
        Y.append((Xk @ truth.theta[k] + sigma[k] * Ek).to(dtype=dtype, device=device))
    to = {"dtype": dtype, "device": device}
    return RegressionFederation(
        theta=truth.theta.to(**to), U=truth.U.to(**to), V=truth.V.to(**to), H=truth.H.to(**to),
        benign=truth.benign.to(device=device), kind=truth.kind, contamination=truth.contamination,
        heterogeneity=truth.heterogeneity, separation=truth.separation, scale=truth.scale,
        similarity=truth.similarity, offset=truth.offset, X=X, Y=Y, samples=n, noise=sigma,
    )


def least_squares(X: Any, Y: Any, ridge: float = 0.0) -> torch.Tensor:
    """OLS / ridge estimate ``(X^T X + ridge I)^{-1} X^T Y`` for one client.

    Args:
        X: design, shape (n, d).
        Y: responses, shape (n, p).
        ridge: penalty on ``||Theta||_F^2`` in Gram-matrix units (not divided by n); 0 = OLS.

    Returns:
        Theta-hat, shape (d, p), on X's device and dtype.

    Raises:
        ValueError: ``ridge == 0`` with fewer samples than dimensions (OLS is not unique).
    """
    X = as_matrix(X, "X")
    Y = as_matrix(Y, "Y", dtype=X.dtype, device=X.device)
    ridge = check_positive(ridge, "ridge", allow_zero=True)
    n, d = X.shape
    if Y.shape[0] != n:
        raise ValueError(f"X has {n} rows but Y has {Y.shape[0]}; they must match")
    if ridge == 0.0:
        if n < d:
            raise ValueError(f"OLS needs at least dim={d} samples, got {n}; use ridge > 0")
        # QR-based least squares avoids squaring the condition number of X; an explicit QR and
        # a triangular solve, because LAPACK's gelsy (torch.linalg.lstsq on the CPU) is not
        # bitwise reproducible from one process to the next, and same seed must mean same bytes
        Q, R = torch.linalg.qr(X)
        return torch.linalg.solve_triangular(R, Q.mT @ Y, upper=True)
    gram = X.mT @ X + ridge * torch.eye(d, dtype=X.dtype, device=X.device)
    return torch.linalg.solve(gram, X.mT @ Y)


def fit_local(federation: RegressionFederation, ridge: float = 0.0) -> torch.Tensor:
    """Every client's preliminary estimator Theta-hat_k (OLS, or ridge if ``ridge > 0``).

    Args:
        federation: a :class:`RegressionFederation`.
        ridge: ridge penalty (Gram-matrix units), >= 0.

    Returns:
        Tensor of shape (K, d, p) on the federation's device and dtype.
    """
    if not isinstance(federation, RegressionFederation):
        raise TypeError(f"federation must be a RegressionFederation, got {type(federation).__name__}")
    ests = []
    for k, (Xk, Yk) in enumerate(zip(federation.X, federation.Y)):
        try:
            ests.append(least_squares(Xk, Yk, ridge))
        except ValueError as exc:
            raise ValueError(f"client {k}: {exc}") from exc
    return torch.stack(ests)


def expected_ols_error(dim: int, outputs: int, samples: int, noise: float) -> float:
    """Root-mean-square OLS error ``sqrt(E||Theta-hat - Theta||_F^2)`` for Gaussian designs.

    ``E||Theta-hat - Theta||_F^2 = noise^2 * p * E tr((X^T X)^{-1}) = noise^2 p d / (n - d - 1)``,
    i.e. roughly ``noise * sqrt(d p / n)`` once n >> d.

    Raises:
        ValueError: ``samples <= dim + 1`` (the expectation is infinite).
    """
    d = _check_int(dim, "dim", 1)
    p = _check_int(outputs, "outputs", 1)
    n = _check_int(samples, "samples", 1)
    sigma = check_positive(noise, "noise", allow_zero=True)
    if n <= d + 1:
        raise ValueError(f"samples must exceed dim + 1 = {d + 1} for a finite expected OLS error, got {n}")
    return sigma * math.sqrt(p * d / (n - d - 1))


def ols_noise_level(federation: RegressionFederation) -> torch.Tensor:
    """Estimated entrywise standard deviation of each client's OLS error Theta-hat_k - Theta_k.

    From the client's own data only: the residual variance
    ``sigma-hat_k^2 = ||Y_k - X_k Theta-hat_k||_F^2 / ((n_k - d) p)`` and
    ``Var[(Theta-hat_k)_ij] = sigma_k^2 [(X_k^T X_k)^{-1}]_ii``, averaged over i:
    ``tau_k = sigma-hat_k * sqrt(tr((X_k^T X_k)^{-1}) / d)``. The stacked d x Kp error
    matrix then has spectral norm about ``tau * (sqrt(d) + sqrt(K p))``, the scale for the
    noisy form's ``mu``.

    Args:
        federation: a :class:`RegressionFederation` with ``n_k > d`` for every client.

    Returns:
        Tensor of shape (K,) (float64, CPU).
    """
    if not isinstance(federation, RegressionFederation):
        raise TypeError(f"federation must be a RegressionFederation, got {type(federation).__name__}")
    d, p = federation.dim, federation.outputs
    taus = []
    for k, (Xk, Yk) in enumerate(zip(federation.X, federation.Y)):
        n = Xk.shape[0]
        if n <= d:
            raise ValueError(f"client {k}: the residual variance needs more than dim={d} samples, got {n}")
        Xk, Yk = Xk.double(), Yk.double()
        resid = Yk - Xk @ least_squares(Xk, Yk)
        sigma2 = float(resid.pow(2).sum()) / ((n - d) * p)
        trace = float(torch.linalg.inv(Xk.T @ Xk).diagonal().sum())
        taus.append(math.sqrt(sigma2 * trace / d))
    return torch.tensor(taus, dtype=torch.float64)
