"""Synthetic federations with a shared low-rank subspace and contaminated clients.

The generative model (CLAIR's, see ``docs/CLAIR.md``): K clients, each owning a true
matrix-valued parameter Theta_k (d x p).

* benign (collaborative) clients: ``Theta_k = U V_k^T + H_0 + H_k`` with one shared
  orthonormal U (d x r), client-specific coefficients V_k (p x r, N(0, 1) entries with
  correlation ``similarity`` between clients: ``V_k = sqrt(rho) V_0 + sqrt(1 - rho) Z_k``),
  a heterogeneity term H_k (a Gaussian direction with ``||H_k||_F = heterogeneity *
  ||U V_k^T||_F``) and an optional common off-subspace term H_0 (``offset``; zero by
  default) that every benign client shares;
* contaminated clients: an update of one of the kinds below, Frobenius-norm matched to a
  benign draw so that norm-based defences cannot simply filter it out.

Contamination kinds (``kind=``):

* ``"random"``: a full-rank Gaussian d x p matrix;
* ``"subspace"``: ``U'_k W_k^T`` in the client's own random r-dimensional subspace U'_k
  (a client trained on a different task);
* ``"sign_flip"``: a benign-looking ``U V_k^T`` with the sign of a random half of its d
  rows flipped, ``D_k U V_k^T``: same singular values and norm as a benign update, but
  its column space ``D_k span(U)`` leaves span(U);
* ``"scaled"``: ``scale * U V_k^T``. It stays *inside* span(U), so it is **undetectable by
  design** for any subspace method (the client-specific V_k absorbs the factor); it is
  here to show what norm-based defences catch and subspace methods cannot, and must be
  kept out of exact-recovery checks.

``separation`` in [0, 1] interpolates each contaminated truth between a benign-looking
in-subspace update ``U V_k^T`` (0: indistinguishable) and the kind's update (1), then
renormalises, which draws collaborative-set recovery against separation.
:meth:`UpdateFederation.off_subspace_fraction` measures the separation that results.

:func:`~fedlora_lite.federated.regression.make_regression_federation` adds per-client regression data ``Y_k = X_k Theta_k +
noise * E_k`` (X_k rows ~ N(0, I_d)); :func:`fit_local` returns the OLS / ridge
preliminary estimators that CLAIR consumes. All randomness comes from one explicit
``torch.Generator``, split into independent streams for structure, attacks and data, so
a sweep over ``noise``, ``heterogeneity``, ``separation`` or ``contamination`` with a fixed
seed changes only the swept quantity (contaminated sets are nested as the fraction grows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.runtime import make_generator, resolve_device
from ..core.validation import check_choice, check_fraction, check_positive

__all__ = ["CONTAMINATION_KINDS", "UpdateFederation", "make_update_federation"]

CONTAMINATION_KINDS: tuple[str, ...] = ("random", "subspace", "sign_flip", "scaled")
"""Kinds accepted by the generators; ``"scaled"`` is undetectable by subspace methods."""

_DEFAULT_SCALED_FACTOR = 5.0


@dataclass
class UpdateFederation:
    """True client parameters of a synthetic federation.

    Attributes:
        theta: true parameters, shape (K, d, p).
        U: shared orthonormal basis, shape (d, r).
        V: client coefficients, shape (K, p, r). For contaminated clients this is the
            benign-looking draw that the contaminated truth was interpolated from.
        H: deviation of each benign truth from the model, ``H_0 + H_k``, shape (K, d, p);
            zero for contaminated clients.
        benign: True for collaborative clients, shape (K,), dtype bool.
        kind: contamination kind (one of :data:`CONTAMINATION_KINDS`).
        contamination: requested contaminated fraction.
        heterogeneity: ``||H_k||_F / ||U V_k^T||_F`` for benign clients.
        separation: interpolation weight of the contaminated truths (see module doc).
        scale: contaminated norm relative to a benign draw (for ``"scaled"``: the factor).
        similarity: correlation rho of the coefficients V_k across clients.
        offset: ``||H_0||_F`` relative to the mean ``||U V_k^T||_F``.
    """

    theta: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    H: torch.Tensor
    benign: torch.Tensor
    kind: str
    contamination: float
    heterogeneity: float
    separation: float
    scale: float
    similarity: float
    offset: float

    @property
    def num_clients(self) -> int:
        """K."""
        return int(self.theta.shape[0])

    @property
    def dim(self) -> int:
        """d, rows of each client's matrix."""
        return int(self.theta.shape[1])

    @property
    def outputs(self) -> int:
        """p, columns of each client's matrix."""
        return int(self.theta.shape[2])

    @property
    def rank(self) -> int:
        """r, dimension of the shared subspace."""
        return int(self.U.shape[1])

    @property
    def contaminated(self) -> torch.Tensor:
        """True for contaminated clients, shape (K,)."""
        return ~self.benign

    @property
    def num_contaminated(self) -> int:
        """Number of contaminated clients."""
        return int(self.contaminated.sum())

    def off_subspace_fraction(self) -> torch.Tensor:
        """``||(I - U U^T) Theta_k||_F / ||Theta_k||_F`` per client, shape (K,).

        0 for noiseless benign clients, close to 1 for well-separated contaminated ones.
        """
        resid = self.theta - self.U @ (self.U.mT @ self.theta)
        return torch.linalg.matrix_norm(resid) / torch.linalg.matrix_norm(self.theta)


