"""``python -m fedlora_lite.flower``: simulate, deploy locally, or write the Flower app folder.

Examples::

    python -m fedlora_lite.flower simulate --nodes 10 --rounds 5 --methods fedavg,median,detect_average,clair \\
        --out outputs/flower_sim
    python -m fedlora_lite.flower deploy --nodes 3 --rounds 2 --methods clair --out outputs/flower_deploy
    python -m fedlora_lite.flower app --out my_flower_app      # then: flwr run my_flower_app <connection>

``deploy`` starts a SuperLink and the SuperNodes as local processes (insecure mode), runs
the app with ``flwr run``, prints the per-round table and stops every process, also on
Ctrl-C or an error. Every other setting is a run-config key: ``--set key=value`` (repeatable;
the keys of :meth:`fedlora_lite.flower.FlowerRunConfig.to_run_config`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .config import FlowerRunConfig

__all__ = ["main"]


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _config(args: argparse.Namespace) -> FlowerRunConfig:
    rc: dict[str, object] = {}
    if args.nodes is not None:
        rc["num-nodes"] = args.nodes
    if args.rounds is not None:
        rc["num-server-rounds"] = args.rounds
    if args.methods is not None:
        rc["methods"] = args.methods
    for item in args.set or []:
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        rc[key] = _value(val)
    rc["output-dir"] = str(args.out) if args.command != "deploy" else str(args.out) + "/results"
    try:
        return FlowerRunConfig.from_run_config(rc)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlora_lite.flower", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("simulate", "run on Flower's simulation engine (Ray)"),
                       ("deploy", "run on a local SuperLink + SuperNodes (separate processes)"),
                       ("app", "write the Flower app folder (pyproject.toml) for `flwr run`")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--out", required=True, help="output folder (results, checkpoints, logs; the app for `app`)")
        p.add_argument("--nodes", type=int, help="number of nodes K (default 10)")
        p.add_argument("--rounds", type=int, help="rounds R per method (default 5)")
        p.add_argument("--methods", help="comma-separated strategies (default clair)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any run-config key (repeatable)")
        if name == "deploy":
            p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    cfg = _config(args)
    if args.command == "app":
        from .deploy import write_app

        from pathlib import Path

        path = write_app(args.out, cfg.replace(output_dir=str(Path(args.out).resolve() / "results")))
        print(f"wrote {path / 'pyproject.toml'}; run it with: flwr run {path} <superlink connection> --stream")
        return 0
    if args.command == "simulate":
        from .simulation import run_flower_simulation

        result = run_flower_simulation(cfg)
        print(f"simulation: {cfg.num_nodes} nodes, {result.data['wall_seconds']:.0f} s")
    else:
        from .deploy import run_deployment

        run = run_deployment(cfg, args.out, timeout=args.timeout)
        for line in run.processes + [run.command_line]:
            print("$", line)
        print(f"deployment: {cfg.num_nodes} SuperNodes, flwr run took {run.seconds:.0f} s; every process stopped")
        result = run.result
    print("\nbenign-node held-out token accuracy per round:")
    print(result.format_accuracy_table())
    print("\nbytes (Flower's record counts):")
    print(result.format_bytes_table())
    print(f"\nresults: {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
