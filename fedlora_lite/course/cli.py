"""The ``fedlora-lite`` console command: run, refresh and list the notebook sequence.

Examples::

    fedlora-lite list
    fedlora-lite run --profile smoke
    fedlora-lite run --profile default --only 02 03 --out outputs/try -p seed 1
    fedlora-lite refresh --only 00
    fedlora-lite sweep run sweep.toml && fedlora-lite sweep collect outputs/sweep_02
    fedlora-lite editions --out outputs/editions
    fedlora-lite site --out outputs/site

Exit status: 0 on success, 1 when a notebook failed, 2 on a usage error (one line on
stderr, no traceback), 130 after Ctrl-C and 143 after SIGTERM (the line "interrupted";
the summary then describes what is on disk).
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
from collections.abc import Sequence
from typing import Any

from .reporting import PROFILES
from .notebooks import discover_notebooks
from .run_control import RunInterrupted
from .runner import RunReport, refresh_notebooks, run_notebooks

__all__ = ["main", "build_parser", "parse_value"]

_NAMED_LITERALS = {"none": None, "null": None, "true": True, "false": False}


def parse_value(text: str) -> Any:
    """Turn a ``-p NAME VALUE`` string into a Python value.

    ``None``/``null``, ``true``/``false`` (any case), ints, floats and Python literals
    (``[1, 2]``, ``"quoted"``) are converted; anything else stays a string, so
    ``-p device cpu`` gives ``"cpu"``.
    """
    low = text.strip().lower()
    if low in _NAMED_LITERALS:
        return _NAMED_LITERALS[low]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="NN",
        help="run only these notebooks (numbers like 02 or names like 02_linear_regression)",
    )
    p.add_argument(
        "--notebooks", metavar="DIR", help="folder of the notebook sequence (default: the checkout's notebooks/)"
    )
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing notebook")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--timeout", type=_positive_seconds, metavar="SECONDS",
                   help="per-cell execution timeout, rounded up to whole seconds (default: none)")


# --- usage errors: one line, exit 2 (hardening; keep these helpers separate) ---------------------


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2), not the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _positive_seconds(text: str) -> int | float:
    """``--timeout`` value: a positive int or float (fractions are rounded up by the runner)."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _interrupted(exc: KeyboardInterrupt) -> int:
    """Ctrl-C / SIGTERM: one line, and the shell's status for the signal."""
    print("fedlora-lite: interrupted", file=sys.stderr)
    return exc.exit_code if isinstance(exc, RunInterrupted) else 130


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = _OneLineParser(
        prog="fedlora-lite",
        description="Run the fedlora_lite notebook sequence (CLAIR: contamination-aware federated LoRA).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute the notebooks headlessly and summarise their key numbers")
    run.add_argument("--profile", choices=PROFILES, default="default", help="problem sizes (default: %(default)s)")
    run.add_argument("--out", metavar="DIR", help="output folder (default: outputs/<profile>)")
    run.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="papermill parameter for every notebook, e.g. -p seed 1 -p device cpu (repeatable)",
    )
    _add_common(run)

    refresh = sub.add_parser(
        "refresh", help="re-execute the source notebooks in place (default profile), strip metadata"
    )
    refresh.add_argument(
        "--out", metavar="DIR", help="folder for executed copies and summary (default: outputs/refresh)"
    )
    _add_common(refresh)

    lst = sub.add_parser("list", help="list the notebooks with their titles")
    lst.add_argument("--notebooks", metavar="DIR", help="folder of the notebook sequence")
    _add_course_parsers(sub)
    return parser


def _print_report(report: RunReport) -> None:
    print()
    width = max((len(r.name) for r in report.runs), default=8)
    for r in report.runs:
        print(f"  {r.name:<{width}}  {r.status:<7}  {r.wall_time_s:8.1f} s")
    if report.failed:
        print()
        print(report.format_failures(), file=sys.stderr)
    print()
    print(f"executed notebooks: {report.out_dir}")
    print(f"summary:            {report.summary_md}")
    print(f"                    {report.summary_csv}")
    if report.earlier:
        print(f"also in the summary, from earlier runs in this folder: {', '.join(report.earlier)}")
    n_bad = len(report.failed)
    if n_bad:
        print(f"{n_bad} notebook(s) failed", file=sys.stderr)
    else:
        print("all notebooks succeeded")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedlora-lite``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in _COURSE_COMMANDS:
        return _course_command(args)
    try:
        return _main(args)
    except KeyboardInterrupt as exc:
        return _interrupted(exc)


