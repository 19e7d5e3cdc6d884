"""LoRA-native (factored) CLAIR: the exact small problem behind low-rank client updates.

When client k sends LoRA factors, its update is M_k = B_k A_k (B_k: d x r_k, A_k: r_k x p,
ranks may differ). The dense programs of :mod:`fedlora_lite.decomposition` on the
d x Kp stack have an exact small equivalent (``design/CLAIR.md``, "LoRA-native form"):

* one thin QR of the stacked B's, ``[B_1 ... B_K] = Q R_B`` (Q: d x q orthonormal,
  q = min(d, sum r_k)), so ``Q^T B_k`` is a column block of R_B at no extra cost;
* K thin QRs ``A_k^T = P_k R_k`` (P_k: p x t_k orthonormal, t_k = min(r_k, p));
* ``M_k = Q Mt_k P_k^T`` with the small block ``Mt_k = (Q^T B_k) R_k^T`` (q x t_k).

Why it is exact: X -> [Q X_1 P_1^T, ..., Q X_K P_K^T] is an isometry that preserves
the nuclear norm of the stack, its Frobenius norm and every block's Frobenius norm
(orthonormal factors on both sides). Projecting any dense pair (L, S) onto these
subspaces keeps L + S = M (M is already there) and cannot increase a nuclear or
Frobenius norm, so both programs (exact and noisy form) on ``Mt = [Mt_1 ... Mt_K]``
(q x sum t_k) have the same optimal value as on M, and a solution maps back by
``L_k = Q Lt_k P_k^T``, ``S_k = Q St_k P_k^T``. The solver's iterates (singular value
thresholding, block shrinkage) never leave these subspaces either, and
:func:`~fedlora_lite.decomposition.default_lambda` uses numerical ranks, so the two
paths run the same iterations and pick the same lam. Cost: the thin QR (which reads
every input: the floor), then work that depends on K and the r_k but not on d * p.

Refined factors (never densified unless asked): with U = Q Ut the shared subspace and
C-hat the collaborative set, the dense refinement of a benign client is

    U U^T B_k A_k + (I - U U^T) (1/|C|) sum_{j in C} B_j A_j
      = [U U^T B_k, B_off] @ [A_k; A_off],
    B_off = (I - U U^T) [B_j]_{j in C} / |C|   (d x m_C),   A_off = [A_j]_{j in C} (m_C x p),

so client k's refined factors have rank r_k + min(m_C, d, p) with m_C = sum_{j in C} r_j
(refine="average"), or exactly r_k (refine="project": ``(U U^T B_k, A_k)``, the input's
own shapes). The shared pair (B_off, A_off) is stored once (:class:`RefinedFactors`
builds each client's pair on access); :func:`truncate_factors` re-truncates any pair to a
target rank by QRs and a small SVD, without forming B A.

LoRA scaling: the update is ``(alpha / r) B A``; pass B already multiplied by the scaling,
or give ``scaling=`` (per client), or pass objects with ``.B``, ``.A`` and ``.scaling``
attributes (:class:`fedlora_lite.lora.LoraFactors`), whose scaling is applied (times
``scaling=`` if both are given). Such objects give ``B A`` in peft's (out, in)
orientation, so side="column" shares output directions whatever the base layer type.

Singular value thresholding on the reduced problem: when it is at least
:data:`AUTO_RANK_HINT_MIN` on its smaller side, ``svd_rank_hint`` defaults to max r_k,
i.e. a randomized truncated SVD (subspace iteration warm-started across solver
iterations) with a full-SVD fallback whenever the hint is too small; pass
``svd_rank_hint=None`` for full SVDs. Accuracy check (``tests/test_factored.py``): on a
320 x 320 reduced problem with heterogeneous clients it reproduces the full-SVD
objective to 1e-10 relative, the same flags and the same subspace. Everything runs on
the factors' device (CPU or CUDA) in their dtype (float32 default, float64 for exactness).

The whole-model API (:func:`clair_factored_modules`) streams module by module: a first
pass fits each module and keeps only small state (subspace, energies, solver summary),
the contamination decision is taken jointly, and a second pass re-reads the factors and
refines them (:meth:`FactoredModulesResult.iter_refined`), so memory stays bounded by one
module's factors plus the small state.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .clair import _check_threshold, _flags, _svd_of_L, choose_rank
from .decomposition import Decomposition, decompose
from .validation import as_matrix, check_choice, check_fraction, check_positive

__all__ = [
    "FactoredReduction",
    "reduce_factors",
    "RefinedFactors",
    "FactoredClairResult",
    "clair_factored",
    "FactoredModuleSummary",
    "FactoredModulesResult",
    "clair_factored_modules",
    "truncate_factors",
    "SyntheticLora",
    "random_lora_factors",
]

Pair = tuple[torch.Tensor, torch.Tensor]
_SIDES = ("column", "row")
AUTO_RANK_HINT_MIN = 256
"""Reduced problems at least this large on their smaller side use the randomized SVT by default."""
_REFINE = ("average", "project")


# --------------------------------------------------------------------------- input
def _as_factor_pairs(factors: Any, name: str, scaling: Any = None, min_clients: int = 3) -> list[Pair]:
    """Validate K LoRA pairs (B_k: d x r_k, A_k: r_k x p) -> list of tensors on one device/dtype."""
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"{name} must be a sequence of (B_k, A_k) pairs, got {type(factors).__name__}")
    items = list(factors)
    if len(items) < min_clients:
        raise ValueError(f"{name} needs at least {min_clients} clients, got {len(items)}")
    if scaling is None:
        scales = [None] * len(items)
    elif isinstance(scaling, Sequence) and not isinstance(scaling, (str, bytes)):
        if len(scaling) != len(items):
            raise ValueError(f"scaling has {len(scaling)} entries but {name} has {len(items)} clients")
        scales = [check_positive(s, f"scaling[{k}]") for k, s in enumerate(scaling)]
    else:
        scales = [check_positive(scaling, "scaling")] * len(items)
    pairs: list[Pair] = []
    for k, item in enumerate(items):
        own_scale = None
        if hasattr(item, "A") and hasattr(item, "B"):  # e.g. fedlora_lite.lora.LoraFactors
            own_scale = getattr(item, "scaling", None)
            item = (item.B, item.A)
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise TypeError(f"{name}[{k}] must be a pair (B, A) of matrices, got {type(item).__name__}")
        B = as_matrix(item[0], f"{name}[{k}][0] (B)")
        A = as_matrix(item[1], f"{name}[{k}][1] (A)")
        if B.shape[1] != A.shape[0] or B.shape[1] == 0:
            raise ValueError(f"{name}[{k}]: B is {tuple(B.shape)} and A is {tuple(A.shape)}; expected B (d x r_k), "
                             "A (r_k x p) with r_k >= 1")
        for s in (own_scale, scales[k]):
            if s is not None:
                B = B * float(s)
        pairs.append((B, A))
    d, p = pairs[0][0].shape[0], pairs[0][1].shape[1]
    for k, (B, A) in enumerate(pairs):
        if B.shape[0] != d or A.shape[1] != p:
            raise ValueError(f"{name}[{k}] gives a {B.shape[0]} x {A.shape[1]} update but {name}[0] gives {d} x {p}; "
                             "all clients must share (d, p)")
        if d == 0 or p == 0:
            raise ValueError(f"{name}[{k}] is empty")
    dtype = torch.float64 if any(t.dtype == torch.float64 for pr in pairs for t in pr) else torch.float32
    device = pairs[0][0].device
    return [(B.to(device=device, dtype=dtype), A.to(device=device, dtype=dtype)) for B, A in pairs]


def _oriented(pairs: list[Pair], side: str) -> list[Pair]:
    # side="row" shares the input directions: work on M_k^T = A_k^T B_k^T
    return pairs if side == "column" else [(A.T, B.T) for B, A in pairs]


# --------------------------------------------------------------------------- reduction
@dataclass
class FactoredReduction:
    """The exact reduction of K LoRA updates M_k = B_k A_k (working orientation).

    Attributes:
        Q: (d, q) orthonormal basis of span[B_1 ... B_K], q = min(d, sum r_k).
        P: per client, (p, t_k) orthonormal basis of the row space of A_k.
        R: per client, (t_k, r_k) with A_k^T = P_k R_k.
        blocks: per client, the reduced block Mt_k = Q^T B_k R_k^T, (q, t_k);
            M_k = Q Mt_k P_k^T exactly.
        shape: (d, p) of a dense update.
    """

    Q: torch.Tensor
    P: tuple[torch.Tensor, ...]
    R: tuple[torch.Tensor, ...]
    blocks: tuple[torch.Tensor, ...]
    shape: tuple[int, int]

    @property
    def q(self) -> int:
        return int(self.Q.shape[1])

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(int(b.shape[1]) for b in self.blocks)

    def lift(self, X: torch.Tensor) -> torch.Tensor:
        """Map a reduced (q, sum t_k) matrix back to dense (K, d, p) blocks Q X_k P_k^T (densifies)."""
        if X.ndim != 2 or X.shape != (self.q, sum(self.block_sizes)):
            raise ValueError(f"X must have shape ({self.q}, {sum(self.block_sizes)}), got {tuple(X.shape)}")
        parts = torch.split(X.to(self.Q), list(self.block_sizes), dim=1)
        return torch.stack([self.Q @ (Xk @ Pk.T) for Xk, Pk in zip(parts, self.P)])


def _reduce(pairs: list[Pair]) -> FactoredReduction:
    d, p = pairs[0][0].shape[0], pairs[0][1].shape[1]
    ranks = [int(B.shape[1]) for B, _ in pairs]
    Q, RB = torch.linalg.qr(torch.cat([B for B, _ in pairs], dim=1))  # the one O(d (sum r)^2) step
    if len(set(ranks)) == 1:  # batched thin QRs of the A_k^T
        Ps, Rs = torch.linalg.qr(torch.stack([A.T for _, A in pairs]))
        P, R = list(Ps.unbind(0)), list(Rs.unbind(0))
    else:
        P, R = map(list, zip(*(torch.linalg.qr(A.T) for _, A in pairs)))
    blocks = torch.split(RB, ranks, dim=1)  # Q^T B_k, free from the QR
    return FactoredReduction(Q, tuple(P), tuple(R), tuple(b @ Rk.T for b, Rk in zip(blocks, R)), (d, p))


def reduce_factors(factors: Any, *, side: str = "column", scaling: Any = None) -> FactoredReduction:
    """The exact reduction of K LoRA updates (see the module docstring).

    Args:
        factors: K pairs (B_k (d x r_k), A_k (r_k x p)), torch or numpy, any device.
        side: "column" (reduce M_k) or "row" (reduce M_k^T, shared input subspace).
        scaling: optional LoRA scaling per client (float or K floats), multiplied into B_k.

    Returns:
        A :class:`FactoredReduction`; ``decompose(list(red.blocks))`` solves the dense program.
    """
    check_choice(side, "side", _SIDES)
    return _reduce(_oriented(_as_factor_pairs(factors, "factors", scaling), side))


# --------------------------------------------------------------------------- refined factors
def truncate_factors(B: Any, A: Any, rank: int | None = None, *, rtol: float | None = None) -> Pair:
    """Best rank-``rank`` factors of B A (Eckart-Young) without forming the d x p product.

    B = Q_B R_B and A^T = Q_A R_A (thin QRs), SVD of the small core R_B R_A^T = U s V^T,
    keep the leading ``rank`` triplets and split s evenly: B' = Q_B U sqrt(s),
    A' = sqrt(s) V^T Q_A^T. Cost O((d + p) m^2 + m^3) for inner width m.

    Args:
        B: (d, m); A: (m, p).
        rank: target rank; None keeps the numerical rank (singular values above ``rtol``
            times the largest), i.e. an exact compression.
        rtol: numerical-zero level for ``rank=None``; default 1e-12 (float64) / 1e-6 (float32).

    Returns:
        (B' (d, k), A' (k, p)) with k = min(rank, numerical rank); B' A' is the best
        rank-k approximation of B A.
    """
    B = as_matrix(B, "B")
    A = as_matrix(A, "A", dtype=B.dtype, device=B.device)
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"B is {tuple(B.shape)} and A is {tuple(A.shape)}: inner dimensions differ")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    if rtol is None:
        rtol = 1e-12 if B.dtype == torch.float64 else 1e-6
    rtol = check_fraction(rtol, "rtol")
    QB, RB = torch.linalg.qr(B)
    QA, RA = torch.linalg.qr(A.T)
    Uc, s, Vch = torch.linalg.svd(RB @ RA.T)
    k = int((s > rtol * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    k = max(min(k, rank) if rank is not None else k, 1)
    root = s[:k].sqrt()
    return QB @ (Uc[:, :k] * root), (root.unsqueeze(1) * Vch[:k]) @ QA.T


class RefinedFactors(Sequence):
    """K refined LoRA pairs; client k's pair is assembled on access.

    Benign client k (refine="average"): ``(cat[U U^T B_k, B_off], cat[A_k; A_off])`` with the
    shared off-subspace pair (B_off, A_off) stored once; refine="project": ``(U U^T B_k, A_k)``.
    Flagged clients: their own (B_k, A_k). ``B @ A`` equals the dense refinement.

    Attributes:
        own: per client the own pair (working orientation).
        shared: (B_off, A_off) or None.
        benign: (K,) bool.
        transposed: True for side="row" (pairs are transposed back on access).
    """

    def __init__(self, own: list[Pair], shared: Pair | None, benign: torch.Tensor, transposed: bool = False):
        self.own, self.shared, self.benign, self.transposed = own, shared, benign, transposed

    def __len__(self) -> int:
        return len(self.own)

    def __getitem__(self, k: int) -> Pair:  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(f"client index {k} out of range for {len(self)} clients")
        k = k % len(self)
        B, A = self.own[k]
        if self.shared is not None and bool(self.benign[k]):
            B, A = torch.cat([B, self.shared[0]], dim=1), torch.cat([A, self.shared[1]], dim=0)
        return (A.T, B.T) if self.transposed else (B, A)

    @property
    def ranks(self) -> list[int]:
        """Inner width of each client's refined pair."""
        extra = 0 if self.shared is None else int(self.shared[0].shape[1])
        return [int(B.shape[1]) + (extra if bool(b) else 0) for (B, _), b in zip(self.own, self.benign)]

    def dense(self) -> torch.Tensor:
        """All refined updates as a dense (K, d, p) tensor (memory K d p: small cases only)."""
        return torch.stack([B @ A for B, A in self])

    def truncated(self, rank: int, *, shared_rank: int | None = None) -> list[Pair]:
        """Every client's pair re-truncated to ``rank`` by :func:`truncate_factors`.

        Args:
            rank: target rank per client.
            shared_rank: first truncate the shared off-subspace pair once to this rank, so
                each client's truncation works on width r_k + shared_rank instead of
                r_k + m_C (much cheaper for many clients; an extra approximation).
        """
        src = self
        if shared_rank is not None and self.shared is not None:
            src = RefinedFactors(self.own, truncate_factors(*self.shared, shared_rank), self.benign, self.transposed)
        return [truncate_factors(B, A, rank) for B, A in src]


