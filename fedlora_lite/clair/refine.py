"""CLAIR's refinement of the collaborative set, on dense updates and on LoRA factors.

One family (ours) contains every variant. For a client k of the collaborative set C-hat,
with shared subspace U, P = U U^T, P_perp = I - P and a collaborative mean M-bar:

    M~_k = M-bar + W_k (M_k - M-bar),   W_k = w_in P + w_off P_perp,   w_in, w_off in [0, 1].

* (1, 0) is **the paper's refinement** as we read it ("reduces off-subspace estimation
  error through cross-client averaging while preserving client-specific variation within
  the shared LoRA subspace"): ``P M_k + P_perp M-bar``; ``refine="paper"`` uses it with
  the plain mean, exactly as the paper describes;
* (0, 0) is "detect, then average over C-hat", (1, 1) is Local;
* ``refine="project"`` is ``P M_k`` (no shared off-subspace part).

``refine="adaptive"`` (the default, ours) uses a **norm-robust mean** (every member's
update clipped to ``clip`` times the median norm of C-hat, so scaling one's own update buys
no influence) and chooses (w_in, w_off) from the data: by default the shrinkage estimate of
:func:`shrinkage_weights`; with the clients' own validation data, by
the candidates of :data:`WEIGHT_GRID` (:func:`apply_family`) and each client's choice on its own data
(see :mod:`fedlora_lite.experiments.copy_task.methods`).

Flagged clients get their own update back (CLAIR does not serve them). On factors the
refined update is never densified: with B-bar = [c_j B_j / |C|]_{j in C} (c_j the clip
factors) and A-bar = [A_j]_{j in C},

    M~_k = [w_in P B_k + w_off P_perp B_k, (1 - w_in) P B-bar, (1 - w_off) P_perp B-bar]
           @ [A_k; A-bar; A-bar],

so client k's refined factors have rank r_k plus the width of the components it uses
(each compressed exactly to at most min(d, p, m_C), m_C = sum_{j in C} r_j). The shared
components are stored once (:class:`RefinedFactors` builds each client's pair on access).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..core.reduction import Pair, truncate_factors
from ..core.validation import as_update_stack, check_choice
from .config import REFINE_MODES

__all__ = ["refine_updates", "RefinedFactors", "refine_factors", "robust_mean_weights", "shrinkage_weights", "gram",
           "family_weights", "apply_family", "effective_sizes", "WEIGHT_GRID"]

WEIGHT_GRID: tuple[tuple[float, float], ...] = tuple((a, b) for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0))
"""The (w_in, w_off) candidates clients choose from with their own validation data (9 points)."""


def _warn_all_flagged(name: str) -> None:
    warnings.warn(f"{name}: every client was flagged; returning the local updates unrefined "
                  "(lower lam or raise threshold if this is unexpected)", RuntimeWarning, stacklevel=4)


def robust_mean_weights(norms: torch.Tensor, benign: torch.Tensor, clip: float | None) -> torch.Tensor:
    """(K,) weights c_k / |C| of the collaborative mean: members clipped to ``clip`` x their median norm.

    Non-members get 0. ``clip=None`` gives the plain mean (1 / |C| each).
    """
    norms = norms.double().cpu()
    b = benign.cpu()
    w = torch.zeros(norms.shape, dtype=torch.float64)
    n = int(b.sum())
    if n == 0:
        return w
    c = torch.ones(n, dtype=torch.float64)
    if clip is not None:
        nb = norms[b]
        level = clip * float(nb.median())
        c = torch.where(nb > level, level / torch.clamp(nb, min=1e-300), c)
    w[b] = c / n
    return w


def family_weights(mode: str, K: int, weights: tuple[float, float] | None = None) -> torch.Tensor:
    """(K, 2) per-client (w_in, w_off) of the fixed modes: paper/average (1, 0), project, fixed."""
    if mode in ("paper", "average"):
        pair = (1.0, 0.0)
    elif mode == "fixed":
        pair = weights
    else:
        raise ValueError(f"mode {mode!r} has no fixed weights")
    return torch.tensor([pair] * K, dtype=torch.float64)


def gram(items: list[torch.Tensor] | list[Pair], U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, G_in): K x K inner products <M_i, M_j> and <P M_i, P M_j> (float64, CPU).

    ``items`` are dense (d, p) updates or factor pairs (B, A) with M = B A; for pairs the
    products are formed from r x r matrices only: <B_i A_i, B_j A_j> = <B_i^T B_j, A_i A_j^T>.
    """
    if isinstance(items[0], torch.Tensor):
        X = torch.stack(list(items)).double()
        Xin = torch.einsum("dr,kdp->krp", U.double(), X)
        return (torch.einsum("idp,jdp->ij", X, X).cpu(), torch.einsum("irp,jrp->ij", Xin, Xin).cpu())
    Bs = [B.double() for B, _ in items]
    As = [A.double() for _, A in items]
    UB = [U.double().T @ B for B in Bs]
    K = len(items)
    G = torch.zeros(K, K, dtype=torch.float64)
    G_in = torch.zeros(K, K, dtype=torch.float64)
    for i in range(K):
        for j in range(i, K):
            AA = As[i] @ As[j].T
            G[i, j] = G[j, i] = float(((Bs[i].T @ Bs[j]) * AA).sum())
            G_in[i, j] = G_in[j, i] = float(((UB[i].T @ UB[j]) * AA).sum())
    return G, G_in