def _main(args: argparse.Namespace) -> int:
    try:
        if args.command == "list":
            notebooks = discover_notebooks(args.notebooks)
            if not notebooks:
                print("no notebooks found")
            for nb in notebooks:
                print(f"{nb.number}  {nb.name:<28}  {nb.title}")
            return 0
        common = dict(
            only=args.only,
            notebooks_dir=args.notebooks,
            fail_fast=args.fail_fast,
            progress=not args.no_progress,
            execution_timeout=args.timeout,
            out=args.out,
        )
        if args.command == "run":
            params: dict[str, Any] = {}
            for name, value in args.parameter:
                params[name] = parse_value(value)
            report = run_notebooks(args.profile, parameters=params, **common)
        else:
            report = refresh_notebooks(**common)
    except (ValueError, TypeError, OSError) as exc:  # usage errors: raised before any notebook runs
        print(f"fedlora-lite: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    _print_report(report)
    return report.exit_code


# ---- course publishing and batch commands: sweep, editions, site -------------------------

_COURSE_COMMANDS = ("sweep", "editions", "site")


def _add_course_parsers(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="run a parameter grid over one notebook (resumable) and aggregate it")
    sweep_sub = sweep.add_subparsers(dest="sweep_command", required=True)
    srun = sweep_sub.add_parser("run", help="execute the runs of a sweep file not finished yet")
    srun.add_argument("spec", metavar="SWEEP.toml", help="the sweep file (see fedlora_lite.course.sweep)")
    srun.add_argument("--workers", type=int, metavar="N", help="parallel worker processes (default: the file's)")
    srun.add_argument("--out", metavar="DIR", help="output folder (default: the file's 'out')")
    srun.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    scol = sweep_sub.add_parser("collect", help="aggregate finished runs: tidy CSV, mean and CI, plots")
    scol.add_argument("out", metavar="DIR", help="the sweep's output folder")
    scol.add_argument("--x", metavar="NAME", help="grid parameter on the x axis")
    scol.add_argument("--over", metavar="NAME", help="grid parameter the confidence band is over (default seed)")
    scol.add_argument("--metrics", nargs="+", metavar="KEY", help="dotted results.json keys (default: all numbers)")
    scol.add_argument("--level", type=float, default=0.95, help="confidence level (default: %(default)s)")

    ed = sub.add_parser("editions", help="write the student (solutions removed) and instructor editions")
    ed.add_argument("--out", metavar="DIR", required=True, help="output folder (student/ and instructor/ inside)")
    ed.add_argument("--notebooks", metavar="DIR", help="folder of the notebook sequence")
    ed.add_argument("--only", nargs="+", action="extend", metavar="NN", help="only these notebooks")
    ed.add_argument("--clear-outputs", action="store_true", help="student edition without outputs")

    site = sub.add_parser("site", help="build the static HTML course from the executed notebooks")
    site.add_argument("--out", metavar="DIR", required=True, help="output folder (index.html inside)")
    site.add_argument("--notebooks", metavar="DIR",
                      help="executed notebooks: the checkout's notebooks/ (default) or a run folder such as "
                           "outputs/default")
    site.add_argument("--student", action="store_true", help="publish the student edition (solutions removed)")


def _course_command(args: argparse.Namespace) -> int:
    """Run ``sweep``, ``editions`` or ``site``; exit status 0, 1 (a run failed) or 2 (usage error)."""
    try:
        if args.command == "sweep" and args.sweep_command == "run":
            from .sweep import load_sweep, run_sweep

            spec = load_sweep(args.spec, out=args.out, workers=args.workers)
            report = run_sweep(spec, progress=not args.no_progress)
            print(f"sweep {spec.notebook}: {report.total} runs, {len(report.ran)} ran, "
                  f"{len(report.skipped)} already finished, {len(report.failed)} failed "
                  f"({report.wall_time_s:.1f} s); results under {spec.out}")
            for run_id, error in report.failed.items():
                print(f"FAILED {run_id}\n{error}", file=sys.stderr)
            return report.exit_code
        if args.command == "sweep":
            from .sweep_collect import collect_sweep

            res = collect_sweep(args.out, x=args.x, over=args.over, metrics=args.metrics, level=args.level)
            print(f"{res.runs_done}/{res.runs_total} runs finished; x = {res.x}, band over {res.over}")
            print(f"tidy CSV:    {res.tidy_csv}\nsummary CSV: {res.summary_csv}\nfigure:      {res.figure}")
            return 0
        if args.command == "editions":
            from .editions import build_editions

            ed = build_editions(args.out, notebooks_dir=args.notebooks, only=args.only,
                                clear_outputs=args.clear_outputs)
            print(f"{len(ed.student)} notebooks, {sum(ed.solutions.values())} solution cell(s), "
                  f"{sum(ed.hints.values())} hint(s)")
            print(f"student edition:    {ed.out_dir / 'student'}\ninstructor edition: {ed.out_dir / 'instructor'}")
            return 0
        from .site import build_site

        built = build_site(args.out, notebooks_dir=args.notebooks, student=args.student)
        print(f"{len(built.pages)} pages in {built.wall_time_s:.1f} s; open {built.index}")
        return 0
    except (ValueError, FileNotFoundError) as exc:
        print(f"fedlora-lite: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