def _refine_factors(work: list[Pair], U: torch.Tensor, benign: torch.Tensor, mode: str, side: str,
                    name: str) -> RefinedFactors:
    if not bool(benign.any()):
        warnings.warn(f"{name}: every client was flagged; returning the local factors unrefined "
                      "(lower lam or raise threshold if this is unexpected)", RuntimeWarning, stacklevel=3)
        return RefinedFactors(list(work), None, benign, side == "row")
    own = [(U @ (U.T @ B), A) if bool(b) else (B, A) for (B, A), b in zip(work, benign)]
    shared = None
    if mode == "average":
        idx = [k for k in range(len(work)) if bool(benign[k])]
        BC = torch.cat([work[k][0] for k in idx], dim=1) / len(idx)
        B_off, A_off = BC - U @ (U.T @ BC), torch.cat([work[k][1] for k in idx], dim=0)
        if B_off.shape[1] > A_off.shape[1]:  # wider than p: compress exactly through A's side
            P, R = torch.linalg.qr(A_off.T)
            B_off, A_off = B_off @ R.T, P.T
        if B_off.shape[1] > B_off.shape[0]:  # wider than d
            QB, RB = torch.linalg.qr(B_off)
            B_off, A_off = QB, RB @ A_off
        shared = (B_off, A_off)
    return RefinedFactors(own, shared, benign, side == "row")