def effective_sizes(blocks: list[torch.Tensor], benign: torch.Tensor) -> tuple[int, int]:
    """(d_eff, p_eff): numerical rank of the benign stack and the largest benign block rank.

    Computed on the solver's blocks (dense or reduced: the same ranks), so dense and
    factored inputs of the same updates get the same shrinkage weights.
    """
    Mb = [b for b, keep in zip(blocks, benign) if bool(keep)]
    eps = 1e-9 if Mb[0].dtype == torch.float64 else 1e-5
    s_all = torch.linalg.svdvals(torch.cat(Mb, dim=1))
    d_eff = int((s_all > eps * float(s_all[0])).sum()) if s_all.numel() and float(s_all[0]) > 0 else 0
    p_eff = 0
    for m in Mb:
        s = torch.linalg.svdvals(m)
        p_eff = max(p_eff, int((s > eps * float(s[0])).sum()) if s.numel() and float(s[0]) > 0 else 0)
    return max(d_eff, 1), max(p_eff, 1)


def shrinkage_weights(G: torch.Tensor, G_in: torch.Tensor, benign: torch.Tensor, mean_weights: torch.Tensor,
                      rank: int, d_eff: int, p_eff: int) -> tuple[float, float]:
    """(w_in, w_off) by a James-Stein-type estimate of between-client variation vs noise (ours).

    Assumption (the paper's model: benign clients differ inside the shared subspace and
    carry only noise outside it): the off-subspace deviations from the mean are noise with
    the same energy per degree of freedom in every direction. Their energy per degree of
    freedom estimates the noise level; the in-subspace deviations' excess over it is the
    real between-client variation, and ``w_in = max(0, 1 - noise_in / deviation_in)``
    (positive-part James-Stein); ``w_off = 0``. Degrees of freedom use effective sizes
    (``d_eff``: dimension spanned by the updates, ``p_eff``: the largest client rank), so
    low-rank LoRA updates are not credited with noise in directions they cannot have.

    Args:
        G, G_in: from :func:`gram`.
        benign: (K,) collaborative set; mean_weights: (K,) weights of the mean (sum 1 over it).
        rank: r = dim U; d_eff, p_eff: effective sizes.

    Returns:
        (w_in, w_off); (1, 0), the paper's point, when there is nothing to estimate from.
    """
    b = benign.cpu()
    n = int(b.sum())
    if n < 3 or rank == 0:
        return 1.0, 0.0
    c = mean_weights.double().cpu()

    def deviation_energy(Gm: torch.Tensor) -> float:
        # mean over members of ||M_k - sum_j c_j M_j||^2
        cross = Gm @ c
        e = torch.diagonal(Gm) - 2 * cross + float(c @ Gm @ c)
        return float(e[b].mean())

    e_all, e_in = deviation_energy(G), deviation_energy(G_in)
    e_off = e_all - e_in
    if e_in <= 0 or e_off <= 0:
        return 1.0, 0.0
    noise_per_dof = e_off / (max(d_eff - rank, 1) * p_eff)
    return max(0.0, min(1.0, 1.0 - noise_per_dof * rank * p_eff / e_in)), 0.0


