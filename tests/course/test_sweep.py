"""Sweeps: a grid from TOML through the runner, resumable after an interruption, aggregated with CIs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedlora_lite.course import cli
from fedlora_lite.course.sweep import load_sweep, run_sweep, sweep_runs
from fedlora_lite.course.sweep_collect import collect_sweep, mean_ci

BODY = '''import json
with open({log!r}, "a") as fh:   # one line per execution, so the test can count them
    fh.write(json.dumps({{"seed": seed, "scale": scale}}) + "\\n")
from fedlora_lite.course.reporting import save_results
save_results({{"value": 2 * scale + 0.1 * seed, "check": {{"ok": seed % 2 == 0, "label": "x"}}}}, output_dir,
             notebook="00_tiny")'''

SPEC = '''notebook = "00"
notebooks = "notebooks"
profile = "smoke"
out = "sweep_out"
workers = 1

[grid]
seed = [0, 1, 2, 3]
scale = [1, 2]

[parameters]
device = "cpu"

[collect]
x = "scale"
'''


def _executions(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [(d["seed"], d["scale"]) for d in map(json.loads, log.read_text().splitlines())]


@pytest.fixture
def sweep_file(make_notebook, tmp_path):
    log = tmp_path / "executions.log"
    make_notebook("00_tiny", [BODY.format(log=str(log))])
    path = tmp_path / "sweep.toml"
    path.write_text(SPEC)
    return path, log


class Interrupt(KeyboardInterrupt):
    """Raised by the progress callback after k runs, as a Ctrl-C would be."""


def test_sweep_resumes_after_an_interruption_without_redoing_finished_runs(sweep_file, tmp_path):
    path, log = sweep_file
    spec = load_sweep(path)
    runs = sweep_runs(spec)
    assert len(runs) == 8 and len({r.run_id for r in runs}) == 8
    assert runs[1].parameters == {"device": "cpu", "seed": 0, "scale": 2}  # last axis fastest

    done = []

    def stop_after_three(run_id, ok):
        done.append(run_id)
        if len(done) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_sweep(spec, progress=False, on_run_done=stop_after_three)
    assert len(_executions(log)) == 3
    # the fourth run was killed after its notebook wrote results.json but before the sweep marked it
    half = spec.out / "runs" / runs[3].run_id / "00_tiny"
    half.mkdir(parents=True)
    (half / "results.json").write_text(json.dumps({"notebook": "00_tiny", "format_version": 1, "results": {}}))

    report = run_sweep(spec, workers=2, progress=False)  # resume, in two worker processes
    assert report.ok and sorted(report.skipped) == sorted(done) and len(report.ran) == 5
    executions = _executions(log)
    assert len(executions) == 8 and sorted(executions) == sorted((s, c) for s in range(4) for c in (1, 2))
    marked = json.loads((half / "results.json").read_text())
    assert marked["sweep"]["parameters"] == runs[3].parameters and marked["results"]["value"] == 2 * 2 + 0.1

    # everything finished: the CLI reruns nothing, then aggregates
    assert cli.main(["sweep", "run", str(path), "--no-progress"]) == 0
    assert len(_executions(log)) == 8
    assert cli.main(["sweep", "collect", str(spec.out)]) == 0

    with open(spec.out / "sweep_tidy.csv") as fh:
        tidy = list(csv.DictReader(fh))
    assert len(tidy) == 16 and set(tidy[0]) == {"run_id", "seed", "scale", "metric", "value"}
    assert {r["metric"] for r in tidy} == {"value", "check.ok"}  # the string is left out, the bool is 0/1
    with open(spec.out / "sweep_summary.csv") as fh:
        summary = {(r["metric"], r["scale"]): r for r in csv.DictReader(fh)}
    row = summary[("value", "2")]
    mean, std, lo, hi = mean_ci([4.0, 4.1, 4.2, 4.3])
    assert int(row["n"]) == 4 and float(row["mean"]) == pytest.approx(4.15)
    assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((lo, hi))
    assert float(summary[("check.ok", "1")]["mean"]) == pytest.approx(0.5)  # seeds 0 and 2 of 4
    assert (spec.out / "sweep.png").stat().st_size > 1000


def test_changing_fixed_parameters_gives_new_runs(sweep_file, tmp_path):
    path, _ = sweep_file
    a = sweep_runs(load_sweep(path))
    path.write_text(SPEC.replace('device = "cpu"', 'device = "auto"'))
    b = sweep_runs(load_sweep(path))
    assert not {r.run_id for r in a} & {r.run_id for r in b}


def test_mean_ci_matches_the_t_interval():
    mean, std, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert (mean, std) == pytest.approx((2.0, 1.0))
    assert hi - mean == pytest.approx(4.302653 / 3**0.5, rel=1e-6)  # t(0.975, 2) * s / sqrt(n)
    assert mean_ci([5.0]) == (5.0, 0.0, 5.0, 5.0)
    with pytest.raises(ValueError):
        mean_ci([])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.replace("[grid]", "colour = 1\n[grid]"), "unknown keys"),
        (lambda s: s.replace("scale = [1, 2]", "scale = []"), "non-empty list"),
        (lambda s: s.replace("scale = [1, 2]", "scale = [1, 1]"), "repeats"),
        (lambda s: s.replace("scale = [1, 2]", "sigma = [1, 2]"), "not a parameter of 00_tiny"),
        (lambda s: s.replace("scale = [1, 2]", "output_dir = ['a']"), "set by the sweep"),
        (lambda s: s.replace('device = "cpu"', "seed = 3"), "both"),
        (lambda s: s.replace('profile = "smoke"', 'profile = "huge"'), "profile"),
        (lambda s: s.replace("workers = 1", "workers = 0"), "workers"),
        (lambda s: s.replace('notebook = "00"', 'notebook = "07"'), "matches no notebook"),
        (lambda s: s.replace("[grid]", "[grid"), "TOML"),
    ],
)
def test_bad_sweep_files_are_refused(sweep_file, edit, match):
    path, _ = sweep_file
    path.write_text(edit(SPEC))
    with pytest.raises(ValueError, match=match):
        load_sweep(path)


def test_a_failing_run_is_reported_and_redone_next_time(make_notebook, tmp_path):
    make_notebook("00_fails", ["assert seed != 1, 'seed 1 breaks'",
                               "from fedlora_lite.course.reporting import save_results\n"
                               "save_results({'v': seed}, output_dir, notebook='00_fails')"])
    path = tmp_path / "s.toml"
    path.write_text('notebook = "00_fails"\nnotebooks = "notebooks"\nout = "o"\n[grid]\nseed = [0, 1]\n')
    spec = load_sweep(path)
    report = run_sweep(spec, progress=False)
    assert report.exit_code == 1 and len(report.ran) == 1 and len(report.failed) == 1
    (failed_id, error), = report.failed.items()
    assert "seed 1 breaks" in error and (spec.out / "runs" / failed_id / "failed.json").is_file()
    again = run_sweep(spec, progress=False)
    assert again.skipped == report.ran and list(again.failed) == [failed_id]
    with pytest.raises(ValueError, match="metrics"):
        collect_sweep(spec.out, metrics=["nope"])
    assert collect_sweep(spec.out, plot=False).runs_done == 1


def test_the_readme_sweep_file_is_valid(tmp_path):
    """The README's example sweep file loads against the real notebook 02 (its names are parameters)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = "# sweep.toml" + readme.split("# sweep.toml", 1)[1].split("```", 1)[0]
    path = tmp_path / "sweep.toml"
    path.write_text(block)
    spec = load_sweep(path)
    assert spec.notebook == "02_linear_regression" and len(sweep_runs(spec)) == 9
    assert spec.out == (tmp_path / "outputs" / "sweep_02").resolve()