# --------------------------------------------------------------------------- fitting one module
@dataclass
class _FactoredFit:
    reduction: FactoredReduction
    decomposition: Decomposition
    subspace: torch.Tensor  # (d, r) = Q Ut
    rank: int
    singular_values: torch.Tensor  # of L-hat, zero-padded to the dense length min(d, K p)
    sparse_sq: torch.Tensor  # (K,) ||S_k||_F^2
    total_sq: torch.Tensor  # (K,) ||M_k||_F^2
    mu: float | None


def _check_rank_args(rank: Any, max_rank: Any, dmax: int, q: int, side: str) -> None:
    if isinstance(rank, str):
        if rank != "auto":
            raise ValueError(f"rank must be a positive int or 'auto', got {rank!r}")
    elif isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= dmax:
        raise ValueError(f"rank must be 'auto' or an int in [1, {dmax}] (min(d, K*p) on the {side} side), got {rank!r}")
    elif rank > q:
        raise ValueError(f"rank={rank} exceeds q={q}, the dimension of span[B_1 ... B_K]: directions beyond it carry "
                         "no data (the dense path would pad with arbitrary null-space vectors)")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or not 1 <= max_rank <= dmax):
        raise ValueError(f"max_rank must be None or an int in [1, {dmax}], got {max_rank!r}")