def _resolve_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (data are drawn on the CPU, then moved)")
        return generator
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return make_generator(seed)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _per_client(value: Any, name: str, num_clients: int, check) -> tuple:
    """Broadcast a scalar to K clients or validate a length-K sequence."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != num_clients:
            raise ValueError(f"{name} must be a scalar or have one entry per client ({num_clients}), got {len(value)}")
        return tuple(check(v, f"{name}[{k}]") for k, v in enumerate(value))
    return (check(value, name),) * num_clients


def _num_contaminated(contamination: float, num_clients: int) -> int:
    # Round half up (Python's round() rounds half to even); the epsilon absorbs 0.3*20 = 6.000...1.
    return math.floor(contamination * num_clients + 0.5 + 1e-9)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.matrix_norm(x)


def make_update_federation(
    num_clients: int = 20,
    dim: int = 30,
    outputs: int = 8,
    rank: int = 3,
    contamination: float = 0.3,
    kind: str = "random",
    *,
    heterogeneity: float = 0.0,
    separation: float = 1.0,
    scale: float | None = None,
    similarity: float = 0.0,
    offset: float = 0.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
) -> UpdateFederation:
    """Draw the true client parameters Theta_k (no data): see the module docstring.

    Args:
        num_clients: K >= 3.
        dim: d (rows), must exceed ``rank``.
        outputs: p (columns), >= ``rank``.
        rank: r >= 1, dimension of the shared subspace.
        contamination: fraction of contaminated clients in [0, 1); the count is
            ``round_half_up(contamination * K)`` at positions drawn from the generator.
        kind: one of :data:`CONTAMINATION_KINDS`.
        heterogeneity: ``||H_k||_F / ||U V_k^T||_F`` for benign clients (>= 0).
        similarity: correlation rho in [0, 1] of the coefficients V_k across clients; 0 =
            fully client-specific (only personalised methods can do well), near 1 = nearly
            identical clients (global averaging becomes competitive).
        offset: ``||H_0||_F`` relative to the mean ``||U V_k^T||_F`` (>= 0): a component
            outside span(U) shared by every benign client. With offset > 0 the benign
            truths are no longer exactly rank r; CLAIR's averaged refinement keeps H_0,
            the projected one drops it.
        separation: in [0, 1]; 0 makes contaminated truths benign-looking, 1 is the pure kind.
        scale: Frobenius norm of each contaminated truth relative to its matched benign
            draw ``||U V_k^T + H_k||_F`` (default 1, i.e. norm-matched). For
            ``kind="scaled"`` it is the multiplying factor (default 5; may be negative).
        generator: CPU ``torch.Generator``; or give ``seed`` (default seed 0).
        seed: seed for a fresh generator (mutually exclusive with ``generator``).
        dtype: output dtype (the draw itself is float64, so results agree across dtypes).
        device: output device (the draw happens on the CPU, so results agree across devices).

    Returns:
        An :class:`UpdateFederation`.
    """
    device = None if device is None else resolve_device(device)  # a clear error before any drawing
    K = _check_int(num_clients, "num_clients", 3)
    d = _check_int(dim, "dim", 2)
    p = _check_int(outputs, "outputs", 1)
    r = _check_int(rank, "rank", 1)
    if r >= d:
        raise ValueError(f"rank must be smaller than dim, got rank={r}, dim={d}")
    if r > p:
        raise ValueError(f"rank must be <= outputs, got rank={r}, outputs={p}")
    contamination = check_fraction(contamination, "contamination")
    check_choice(kind, "kind", CONTAMINATION_KINDS)
    heterogeneity = check_positive(heterogeneity, "heterogeneity", allow_zero=True)
    separation = check_fraction(separation, "separation", inclusive_high=True)
    similarity = check_fraction(similarity, "similarity", inclusive_high=True)
    offset = check_positive(offset, "offset", allow_zero=True)
    if scale is None:
        scale = _DEFAULT_SCALED_FACTOR if kind == "scaled" else 1.0
    if kind == "scaled":
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
            raise ValueError(f"scale must be a finite non-zero number for kind='scaled', got {scale!r}")
        scale = float(scale)
    else:
        scale = check_positive(scale, "scale")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    m = _num_contaminated(contamination, K)
    if m >= K:
        raise ValueError(f"contamination={contamination} leaves no benign client among {K}")

    gen = _resolve_generator(generator, seed)
    # Independent streams: changing the kind or the separation never changes U, V_k or the data.
    seeds = torch.randint(0, 2**62, (3,), generator=gen).tolist()
    g_struct, g_attack = make_generator(seeds[0]), make_generator(seeds[1])
    f64 = torch.float64

    U, _ = torch.linalg.qr(torch.randn(d, r, generator=g_struct, dtype=f64))
    Z = torch.randn(K, p, r, generator=g_struct, dtype=f64)
    G = torch.randn(K, d, p, generator=g_struct, dtype=f64)
    order = torch.randperm(K, generator=g_struct)
    V0 = torch.randn(p, r, generator=g_struct, dtype=f64)
    G0 = torch.randn(d, p, generator=g_struct, dtype=f64)
    benign = torch.ones(K, dtype=torch.bool)
    benign[order[:m]] = False

    V = math.sqrt(similarity) * V0 + math.sqrt(1.0 - similarity) * Z
    base = U @ V.mT  # (K, d, p) benign-looking in-subspace parts
    base_norm = torch.linalg.matrix_norm(base)
    H = heterogeneity * base_norm[:, None, None] * G / torch.linalg.matrix_norm(G)[:, None, None]
    if offset > 0:
        G0 = G0 - U @ (U.T @ G0)
        H = H + offset * float(base_norm.mean()) * _unit(G0)
    reference_norm = torch.linalg.matrix_norm(base + H)

    # Attack pieces are drawn for every client in a fixed order, so the stream is aligned
    # across contamination fractions; only the contaminated clients' pieces are used.
    if kind == "random":
        attack = torch.randn(K, d, p, generator=g_attack, dtype=f64)
    elif kind == "subspace":
        other, _ = torch.linalg.qr(torch.randn(K, d, r, generator=g_attack, dtype=f64))
        attack = other @ torch.randn(K, p, r, generator=g_attack, dtype=f64).mT
    elif kind == "sign_flip":
        signs = torch.ones(K, d, 1, dtype=f64)
        for k in range(K):
            signs[k, torch.randperm(d, generator=g_attack)[: d // 2]] = -1.0
        attack = signs * base
    else:  # scaled: stays in span(U) whatever the separation
        attack = base

    theta = base + H
    for k in torch.nonzero(~benign).flatten().tolist():
        mixed = (1.0 - separation) * _unit(base[k]) + separation * _unit(attack[k])
        theta[k] = scale * reference_norm[k] * _unit(mixed)
    H[~benign] = 0.0

    to = {"dtype": dtype, "device": device}
    return UpdateFederation(
        theta=theta.to(**to),
        U=U.to(**to),
        V=V.to(**to),
        H=H.to(**to),
        benign=benign.to(device=device),
        kind=kind,
        contamination=contamination,
        heterogeneity=heterogeneity,
        separation=separation,
        scale=scale,
        similarity=similarity,
        offset=offset,
    )
