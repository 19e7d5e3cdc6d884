"""Per-round server cost of every aggregator on LLM-shaped LoRA factors, as ratios to CLAIR, from one run.

    python benchmarks/server_cost.py --threads 1                 # d = p = 4096, K = 100, r = 16, float32
    python benchmarks/server_cost.py --threads 1 --d 1024 --K 32 # a quicker check

One module, K clients with LoRA factors B_k (d x r), A_k (r x p) (20% contaminated,
:func:`fedlora_lite.federated.random_lora_factors`). Three families are timed on the same
factors, each the way a server would run it:

* CLAIR on the factors (the exact factored path, default options); its download is the
  refined factors (client k: its own r_k columns plus the shared off-subspace pair);
* the LoRA-aware rules of :func:`fedlora_lite.federated.aggregate_lora` (residual check off:
  only the served factors are computed). FedEx-LoRA forms the d x p residual, i.e. the
  dense product of the stacked factors, which is also what FLoRA's clients and a naive
  FlexLoRA would form; it is timed on its own as "dense sum_k B_k A_k";
* the dense robust rules of :func:`fedlora_lite.federated.aggregate` on the clients' LoRA
  *parameters* [vec(B_k), vec(A_k)] (K vectors of r (d + p) numbers), which is how Flower's
  and ByzFL's strategies aggregate a LoRA model. Their per-client dense products would be
  K d p floats (6.7 GB at the default size), so they are not run on Delta W.

Each time is the best of ``--repeats`` wall-clock runs; the machine's load is printed
with them (on a shared 2-core machine every timing is noisy by +-30%).
"""

from __future__ import annotations

import argparse
import os

import torch

from solver_vs_cvxpy import best_time  # best-of-n wall clock, shared with the other benchmark (same folder)

from fedlora_lite.clair import clair
from fedlora_lite.federated import aggregate, aggregate_lora, available_lora_aggregators, random_lora_factors

ROBUST = ["fedavg", "median", "trimmed_mean", "geometric_median", "krum", "multi_krum", "bulyan", "centered_clipping",
          "adaptive_clipped_mean", "mda", "nnm+trimmed_mean"]


def _m(floats: int) -> str:
    """A float count with three significant digits and a k/M/G suffix (Fed-SB's K r^2 is tiny, FLoRA's download huge)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if floats >= size:
            return f"{floats / size:.3g}{unit}"
    return str(floats)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=4096, help="rows = columns of the module (d = p)")
    ap.add_argument("--K", type=int, default=100, help="clients")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank of every client")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per aggregator")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    d = p = args.d
    K, r = args.K, args.r
    print(f"server cost per round: d = p = {d}, K = {K}, r = {r}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    inst = random_lora_factors(d, p, K, r, shared_rank=8, contamination=0.2, heterogeneity=0.05,
                               generator=torch.Generator().manual_seed(0), dtype=dtype)
    pairs = inst.factors
    rows = []
    res, t_clair = best_time(lambda: clair(pairs), args.repeats)
    widths = res.refined_factors.ranks
    rows.append(("clair (factored, default options)", t_clair,
                 f"rank {res.rank}, flagged {int(res.flags.sum())}; up {_m(K * r * (d + p))} / down "
                 f"{_m(sum(widths) * (d + p))} floats, rank growth {max(widths) / r:.0f}x"))

    Bs = torch.cat([B / K for B, _ in pairs], dim=1)
    As = torch.cat([A for _, A in pairs], dim=0)
    _, t_dense = best_time(lambda: Bs @ As, args.repeats)
    rows.append(("dense sum_k B_k A_k (d x p product)", t_dense, f"{d}x{p} from width {K * r}"))
    for name in available_lora_aggregators():
        if name == "ffa_lora":  # needs one shared frozen A: same arithmetic as FedIT's B-average
            A0 = pairs[0][1]
            inputs = [(B, A0) for B, _ in pairs]
        elif name == "fed_sb":  # K r x r matrices between one fixed B and A
            B0, A0 = pairs[0]
            inputs = [(B0, torch.randn(r, r, generator=torch.Generator().manual_seed(k), dtype=dtype), A0) for k in range(K)]
        else:
            inputs = pairs
        out, t = best_time(lambda: aggregate_lora(name, inputs, compute_residual=False), args.repeats)
        rows.append((f"lora: {name}", t, f"up {_m(out.upload_floats)} / down {_m(out.download_floats)} floats, "
                                         f"rank growth {out.rank_growth:.0f}x"))

    params = torch.stack([torch.cat([B.reshape(-1), A.reshape(-1)]) for B, A in pairs]).unsqueeze(1)  # (K, 1, r(d+p))
    f = K // 5
    opts = {"krum": {"f": f}, "multi_krum": {"f": f}, "bulyan": {"f": min(f, (K - 3) // 4)}, "mda": {"f": 2},
            "nnm+trimmed_mean": {"f": f, "trim": f / K}, "trimmed_mean": {"trim": f / K}}
    for name in ROBUST:
        _, t = best_time(lambda: aggregate(name, params, **opts.get(name, {})), args.repeats)
        note = {"mda": "f = 2 only: MDA scans C(K, f) subsets"}.get(name, f"on K x {params.shape[-1]} parameters")
        rows.append((f"dense rule: {name}", t, note))

    print(f"\n{'aggregator':<40} {'seconds':>9} {'/ CLAIR':>9}   notes")
    for name, t, note in rows:
        print(f"{name:<40} {t:>9.3f} {t / t_clair:>9.3f}   {note}")
    print(f"\nload average after the run: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