def _padded(s: torch.Tensor, length: int) -> torch.Tensor:
    out = torch.zeros(max(length, s.numel()), dtype=s.dtype, device=s.device)
    out[: s.numel()] = s
    return out


def _estimate_mu(red: FactoredReduction, exact: Decomposition, total_sq: torch.Tensor, rank: Any,
                 max_rank: int | None, threshold: float = 0.5) -> float:
    # fedlora_lite.clair.estimate_mu evaluated through the reduction (dense d, p in the formula)
    (d, p), K = red.shape, len(red.blocks)
    Ut, s = _svd_of_L(exact)
    r = choose_rank(_padded(s, min(d, K * p)), max_rank=max_rank) if rank == "auto" else int(rank)
    if r > Ut.shape[1]:
        Ut, s = _svd_of_L(exact, r)
    _, flags = _flags(exact.block_norms.pow(2), total_sq, threshold)
    benign = ~flags if bool((~flags).any()) else torch.ones_like(flags)
    U = Ut[:, :r]
    resid = sum(float((Mk - U @ (U.T @ Mk)).pow(2).sum()) for Mk, b in zip(red.blocks, benign) if bool(b))
    dof = max(int(benign.sum()) * p * max(d - r, 1), 1)
    sigma = (resid / dof) ** 0.5
    scale = float(total_sq.sum()) ** 0.5
    return max(sigma * (d**0.5 + (K * p) ** 0.5), 1e-12 * max(scale, 1e-300))