def refine_updates(updates: Any, subspace: torch.Tensor, benign: Any, mode: str = "paper", *,
                   weights: Any = None, clip: float | None = None) -> torch.Tensor:
    """Refined dense updates of the collaborative set (see the module docstring).

    Args:
        updates: (K, d, p) client updates (or a list of K d x p matrices).
        subspace: (d, r) orthonormal basis (r may be 0).
        benign: (K,) bool mask of the collaborative set; must contain at least one client.
        mode: one of :data:`~fedlora_lite.clair.config.REFINE_MODES`.
        weights: (w_in, w_off), or (K, 2) per client, for ``mode`` "fixed"/"adaptive"
            ("adaptive" without weights uses :func:`shrinkage_weights`).
        clip: norm clipping of the robust mean ("fixed"/"adaptive"; "paper" uses the plain mean).

    Returns:
        (K, d, p) tensor: refined updates for benign clients, inputs for the others.
    """
    M = as_update_stack(updates, "updates", min_clients=1)
    check_choice(mode, "mode", REFINE_MODES)
    K, d, _ = M.shape
    if not isinstance(subspace, torch.Tensor) or subspace.ndim != 2 or subspace.shape[0] != d:
        raise ValueError(f"subspace must be a (d={d}, r) tensor, got {getattr(subspace, 'shape', type(subspace))}")
    U = subspace.to(M)
    if U.shape[1] and not torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype, device=U.device),
                                         atol=1e-4 if U.dtype == torch.float32 else 1e-8):
        raise ValueError("subspace must have orthonormal columns (U^T U = I)")
    benign = torch.as_tensor(benign, device=M.device)
    if benign.dtype != torch.bool or benign.shape != (K,):
        raise ValueError(f"benign must be a bool mask of shape ({K},), got {benign.dtype} {tuple(benign.shape)}")
    if not bool(benign.any()):
        raise ValueError("benign selects no client: there is no collaborative set to refine with")
    own_in = torch.einsum("dr,krp->kdp", U, torch.einsum("dr,kdp->krp", U, M))
    if mode == "project":
        return torch.where(benign.view(K, 1, 1), own_in, M)
    if mode in ("paper", "average"):
        mean = M[benign].mean(dim=0)
        W = family_weights("paper", K).to(M)
    else:
        from .fit import client_norms

        c = robust_mean_weights(client_norms(list(M)), benign.cpu(), clip).to(M)
        mean = torch.einsum("k,kdp->dp", c, M)
        if weights is None and mode == "adaptive":
            G, G_in = gram(list(M), U)
            d_eff, p_eff = effective_sizes(list(M), benign)
            weights = shrinkage_weights(G, G_in, benign.cpu(), c.cpu(), U.shape[1], d_eff, p_eff)
        if weights is None:
            raise ValueError("mode 'fixed' needs weights=(w_in, w_off)")
        W = torch.as_tensor(weights, dtype=M.dtype, device=M.device)
        W = W.expand(K, 2) if W.shape == (2,) else W
        if W.shape != (K, 2) or bool((W < 0).any()) or bool((W > 1).any()):
            raise ValueError(f"weights must be (w_in, w_off) or ({K}, 2) values in [0, 1], got shape {tuple(W.shape)}")
    return apply_family(M, U, benign, W, mean)


