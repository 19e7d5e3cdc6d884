"""Byzantine attacks by name: functions of the honest updates that return the byzantine ones.

``attack(name, honest_updates, num_byzantine, generator=..., **options)`` returns the
(f, d, p) updates that f byzantine clients send, given the (n, d, p) honest updates of the
round (every attack here is *omniscient*: it sees all honest updates, the strongest
threat model of the literature). :func:`contaminate` replaces a fraction of a federation's
clients by byzantine ones at seeded random positions and returns the mixed stack with the
true benign mask, ready for :func:`~fedlora_lite.federated.aggregators.aggregate`.

=====================  =====================================================================
``sign_flip``          ``-scale * mean(honest)`` (ByzFL's SignFlipping)
``gaussian``           i.i.d. N(mu, sigma^2) entries
``scaled``             an honest update boosted: ``scale * honest_j`` (Bhagoji et al. 2019)
``model_replacement``  chosen so that FedAvg lands on ``target`` (Bagdasaryan et al. 2020)
``alie``               ``mu + z sigma`` per coordinate, z from n and f (Baruch et al. 2019)
``ipm``                ``-epsilon * mean(honest)`` (Xie, Koyejo & Gupta 2020)
``min_max``            ``mu + gamma p``, largest gamma keeping the max distance to the
                       honest updates within theirs (Shejwalkar & Houmansadr 2021)
``min_sum``            same, with the sum of squared distances
``mimic``              copy the honest update most extreme along their top principal
                       direction (Karimireddy, He & Jaggi 2022)
``clair_adaptive``     knows CLAIR's subspace and threshold: stays just under it or
                       colludes into the shared subspace (:mod:`~fedlora_lite.federated.attacks_adaptive`)
=====================  =====================================================================

Label flipping is a data-level attack, not a function of the updates: on the copy task it
is the ``"corrupted"`` client kind; :func:`label_flip_task` returns a task configuration
whose contaminated clients flip labels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

import torch

from ..core.validation import as_matrix, as_update_stack, check_choice, check_fraction, check_positive
from .attacks_adaptive import clair_adaptive
from .result import check_options

__all__ = ["ATTACKS", "attack", "available_attacks", "contaminate", "alie_z", "label_flip_task"]


def _mean(H: torch.Tensor) -> torch.Tensor:
    return H.mean(dim=0)


def _repeat(x: torch.Tensor, f: int) -> torch.Tensor:
    return x.unsqueeze(0).expand(f, *x.shape).clone()


def sign_flip(H: torch.Tensor, f: int, generator: torch.Generator, *, scale: float = 1.0) -> torch.Tensor:
    """Sign flip: every byzantine client sends ``-scale * mean_i H_i`` (ByzFL's ``SignFlipping`` at scale 1)."""
    return _repeat(-check_positive(scale, "scale") * _mean(H), f)


def gaussian(H: torch.Tensor, f: int, generator: torch.Generator, *, mu: float = 0.0,
             sigma: float | None = None) -> torch.Tensor:
    """Gaussian noise: i.i.d. ``N(mu, sigma^2)`` entries, one draw per byzantine client.

    ``sigma=None`` uses the root-mean-square entry of the honest updates (ours, so the
    attack is in the updates' units; ByzFL's ``Gaussian`` defaults to sigma = 1).
    """
    if not isinstance(mu, (int, float)) or not math.isfinite(mu):
        raise ValueError(f"mu must be a finite number, got {mu!r}")
    s = float(H.pow(2).mean().sqrt()) if sigma is None else check_positive(sigma, "sigma", allow_zero=True)
    noise = torch.randn((f, *H.shape[1:]), generator=generator, dtype=torch.float64)
    return (mu + s * noise).to(H)


def scaled(H: torch.Tensor, f: int, generator: torch.Generator, *, scale: float = 10.0) -> torch.Tensor:
    """Boosting (Bhagoji et al. 2019, https://arxiv.org/abs/1811.12470): ``scale * H_j``, j a random honest client."""
    scale = check_positive(scale, "scale")
    j = torch.randint(0, H.shape[0], (f,), generator=generator)
    return scale * H[j.to(H.device)]


def model_replacement(H: torch.Tensor, f: int, generator: torch.Generator, *, target: Any = None) -> torch.Tensor:
    """Model replacement (Bagdasaryan et al. 2020, https://arxiv.org/abs/1807.00459).

    Formula: ``b = (K target - sum_i H_i) / f`` for every byzantine client, so that the plain
    mean of all K = n + f updates is exactly ``target`` (default ``-mean(H)``).
    """
    t = -_mean(H) if target is None else as_matrix(target, "target", dtype=H.dtype, device=H.device)
    if t.shape != H.shape[1:]:
        raise ValueError(f"target must have shape {tuple(H.shape[1:])}, got {tuple(t.shape)}")
    K = H.shape[0] + f
    return _repeat((K * t - H.sum(dim=0)) / f, f)


def alie_z(num_clients: int, num_byzantine: int) -> float:
    """ALIE's z: ``s = floor(n / 2 + 1) - f``, ``z = Phi^{-1}((n - s) / n)`` (Baruch et al. 2019, eq. in sec. 3).

    The quantile is clipped to [1e-12, 1 - 1e-12].
    """
    n, f = int(num_clients), int(num_byzantine)
    if n < 2 or not 0 <= f < n:
        raise ValueError(f"alie_z needs n >= 2 clients and 0 <= f < n, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-12), 1 - 1e-12))


def alie(H: torch.Tensor, f: int, generator: torch.Generator, *, z: float | None = None) -> torch.Tensor:
    """A little is enough (Baruch, Baruch & Goldberg 2019, https://arxiv.org/abs/1902.06156).

    Formula: ``mu_j + z sigma_j`` per coordinate (mean and standard deviation, ddof=1, of the
    honest updates); ``z=None`` takes :func:`alie_z` of n = honest + byzantine and f, a
    float fixes it (ByzFL's ``ALittleIsEnough(tau=z)``).
    """
    if H.shape[0] < 2:
        raise ValueError("alie needs at least 2 honest updates for a standard deviation")
    zz = alie_z(H.shape[0] + f, f) if z is None else float(z)
    if not math.isfinite(zz):
        raise ValueError(f"z must be finite, got {z!r}")
    return _repeat(_mean(H) + zz * H.std(dim=0, correction=1), f)


def ipm(H: torch.Tensor, f: int, generator: torch.Generator, *, epsilon: float = 0.1) -> torch.Tensor:
    """Inner-product manipulation (Xie, Koyejo & Gupta 2020, https://arxiv.org/abs/1903.03936): ``-epsilon mean(H)``.

    Default epsilon = 0.1 (the paper's small-epsilon setting, which keeps the byzantine
    updates close to the honest ones); ByzFL's ``InnerProductManipulation(tau)`` is the same
    with epsilon = tau (default 2).
    """
    return _repeat(-check_positive(epsilon, "epsilon") * _mean(H), f)


_PERTURBATIONS = ("unit_vec", "std", "sign")


def _perturbation(H: torch.Tensor, kind: str) -> torch.Tensor:
    mu = _mean(H)
    if kind == "unit_vec":
        n = float(mu.norm())
        return -mu / n if n > 0 else torch.zeros_like(mu)
    if kind == "std":
        return -H.std(dim=0, correction=1) if H.shape[0] > 1 else torch.zeros_like(mu)
    return -torch.sign(mu)


def _gamma_search(ok: Callable[[float], bool], gamma_init: float, tol: float, max_steps: int = 200) -> float:
    """Largest gamma with ok(gamma), by the halving search of Shejwalkar & Houmansadr 2021 (Algorithm 1)."""
    gamma, step, succ = gamma_init, gamma_init, 0.0
    for _ in range(max_steps):
        if abs(succ - gamma) <= tol:
            break
        if ok(gamma):
            succ = gamma
            gamma = gamma + step / 2
        else:
            gamma = gamma - step / 2
        step = step / 2
    return succ


def _agnostic(H: torch.Tensor, f: int, perturbation: str, gamma_init: float, tol: float, objective: str) -> torch.Tensor:
    check_choice(perturbation, "perturbation", _PERTURBATIONS)
    gamma_init = check_positive(gamma_init, "gamma_init")
    tol = check_positive(tol, "tol")
    X = H.reshape(H.shape[0], -1).double()
    mu = X.mean(dim=0)
    p = _perturbation(H, perturbation).reshape(-1).double()
    D = torch.cdist(X, X)
    if objective == "max":
        bound = float(D.max())
        measure = lambda m: float((X - m).norm(dim=1).max())  # noqa: E731
    else:
        bound = float(D.pow(2).sum(dim=1).max())
        measure = lambda m: float((X - m).norm(dim=1).pow(2).sum())  # noqa: E731
    gamma = _gamma_search(lambda g: measure(mu + g * p) <= bound, gamma_init, tol)
    return _repeat((mu + gamma * p).reshape(H.shape[1:]).to(H), f)


def min_max(H: torch.Tensor, f: int, generator: torch.Generator, *, perturbation: str = "unit_vec",
            gamma_init: float = 50.0, tol: float = 1e-5) -> torch.Tensor:
    """Min-max (Shejwalkar & Houmansadr 2021, https://www.ndss-symposium.org/ndss-paper/manipulating-the-byzantine-optimizing-model-poisoning-attacks-and-defenses-for-federated-learning/).

    Formula: ``mu + gamma p`` with the largest gamma such that
    ``max_i ||b - H_i|| <= max_{i,j} ||H_i - H_j||``; p = -mu/||mu|| ("unit_vec"), -sigma
    ("std") or -sign(mu) ("sign"); gamma by the paper's halving search from ``gamma_init``.
    """
    return _agnostic(H, f, perturbation, gamma_init, tol, "max")


def min_sum(H: torch.Tensor, f: int, generator: torch.Generator, *, perturbation: str = "unit_vec",
            gamma_init: float = 50.0, tol: float = 1e-5) -> torch.Tensor:
    """Min-sum (Shejwalkar & Houmansadr 2021, same reference as :func:`min_max`).

    Formula: ``mu + gamma p`` with the largest gamma such that
    ``sum_i ||b - H_i||^2 <= max_i sum_j ||H_i - H_j||^2``.
    """
    return _agnostic(H, f, perturbation, gamma_init, tol, "sum")


def mimic(H: torch.Tensor, f: int, generator: torch.Generator, *, target: int | None = None) -> torch.Tensor:
    """Mimic (Karimireddy, He & Jaggi 2022, https://arxiv.org/abs/2006.09365): all copy one honest client.

    ``target=None`` picks ``argmax_i <z, H_i - mu>`` with z the top principal direction of
    the centred honest updates (the paper estimates z over rounds; we compute it exactly);
    an int copies that client (ByzFL's ``Mimic(epsilon=target)``).
    """
    n = H.shape[0]
    if target is None:
        X = H.reshape(n, -1)
        C = X - X.mean(dim=0)
        z = torch.linalg.svd(C, full_matrices=False).Vh[0]
        z = z * torch.sign(z[torch.argmax(z.abs())])  # deterministic sign
        target = int(torch.argmax(C @ z))
    elif isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n:
        raise ValueError(f"target must be an honest client index in [0, {n}), got {target!r}")
    return _repeat(H[target], f)


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "sign_flip": sign_flip,
    "gaussian": gaussian,
    "scaled": scaled,
    "model_replacement": model_replacement,
    "alie": alie,
    "ipm": ipm,
    "min_max": min_max,
    "min_sum": min_sum,
    "mimic": mimic,
    "clair_adaptive": clair_adaptive,
}
"""Registered attacks: name -> function(honest (n, d, p), f, generator, **options) -> (f, d, p)."""


def available_attacks() -> list[str]:
    """Names accepted by :func:`attack` and :func:`contaminate`, in registry order."""
    return list(ATTACKS)


def _check_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def attack(name: str, honest_updates: Any, num_byzantine: int, *, generator: torch.Generator | None = None,
           **options: Any) -> torch.Tensor:
    """The updates of ``num_byzantine`` byzantine clients under a named attack.

    Args:
        name: one of :func:`available_attacks`.
        honest_updates: (n, d, p) honest updates of the round (or n matrices), n >= 1.
        num_byzantine: f >= 1 byzantine clients.
        generator: torch CPU generator for the random attacks (default: seeded with 0).
        **options: the attack's options (see each function).

    Returns:
        (f, d, p) tensor on the honest updates' device and dtype.

    Raises:
        ValueError: unknown name (the message lists the valid ones), bad f or option values.
        TypeError: an option the attack does not take.
    """
    if not isinstance(name, str) or name not in ATTACKS:
        raise ValueError(f"attack must be one of {available_attacks()}, got {name!r} "
                         "(label flipping is data-level: see label_flip_task)")
    H = as_update_stack(honest_updates, "honest_updates", min_clients=1)
    if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 1:
        raise ValueError(f"num_byzantine must be an int >= 1, got {num_byzantine!r}")
    fn = ATTACKS[name]
    check_options(name, fn, options, what="attack")
    out = fn(H, num_byzantine, _check_generator(generator), **options)
    if out.shape != (num_byzantine, *H.shape[1:]) or not bool(torch.isfinite(out).all()):
        raise RuntimeError(f"attack {name!r} produced {tuple(out.shape)} or non-finite values")  # a bug, not bad input
    return out


def contaminate(name: str, updates: Any, fraction: float, *, generator: torch.Generator | None = None,
                **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``round(fraction * K)`` clients of a federation by byzantine clients of a named attack.

    The byzantine positions are a seeded random subset; the attack sees the remaining
    (honest) updates.

    Args:
        name: one of :func:`available_attacks`.
        updates: (K, d, p) honest updates of all K clients.
        fraction: byzantine fraction in [0, 1); at least one honest client must remain.
        generator: torch CPU generator (positions, then the attack's own randomness).
        **options: the attack's options.

    Returns:
        (K, d, p) updates with the byzantine ones in place, and the (K,) bool benign mask.
    """
    M = as_update_stack(updates, "updates", min_clients=1)
    frac = check_fraction(fraction, "fraction")
    K = M.shape[0]
    f = int(math.floor(frac * K + 0.5))
    if f >= K:
        raise ValueError(f"fraction={fraction} of K={K} clients leaves no honest client; use a fraction below {(K - 0.5) / K:.3f}")
    g = _check_generator(generator)
    benign = torch.ones(K, dtype=torch.bool)
    if f == 0:
        if not isinstance(name, str) or name not in ATTACKS:
            raise ValueError(f"attack must be one of {available_attacks()}, got {name!r}")
        return M.clone(), benign.to(M.device)
    bad = torch.randperm(K, generator=g)[:f]
    benign[bad] = False
    out = M.clone()
    out[bad.to(M.device)] = attack(name, M[benign.to(M.device)], f, generator=g, **options)
    return out, benign.to(M.device)


def label_flip_task(task_config: Any, fraction: float, *, colluding: bool = False) -> Any:
    """A copy-task configuration whose contaminated clients flip labels (the ``"corrupted"`` kind).

    Each contaminated client's targets go through its own random permutation of the
    alphabet (``colluding=True``: one permutation shared by all, a coordinated flip).

    Args:
        task_config: a :class:`fedlora_lite.experiments.copy_task.CopyTaskConfig` (any frozen
            dataclass with ``contamination``, ``kinds`` and ``colluding`` fields).
        fraction: contaminated fraction in [0, 1).

    Returns:
        A copy of the configuration with ``kinds=("corrupted",)``.
    """
    if not dataclasses.is_dataclass(task_config) or not all(hasattr(task_config, a) for a in ("contamination", "kinds", "colluding")):
        raise TypeError(f"task_config must be a CopyTaskConfig, got {type(task_config).__name__}")
    return dataclasses.replace(task_config, contamination=check_fraction(fraction, "fraction"), kinds=("corrupted",),
                               colluding=bool(colluding))