def _fit_factored(work: list[Pair], name: str, rank: Any, lam: float | None, mu: Any, side: str,
                  max_rank: int | None, solver_options: dict[str, Any]) -> _FactoredFit:
    red = _reduce(work)
    (d, p), K = red.shape, len(work)
    dmax = min(d, K * p)
    _check_rank_args(rank, max_rank, dmax, red.q, side)
    blocks = list(red.blocks)
    if "svd_rank_hint" not in solver_options and min(red.q, sum(red.block_sizes)) >= AUTO_RANK_HINT_MIN:
        # large reduced problem: randomized truncated SVT (full-SVD fallback when the hint is low)
        solver_options = {**solver_options, "svd_rank_hint": max(red.block_sizes)}
    total_sq = torch.stack([b.pow(2).sum() for b in blocks])
    if isinstance(mu, str):
        if mu != "auto":
            raise ValueError(f"mu must be None, a positive float or 'auto', got {mu!r}")
        dec0 = decompose(blocks, lam=lam, **solver_options)
        mu = _estimate_mu(red, dec0, total_sq, rank, max_rank)
        solver_options = {**solver_options, "init": dec0}
    dec = decompose(blocks, lam=lam, mu=mu, **solver_options)
    Ut, s = _svd_of_L(dec)
    s_full = _padded(s, dmax)
    r = choose_rank(s_full, max_rank=max_rank) if rank == "auto" else rank
    if r > Ut.shape[1]:
        Ut, _ = _svd_of_L(dec, r)
    if r == 0:
        warnings.warn(f"{name}: the low-rank part is zero (lam={dec.lam:.3g} too small?); the shared subspace is empty",
                      RuntimeWarning, stacklevel=3)
    return _FactoredFit(red, dec, red.Q @ Ut[:, :r], r, s_full, dec.block_norms.pow(2), total_sq, dec.mu)


def _check_common(threshold: float, refine: str, side: str) -> float:
    check_choice(refine, "refine", _REFINE)
    check_choice(side, "side", _SIDES)
    return _check_threshold(threshold)


# --------------------------------------------------------------------------- one module
@dataclass
class FactoredClairResult:
    """Output of :func:`clair_factored` (same meaning as :class:`~fedlora_lite.clair.ClairResult`).

    Attributes:
        subspace: (d, r) orthonormal shared subspace ((p, r) for side="row").
        rank: r.
        singular_values: singular values of L-hat, zero-padded to the dense length
            min(d, K p), so :func:`~fedlora_lite.clair.choose_rank` sees the dense spectrum.
        scores: (K,) ||S_k||_F / ||M_k||_F.
        flags: (K,) bool, True = contaminated.
        benign: (K,) bool, ~flags.
        refined_factors: :class:`RefinedFactors`, K pairs (B~_k, A~_k) with B~_k A~_k equal
            to the dense refinement.
        decomposition: decomposition of the reduced (q x sum t_k) problem; its objective,
            block norms and lam are the dense program's. ``reduction.lift`` maps L, S back.
        reduction: the :class:`FactoredReduction` (Q, P_k, R_k, reduced blocks).
        lam: block weight used.
        mu: noise weight used (None = exact form; the estimate when mu="auto").
        threshold, side, refine: as passed.
        refined: (K, d, p) dense refined updates if ``return_dense=True``, else None.
    """

    subspace: torch.Tensor
    rank: int
    singular_values: torch.Tensor
    scores: torch.Tensor
    flags: torch.Tensor
    benign: torch.Tensor
    refined_factors: RefinedFactors
    decomposition: Decomposition
    reduction: FactoredReduction
    lam: float
    mu: float | None
    threshold: float
    side: str
    refine: str
    refined: torch.Tensor | None = field(default=None, repr=False)

    @property
    def flagged_clients(self) -> list[int]:
        """Indices of flagged clients."""
        return [int(i) for i in torch.nonzero(self.flags).flatten()]