def apply_family(M: torch.Tensor, U: torch.Tensor, benign: torch.Tensor, W: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``mean + W_k (M_k - mean)`` for the benign clients of a (K, d, p) stack, W: (K, 2) (w_in, w_off)."""
    K = M.shape[0]
    D = M - mean.unsqueeze(0)
    D_in = torch.einsum("dr,krp->kdp", U, torch.einsum("dr,kdp->krp", U, D))
    refined = mean.unsqueeze(0) + W[:, 0].view(K, 1, 1) * D_in + W[:, 1].view(K, 1, 1) * (D - D_in)
    return torch.where(benign.view(K, 1, 1), refined, M)


class RefinedFactors(Sequence):
    """K refined LoRA pairs; client k's pair is assembled on access.

    Client k's pair is ``(cat[own_B_k, coef[k, 0] B_1, coef[k, 1] B_2, ...], cat[own_A_k; A_1; A_2; ...])``
    over the shared components ``(B_s, A_s)`` (stored once), skipping components whose
    coefficient is 0; flagged clients have no shared part. ``B @ A`` equals the dense refinement.

    Attributes:
        own: per client the own pair (working orientation).
        components: the shared pairs (B_s, A_s).
        coefficients: (K, len(components)) per-client multipliers of the shared B_s.
        benign: (K,) bool.
        transposed: True for side="row" (pairs are transposed back on access).
    """

    def __init__(self, own: list[Pair], components: list[Pair], coefficients: torch.Tensor, benign: torch.Tensor,
                 transposed: bool = False):
        self.own, self.components, self.benign, self.transposed = own, components, benign, transposed
        self.coefficients = coefficients

    def __len__(self) -> int:
        return len(self.own)

    def _parts(self, k: int) -> list[tuple[float, int]]:
        if not bool(self.benign[k]):
            return []
        return [(float(c), s) for s, c in enumerate(self.coefficients[k]) if float(c) != 0.0]

    def __getitem__(self, k: int) -> Pair:  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(f"client index {k} out of range for {len(self)} clients")
        k = k % len(self)
        B, A = self.own[k]
        parts = self._parts(k)
        if parts:
            B = torch.cat([B] + [c * self.components[s][0] for c, s in parts], dim=1)
            A = torch.cat([A] + [self.components[s][1] for _, s in parts], dim=0)
        return (A.T, B.T) if self.transposed else (B, A)

    @property
    def ranks(self) -> list[int]:
        """Inner width of each client's refined pair."""
        return [int(self.own[k][0].shape[1]) + sum(int(self.components[s][0].shape[1]) for _, s in self._parts(k))
                for k in range(len(self))]

    def dense(self) -> torch.Tensor:
        """All refined updates as a dense (K, d, p) tensor (memory K d p: small cases only)."""
        return torch.stack([B @ A for B, A in self])

    def truncated(self, rank: int, *, shared_rank: int | None = None) -> list[Pair]:
        """Every client's pair re-truncated to ``rank`` by :func:`~fedlora_lite.core.truncate_factors`.

        Args:
            rank: target rank per client.
            shared_rank: first truncate each shared component once to this rank, so each
                client's truncation works on a narrower pair (an extra approximation).
        """
        src = self
        if shared_rank is not None and self.components:
            comps = [truncate_factors(B, A, shared_rank) for B, A in self.components]
            src = RefinedFactors(self.own, comps, self.coefficients, self.benign, self.transposed)
        return [truncate_factors(B, A, rank) for B, A in src]


def _compressed(B: torch.Tensor, A: torch.Tensor) -> Pair:
    if B.shape[1] > A.shape[1]:  # wider than p: compress exactly through A's side
        P, R = torch.linalg.qr(A.T)
        B, A = B @ R.T, P.T
    if B.shape[1] > B.shape[0]:  # wider than d
        QB, RB = torch.linalg.qr(B)
        B, A = QB, RB @ A
    return B, A


def refine_factors(pairs: list[Pair], U: torch.Tensor, benign: torch.Tensor, mode: str, *,
                   weights: torch.Tensor | None = None, mean_weights: torch.Tensor | None = None,
                   transposed: bool = False, name: str = "factors") -> RefinedFactors:
    """Refined factors of K (oriented) LoRA pairs; see the module docstring.

    Args:
        pairs: K pairs (B_k, A_k) with M_k = B_k A_k.
        U: (d, r) orthonormal shared subspace.
        benign: (K,) bool collaborative set.
        mode: "project", or "family"/"paper" (then ``weights`` (K, 2) and ``mean_weights``
            (K,) are used, defaulting to (1, 0) and the plain mean: the paper's refinement).
    """
    K = len(pairs)
    if not bool(benign.any()):
        _warn_all_flagged(name)
        return RefinedFactors(list(pairs), [], torch.zeros(K, 0), benign, transposed)
    proj = [U @ (U.T @ B) for B, _ in pairs]
    if mode == "project":
        own = [(P, A) if bool(b) else (B, A) for P, (B, A), b in zip(proj, pairs, benign)]
        return RefinedFactors(own, [], torch.zeros(K, 0), benign, transposed)
    if weights is None:
        weights = family_weights("paper", K)
    if mean_weights is None:
        mean_weights = benign.double().cpu() / float(benign.sum())
    W = weights.double().cpu()
    own = []
    for k, ((B, A), P, b) in enumerate(zip(pairs, proj, benign)):
        own.append((float(W[k, 0]) * P + float(W[k, 1]) * (B - P), A) if bool(b) else (B, A))
    idx = [k for k in range(K) if bool(benign[k]) and float(mean_weights[k]) != 0.0]
    Bbar = torch.cat([float(mean_weights[k]) * pairs[k][0] for k in idx], dim=1)
    Abar = torch.cat([pairs[k][1] for k in idx], dim=0)
    Pbar = U @ (U.T @ Bbar)
    components = [_compressed(Pbar, Abar), _compressed(Bbar - Pbar, Abar)]
    coefficients = torch.stack([1.0 - W[:, 0], 1.0 - W[:, 1]], dim=1)
    return RefinedFactors(own, components, coefficients, benign, transposed)
