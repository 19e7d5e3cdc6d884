"""Factored vs dense CLAIR on the same LoRA federation: speed-up and "same answer".

Default instance (issue 4's bar): d = p = 1024, K = 32 clients, LoRA rank r = 8, 25%
contaminated clients, float32. The dense path stacks the K products B_k A_k into a
1024 x 32768 matrix and runs :func:`fedlora_lite.clair.clair`; the factored path runs
:func:`fedlora_lite.clair.clair_factored` on the factors (one thin QR, then a 256 x 256
problem). Both get the same randomized-SVT rank hint (r), so the comparison is between
the two problem sizes, not between SVD algorithms.

Usage::

    python benchmarks/factored_vs_dense.py --threads 1
    python benchmarks/factored_vs_dense.py --d 512 --K 16 --dtype float64   # quicker, exact agreement

Printed: wall time of each path (the dense time includes forming the products), their
ratio (bar: >= 20x), and the agreement: identical flags, objective relative difference,
subspace distance ||P_dense - P_factored||_F, refined-update relative difference.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from fedlora_lite.clair import clair
from fedlora_lite.clair import clair_factored
from fedlora_lite.federated import random_lora_factors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=1024, help="d = p")
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    d, K, r = args.d, args.K, args.r
    inst = random_lora_factors(d, d, K, r, shared_rank=4, contamination=0.25, heterogeneity=0.05,
                               generator=torch.Generator().manual_seed(args.seed), dtype=dtype)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}: d=p={d}, K={K}, r={r} "
          f"(dense stack {d} x {K * d} = {d * K * d * dtype.itemsize / 2**30:.2f} GiB per copy)")

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    fac = clair_factored(inst.factors, return_dense=False)
    t_fac = time.perf_counter() - t0
    print(f"factored: {t_fac:8.2f} s  (reduced problem {fac.reduction.q} x {sum(fac.reduction.block_sizes)}, "
          f"{fac.decomposition.iterations} iterations, converged={fac.decomposition.converged})", flush=True)

    t0 = time.perf_counter()
    updates = torch.stack([B @ A for B, A in inst.factors])
    dense = clair(updates, svd_rank_hint=r)
    t_dense = time.perf_counter() - t0
    print(f"dense:    {t_dense:8.2f} s  ({dense.decomposition.iterations} iterations, "
          f"converged={dense.decomposition.converged})")

    refined_fac = fac.refined_factors.dense()
    obj_rel = abs(fac.decomposition.objective - dense.decomposition.objective) / abs(dense.decomposition.objective)
    sub = float(torch.linalg.norm(fac.subspace @ fac.subspace.T - dense.subspace @ dense.subspace.T))
    ref_rel = float(torch.linalg.norm(refined_fac - dense.refined_updates) / torch.linalg.norm(dense.refined_updates))
    same_flags = fac.flags.tolist() == dense.flags.tolist()
    truth = fac.flags.tolist() == (~inst.benign).tolist()
    tol = 1e-4 if dtype == torch.float32 else 1e-6
    same = same_flags and obj_rel <= tol and ref_rel <= tol and fac.rank == dense.rank
    print(f"agreement: flags identical={same_flags} (= planted set: {truth}), rank {fac.rank} vs {dense.rank}, "
          f"lam {fac.lam:.6f} vs {dense.lam:.6f}")
    print(f"           objective rel. diff {obj_rel:.1e}, subspace ||dP||_F {sub:.1e}, refined rel. diff {ref_rel:.1e} "
          f"(tolerance {tol:g})")
    print(f"peak RSS of this process (dense path included): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    ratio = t_dense / t_fac
    print(f"bar: factored >= 20x faster with the same answer -> x{ratio:,.0f}, same answer={same} "
          f"[{'PASS' if ratio >= 20 and same else 'FAIL'}]")


if __name__ == "__main__":
    main()