def clair_factored(
    factors: Any,
    *,
    rank: int | str = "auto",
    lam: float | None = None,
    mu: float | str | None = None,
    side: str = "column",
    threshold: float = 0.5,
    refine: str = "average",
    max_rank: int | None = None,
    scaling: Any = None,
    return_dense: bool = False,
    **solver_options: Any,
) -> FactoredClairResult:
    """CLAIR on K LoRA updates given as factors: the same answer as :func:`~fedlora_lite.clair.clair`
    on the dense products B_k A_k, at the cost of one thin QR plus a problem of size
    q x sum r_k (q <= sum r_k), independent of d * p.

    Args:
        factors: K pairs (B_k (d x r_k), A_k (r_k x p)) — torch (CPU/CUDA) or numpy,
            float32 (default precision) or float64; ranks may differ; or objects with
            ``.B``/``.A``/``.scaling`` (:class:`fedlora_lite.lora.LoraFactors`). K >= 3.
        rank, lam, mu, side, threshold, refine, max_rank: as in :func:`~fedlora_lite.clair.clair`
            (mu may be "auto"). ``rank`` may not exceed q.
        scaling: LoRA scaling alpha/r per client (float or K floats) multiplied into B_k;
            None if B_k already carries it.
        return_dense: also return the dense (K, d, p) refined updates (memory K d p).
        **solver_options: passed to :func:`~fedlora_lite.decomposition.decompose`
            (max_iter, tol, svd_rank_hint, progress). ``svd_rank_hint`` enables the
            randomized truncated SVD (with its full-SVD fallback) on the reduced problem.

    Returns:
        A :class:`FactoredClairResult` on the factors' device and dtype.
    """
    threshold = _check_common(threshold, refine, side)
    work = _oriented(_as_factor_pairs(factors, "factors", scaling), side)
    fit = _fit_factored(work, "factors", rank, lam, mu, side, max_rank, solver_options)
    scores, flags = _flags(fit.sparse_sq, fit.total_sq, threshold)
    refined = _refine_factors(work, fit.subspace, ~flags, refine, side, "factors")
    return FactoredClairResult(fit.subspace, fit.rank, fit.singular_values, scores, flags, ~flags, refined,
                               fit.decomposition, fit.reduction, fit.decomposition.lam, fit.mu, threshold, side,
                               refine, refined.dense() if return_dense else None)


# --------------------------------------------------------------------------- whole model, streamed
@dataclass
class FactoredModuleSummary:
    """Small per-module state kept by :func:`clair_factored_modules` (no factors, no d x p data).

    Attributes:
        subspace: (d, r) shared subspace of the module ((p, r) for side="row").
        rank: r.
        singular_values: of the module's L-hat (zero-padded as in :class:`FactoredClairResult`).
        scores: (K,) the module's own scores ||S_k||_F / ||M_k||_F.
        sparse_sq, total_sq: (K,) ||S_k||_F^2 and ||M_k||_F^2 (their sums over modules give
            the joint scores).
        lam, mu, objective, iterations, converged: from the module's decomposition.
        shape: (d, p) of the module's updates; q: reduced dimension.
    """

    subspace: torch.Tensor
    rank: int
    singular_values: torch.Tensor
    scores: torch.Tensor
    sparse_sq: torch.Tensor
    total_sq: torch.Tensor
    lam: float
    mu: float | None
    objective: float
    iterations: int
    converged: bool
    shape: tuple[int, int]
    q: int


Source = Callable[[], Iterable[tuple[str, Any]]]


