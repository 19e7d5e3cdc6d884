"""Calibrate the guard of CLAIR's data-driven flag rule on seeds disjoint from every reported result.

``threshold="auto"`` (``fedlora_lite/clair/detect.py``) accepts its stable split only if the
flagged clients' median leave-one-out residual is at least ``guard`` times the core's. This
script measures that ratio on the copy task's three regimes (homogeneous, heterogeneous,
colluding), contamination 0-50%, on calibration seeds 100-102 (the notebooks and tests use
seeds 0-9), and picks the guard that misclassifies the fewest clients (ties: the smallest
guard). Its output is quoted in ``docs/CLAIR.md`` and in notebook 05.

    python benchmarks/calibrate_guard.py                 # ~3 minutes on 2 CPU cores
    python benchmarks/calibrate_guard.py --seeds 100 101 102 --out benchmarks/results/guard.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedlora_lite import clair_modules
from fedlora_lite.core import make_generator
from fedlora_lite.experiments.copy_task import CopyTaskConfig, LocalTrainingConfig, load_base, make_client_pool, train_local_adapters

REGIMES = {"homogeneous": {}, "heterogeneous": {"num_private": 4}, "colluding": {"colluding": True}}
FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
GUARDS = [round(1.0 + 0.05 * i, 2) for i in range(21)]


def measure(seeds: list[int], cache: Path) -> list[dict]:
    """One row per (regime, seed, fraction): truth, the split the rule found before its guard, the ratio."""
    torch.set_num_threads(1)
    base, tok, _ = load_base()
    rows = []
    for regime, extra in REGIMES.items():
        task = CopyTaskConfig(num_clients=10, contamination=0.3, kinds=("corrupted", "conflicting"),
                              letters="abcdefghijklmnop", num_shared=6, focus_size=6, focus_mass=0.2, train_size=(2, 5),
                              eval_size=1, length=(8, 16), **extra)
        for seed in seeds:
            pool = make_client_pool(task, 10, 5, make_generator(seed))
            local = train_local_adapters(base, tok, pool.clients, LocalTrainingConfig(), seed=seed,
                                         cache_dir=cache / f"{regime}_{seed}")
            ben = [i for i, c in enumerate(pool.clients) if c.benign]
            con = [i for i, c in enumerate(pool.clients) if not c.benign]
            for f in FRACTIONS:
                n_c = min(int(f * 10 + 0.5), 9)
                idx = ben[: 10 - n_c] + con[:n_c]
                names = local.adapters[0].module_names
                res = clair_modules({n: [local.adapters[i].factors[n] for i in idx] for n in names}, guard=1.0)
                rep = res.detection
                rows.append({"regime": regime, "seed": seed, "fraction": f,
                             "truth": [not pool.clients[i].benign for i in idx],
                             "split": res.flags.tolist(), "ratio": rep.ratio})
    return rows


def errors(rows: list[dict], guard: float) -> tuple[int, int]:
    """(false positives, false negatives) over all rows if the split is accepted at ratio >= guard."""
    fp = fn = 0
    for r in rows:
        flags = r["split"] if r["ratio"] >= guard else [False] * len(r["split"])
        fp += sum(f and not t for f, t in zip(flags, r["truth"]))
        fn += sum(t and not f for f, t in zip(flags, r["truth"]))
    return fp, fn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/results/calibration_adapters"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/guard.json"))
    args = ap.parse_args(argv)
    if min(args.seeds) < 10:
        ap.error("calibration seeds must be disjoint from the reported seeds 0-9")
    t0 = time.perf_counter()
    rows = measure(args.seeds, args.cache)
    table = [(g, *errors(rows, g)) for g in GUARDS]
    best = min(table, key=lambda t: (t[1] + t[2], t[0]))
    print(f"calibration seeds {args.seeds}, {len(rows)} federations, {time.perf_counter() - t0:.0f} s")
    print("ratio without contamination:", sorted(round(r["ratio"], 2) for r in rows if not any(r["truth"])))
    print("ratio with contamination:   ", sorted(round(r["ratio"], 2) for r in rows if any(r["truth"])))
    print(f"{'guard':>6} {'FP':>4} {'FN':>4}")
    for g, fp, fn in table:
        print(f"{g:>6.2f} {fp:>4d} {fn:>4d}{'  <- chosen' if g == best[0] else ''}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "guard": best[0], "table": table, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