@dataclass
class FactoredModulesResult:
    """Output of :func:`clair_factored_modules`: one joint decision, refinement on demand.

    Attributes:
        per_module: module name -> :class:`FactoredModuleSummary`.
        scores: (K,) joint scores sqrt(sum_m ||S_k^m||^2 / sum_m ||M_k^m||^2) (float64, CPU).
        flags, benign: (K,) bool joint decision.
        threshold, side, refine: as passed.
    """

    per_module: dict[str, FactoredModuleSummary]
    scores: torch.Tensor
    flags: torch.Tensor
    benign: torch.Tensor
    threshold: float
    side: str
    refine: str
    _source: Source = field(repr=False)
    _scaling: Any = field(default=None, repr=False)

    @property
    def flagged_clients(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.flags).flatten()]

    def iter_refined(self) -> Iterator[tuple[str, RefinedFactors]]:
        """Second pass: re-read each module's factors and yield (name, refined factors).

        Drop (or save and drop) each module's result before advancing the iterator, so
        that only one module's refined factors are alive at a time.

        Raises:
            ValueError: the source yields different modules or different factors than in
                the first pass (checked through every client's ||B_k A_k||_F).
        """
        seen = set()
        for name, factors in self._source():
            if name not in self.per_module:
                raise ValueError(f"module {name!r} was not seen in the first pass")
            seen.add(name)
            yield name, self._refine_one(name, factors)
        missing = sorted(set(self.per_module) - seen)
        if missing:
            raise ValueError(f"the source did not yield modules {missing} on the second pass")

    def refined(self, name: str) -> RefinedFactors:
        """Refined factors of one module (reads that module's factors again)."""
        if name not in self.per_module:
            raise KeyError(f"unknown module {name!r}")
        for n, factors in self._source():
            if n == name:
                return self._refine_one(name, factors)
        raise ValueError(f"the source no longer yields module {name!r}")

    def _refine_one(self, name: str, factors: Any) -> RefinedFactors:
        label = f"factors_by_module[{name!r}]"
        summ = self.per_module[name]
        work = _oriented(_as_factor_pairs(factors, label, self._scaling), self.side)
        U = summ.subspace.to(work[0][0])
        # ||B A||_F^2 = <B^T B, A A^T>: cheap check that the source is replayed faithfully
        energy = torch.stack([((B.T @ B) * (A @ A.T)).sum() for B, A in work]).double().cpu()
        ref = summ.total_sq.double().cpu()
        if len(energy) != len(ref) or not torch.allclose(energy, ref, rtol=1e-3, atol=1e-30 + 1e-6 * float(ref.max())):
            raise ValueError(f"{label}: the factors differ from the first pass (a source must replay the same data)")
        return _refine_factors(work, U, self.benign.to(U.device), self.refine, self.side, label)


def clair_factored_modules(
    factors_by_module: Mapping[str, Any] | Source,
    *,
    rank: int | str = "auto",
    lam: float | None = None,
    mu: float | str | None = None,
    side: str = "column",
    threshold: float = 0.5,
    refine: str = "average",
    max_rank: int | None = None,
    scaling: Any = None,
    progress: bool = False,
    **solver_options: Any,
) -> FactoredModulesResult:
    """Factored CLAIR on every adapted module of a model, streamed, with one joint decision.

    Same decision rule as :func:`~fedlora_lite.clair.clair_modules` (block energies pooled
    over modules). First pass: each module is reduced and decomposed on its own and only
    a :class:`FactoredModuleSummary` is kept; then the joint flags; refinement is a second
    pass, :meth:`FactoredModulesResult.iter_refined` (or ``.refined(name)``). Peak memory
    is one module's factors plus its reduction, however many modules the model has.

    Args:
        factors_by_module: module name -> K LoRA pairs (as in :func:`clair_factored`), or a
            zero-argument callable returning a fresh iterable of (name, pairs) each time it
            is called (e.g. a generator function that loads one module at a time from
            disk); it is called once per pass and must replay the same data.
        rank, lam, mu, side, threshold, refine, max_rank, scaling, **solver_options: as in
            :func:`clair_factored`, applied to every module.
        progress: show a tqdm bar over modules (first pass).

    Returns:
        A :class:`FactoredModulesResult`.
    """
    if isinstance(factors_by_module, Mapping):
        if len(factors_by_module) == 0:
            raise ValueError("factors_by_module must not be empty")
        mapping = factors_by_module
        source: Source = lambda: mapping.items()  # noqa: E731
    elif callable(factors_by_module):
        source = factors_by_module
    else:
        raise TypeError("factors_by_module must be a mapping name -> factors or a callable returning (name, factors) "
                        f"pairs, got {type(factors_by_module).__name__}")
    threshold = _check_common(threshold, refine, side)
    summaries: dict[str, FactoredModuleSummary] = {}
    K = None
    items = source()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="CLAIR modules", total=len(factors_by_module) if isinstance(factors_by_module, Mapping) else None)
    for name, factors in items:
        label = f"factors_by_module[{name!r}]"
        if name in summaries:
            raise ValueError(f"module {name!r} appears twice")
        work = _oriented(_as_factor_pairs(factors, label, scaling), side)
        if K is not None and len(work) != K:
            raise ValueError(f"{label} has {len(work)} clients, expected {K}")
        K = len(work)
        fit = _fit_factored(work, label, rank, lam, mu, side, max_rank, solver_options)
        m_scores, _ = _flags(fit.sparse_sq, fit.total_sq, threshold)
        dec = fit.decomposition
        summaries[name] = FactoredModuleSummary(fit.subspace, fit.rank, fit.singular_values, m_scores, fit.sparse_sq,
                                                fit.total_sq, dec.lam, fit.mu, dec.objective, dec.iterations,
                                                dec.converged, fit.reduction.shape, fit.reduction.q)
        del work, fit, dec  # keep only the summary
    if not summaries:
        raise ValueError("factors_by_module yielded no module")
    sparse = sum(s.sparse_sq.double().cpu() for s in summaries.values())
    total = sum(s.total_sq.double().cpu() for s in summaries.values())
    scores, flags = _flags(sparse, total, threshold)
    return FactoredModulesResult(summaries, scores, flags, ~flags, threshold, side, refine, source, scaling)


# --------------------------------------------------------------------------- synthetic instances
@dataclass
class SyntheticLora:
    """A random LoRA federation: ``factors`` (K pairs), the true ``benign`` mask and shared ``U``."""

    factors: list[Pair]
    benign: torch.Tensor
    U: torch.Tensor


def random_lora_factors(
    d: int,
    p: int,
    num_clients: int,
    rank: int | Sequence[int],
    *,
    shared_rank: int = 4,
    contamination: float = 0.2,
    heterogeneity: float = 0.0,
    contaminated: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SyntheticLora:
    """Random LoRA factors with a shared column subspace and contaminated clients.

    Benign k: ``B_k = U C_k + heterogeneity * sqrt(shared_rank / d) E_k`` with U (d x
    shared_rank) orthonormal, C_k and E_k standard Gaussian; contaminated k: B_k Gaussian
    with entries of variance shared_rank / d (another, random subspace; the same expected
    norm). A_k: Gaussian / sqrt(p). The first ``round(contamination * K)`` clients of a
    random permutation are contaminated.

    Args:
        d, p: update shape; num_clients: K; rank: r_k (int or K ints).
        shared_rank: dimension of the shared subspace (<= min r_k).
        contamination: fraction of contaminated clients in [0, 1).
        heterogeneity: relative size of the benign clients' off-subspace part.
        contaminated: explicit contaminated client indices (overrides ``contamination``;
            e.g. the same clients in every module of a model).
        generator: torch CPU generator (default: seeded with 0).
        dtype, device: of the returned factors (sampling happens on the CPU in float64).

    Returns:
        A :class:`SyntheticLora`.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    ranks = [int(rank)] * num_clients if isinstance(rank, int) else [int(r) for r in rank]
    if len(ranks) != num_clients or min(ranks) < shared_rank or shared_rank < 1:
        raise ValueError(f"rank must be an int or {num_clients} ints, each >= shared_rank={shared_rank}")
    check_fraction(contamination, "contamination")
    kw = {"generator": g, "dtype": torch.float64}
    U, _ = torch.linalg.qr(torch.randn(d, shared_rank, **kw))
    bad = set(torch.randperm(num_clients, generator=g)[: round(contamination * num_clients)].tolist())
    if contaminated is not None:
        bad = {int(k) for k in contaminated}
        if not all(0 <= k < num_clients for k in bad):
            raise ValueError(f"contaminated must hold client indices in [0, {num_clients}), got {sorted(bad)}")
    scale = math.sqrt(shared_rank / d)
    pairs = []
    for k, r in enumerate(ranks):
        if k in bad:
            B = scale * torch.randn(d, r, **kw)
        else:
            B = U @ torch.randn(shared_rank, r, **kw) + heterogeneity * scale * torch.randn(d, r, **kw)
        A = torch.randn(r, p, **kw) / math.sqrt(p)
        pairs.append((B.to(device=device, dtype=dtype), A.to(device=device, dtype=dtype)))
    benign = torch.tensor([k not in bad for k in range(num_clients)], device=device)
    return SyntheticLora(pairs, benign, U.to(device=device, dtype=dtype))
