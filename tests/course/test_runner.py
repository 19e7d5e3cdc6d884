"""Runner and CLI tests on tiny notebooks generated in tmp_path (each kernel start ~1-3 s)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nbformat
import pytest

from fedlora_lite.course import cli
from fedlora_lite.course.notebooks import discover_notebooks, strip_notebook_metadata
from fedlora_lite.course.run_control import check_timeout
from fedlora_lite.course.runner import pinned_python_kernel, refresh_notebooks, run_notebooks
from tests.conftest import SAVE_CELL


def test_discover_orders_filters_and_reads_titles(make_notebook, tmp_path):
    make_notebook("10_last", title="Last one")
    make_notebook("02_second", title="Second")
    make_notebook("00_first", title="First: overview")
    (tmp_path / "notebooks" / "scratch.ipynb").write_text("{}")  # not part of the sequence
    root = tmp_path / "notebooks"
    found = discover_notebooks(root)
    assert [nb.name for nb in found] == ["00_first", "02_second", "10_last"]
    assert [nb.title for nb in found] == ["First: overview", "Second", "Last one"]
    assert [nb.name for nb in discover_notebooks(root, only=["10", 2, "00_first.ipynb"])] == [
        "00_first",
        "02_second",
        "10_last",
    ]
    with pytest.raises(ValueError, match="only"):
        discover_notebooks(root, only=["07"])


def test_run_reports_success_failure_and_missing_results(make_notebook, tmp_path):
    make_notebook("00_ok")
    make_notebook("01_broken", ["x = 1", "def f():\n    raise ValueError('boom')\nf()", "print('never')"])
    make_notebook("02_silent", ["print('no save_results here')"])
    make_notebook("03_ok")
    out = tmp_path / "run"
    report = run_notebooks(
        "smoke", out=out, parameters={"scale": 3}, progress=False, notebooks_dir=tmp_path / "notebooks"
    )

    assert [r.status for r in report.runs] == ["ok", "failed", "failed", "ok"]  # a failure does not stop the run
    assert report.exit_code == 1 and not report.ok
    ok = report.runs[0]
    assert ok.results["value"] == pytest.approx(3.0)  # smoke factor 1.0 x injected scale 3
    assert ok.results["nested"] == {"seed": 0}
    assert ok.results["executable"] == sys.executable  # the kernel is this interpreter
    assert (out / "00_ok.ipynb").is_file() and (out / "00_ok" / "results.json").is_file()
    executed = nbformat.read(out / "00_ok.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "profile = \"smoke\"" in injected[0].source
    assert str(out / "00_ok") in injected[0].source

    err = report.runs[1].error
    assert err.ename == "ValueError" and err.evalue == "boom"
    assert "raise ValueError('boom')" in err.source and err.execution_count is not None
    assert report.runs[2].error.ename == "MissingResults"
    text = report.format_failures()
    assert "01_broken" in text and "boom" in text and "02_silent" in text

    md = report.summary_md.read_text()
    assert "| 00_ok | ok |" in md and "| 01_broken | failed |" in md and "| 03_ok | value | 3 |" in md
    with report.summary_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert {"notebook", "key", "value", "status", "wall_time_s"} <= set(rows[0])
    values = {(r["notebook"], r["key"]): r for r in rows}
    assert values[("03_ok", "value")]["value"] == "3.0"
    assert values[("01_broken", "")]["status"] == "failed"
    assert float(values[("00_ok", "value")]["wall_time_s"]) > 0


def test_fail_fast_skips_the_rest_and_bad_arguments_raise(make_notebook, tmp_path):
    make_notebook("00_broken", ["1 / 0"])
    make_notebook("01_ok")
    root = tmp_path / "notebooks"
    report = run_notebooks("default", out=tmp_path / "o", fail_fast=True, progress=False, notebooks_dir=root)
    assert [r.status for r in report.runs] == ["failed", "skipped"]
    assert report.runs[0].error.ename == "ZeroDivisionError"
    with pytest.raises(ValueError, match="profile"):
        run_notebooks("huge", notebooks_dir=root)
    with pytest.raises(ValueError, match="output_dir"):
        run_notebooks("smoke", parameters={"output_dir": "x"}, notebooks_dir=root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no NN_topic.ipynb notebooks"):
        run_notebooks("smoke", notebooks_dir=empty)


def test_kernel_is_pinned_even_with_a_foreign_python3_kernelspec(make_notebook, tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    foreign = tmp_path / "jupyter" / "kernels" / "python3"
    foreign.mkdir(parents=True)
    argv = ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "language": "python"}
    (foreign / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == "/nonexistent/python"
    with pinned_python_kernel():
        pinned = KernelSpecManager().get_kernel_spec("python3")
        assert pinned.argv[0] == sys.executable
        assert pinned.env == {"OMP_WAIT_POLICY": "PASSIVE", "FEDLORA_LITE_WIDGETS": "static"}  # no widget front end
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == "/nonexistent/python"  # restored

    make_notebook("00_ok")
    report = run_notebooks("smoke", out=tmp_path / "o", progress=False, notebooks_dir=tmp_path / "notebooks")
    assert report.ok, report.format_failures()
    assert report.runs[0].results["executable"] == sys.executable


def test_strip_notebook_metadata_removes_noise_keeps_tags_and_outputs(notebook_builder):
    nb = notebook_builder("T", ["print(1)"])
    nb.metadata["papermill"] = {"duration": 1.0}
    nb.metadata["widgets"] = {"state": {}}
    nb.metadata["kernelspec"] = {"name": "fancy", "display_name": "x", "language": "python"}
    code = nb.cells[2]
    code.metadata.update({"papermill": {"status": "completed"}, "execution": {"iopub.status.idle": "t"}, "tags": []})
    code.outputs = [
        nbformat.v4.new_output(
            "display_data",
            data={"text/plain": "100%|##| 2/2", "application/vnd.jupyter.widget-view+json": {"model_id": "abc"}},
        ),
        nbformat.v4.new_output("stream", name="stdout", text="1\n"),
        nbformat.v4.new_output("stream", name="stdout", text="2\n"),
        nbformat.v4.new_output("stream", name="stderr", text="warn\n"),
    ]
    code.execution_count = 7
    injected = nbformat.v4.new_code_cell("profile = 'smoke'")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(2, injected)

    clean = strip_notebook_metadata(nb)
    assert "papermill" not in clean.metadata and "widgets" not in clean.metadata
    assert clean.metadata.kernelspec.name == "python3"
    assert len(clean.cells) == 3  # injected cell dropped
    assert clean.cells[1].metadata["tags"] == ["parameters"]
    cell = clean.cells[2]
    assert dict(cell.metadata) == {}
    assert cell.execution_count == 7 and len(cell.outputs) == 3
    assert set(cell.outputs[0].data) == {"text/plain"}
    assert cell.outputs[1].text == "1\n2\n" and cell.outputs[2].name == "stderr"  # stdout chunks merged
    assert "papermill" in nb.metadata and len(nb.cells) == 4  # input not modified
    nbformat.validate(clean)


def test_refresh_rewrites_source_in_place_only_on_success(make_notebook, tmp_path):
    path = make_notebook("00_ok")
    root = tmp_path / "notebooks"
    report = refresh_notebooks(notebooks_dir=root, out=tmp_path / "refresh", progress=False)
    assert report.ok, report.format_failures()
    nb = nbformat.read(path, as_version=4)
    assert "papermill" not in nb.metadata
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert all("execution" not in c.metadata and "papermill" not in c.metadata for c in nb.cells)
    assert "value 2.0" in nb.cells[2].outputs[0].text  # default profile, scale 1
    assert report.runs[0].results["value"] == 2.0
    assert (tmp_path / "outputs" / "tiny" / "results.json").is_file()  # the notebook's own output_dir

    broken = make_notebook("01_broken", ["raise RuntimeError('nope')"])
    before = broken.read_text()
    report = refresh_notebooks(only=["01"], notebooks_dir=root, out=tmp_path / "refresh", progress=False)
    assert report.runs[0].status == "failed" and report.runs[0].error.ename == "RuntimeError"
    assert broken.read_text() == before

    make_notebook("02_smoke_default", profile="smoke")
    with pytest.raises(ValueError, match="profile"):
        refresh_notebooks(only=["02"], notebooks_dir=root, progress=False)


def test_cli_run_list_and_exit_codes(make_notebook, tmp_path, capsys):
    make_notebook("00_ok", title="Overview")
    make_notebook("01_broken", ["import math", "math.sqrt(-1)"])
    root = str(tmp_path / "notebooks")
    assert cli.main(["list", "--notebooks", root]) == 0
    assert "00  00_ok" in capsys.readouterr().out

    code = cli.main(
        ["run", "--profile", "smoke", "--notebooks", root, "--out", str(tmp_path / "o"), "--no-progress",
         "-p", "scale", "5", "-p", "device", "cpu"]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "ValueError: math domain error" in captured.err and "math.sqrt(-1)" in captured.err
    assert "In [" in captured.err
    assert json.loads((tmp_path / "o" / "00_ok" / "results.json").read_text())["results"]["value"] == 5.0

    assert cli.main(["run", "--only", "00", "--notebooks", root, "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    assert cli.main(["run", "--only", "42", "--notebooks", root]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--profile", "huge"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", 1), ("0.5", 0.5), ("None", None), ("null", None), ("True", True), ("false", False),
     ("cpu", "cpu"), ("[1, 2]", [1, 2]), ("'quoted'", "quoted"), ("1e-3", 1e-3)],
)
def test_parse_value(text, expected):
    assert cli.parse_value(text) == expected


# --- usage errors, notebook-level problems, atomic files, interrupts (issue 9), --only and -p (issue 12) ------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _unwritable(tmp_path):
    """A folder this process cannot create (root ignores permission bits, but not /sys)."""
    if os.path.isdir("/sys") and os.geteuid() == 0:
        return "/sys/fedlora-lite-test-out"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return str(locked / "out")


def test_bad_out_folders_are_usage_errors_with_one_line(make_notebook, tmp_path, capsys):
    make_notebook("00_ok")
    root = str(tmp_path / "notebooks")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    summary_dir = tmp_path / "taken"
    (summary_dir / "summary.md").mkdir(parents=True)
    cases = {
        str(a_file): "exists and is not a folder",
        str(a_file / "sub"): "cannot create the folder",
        _unwritable(tmp_path): "cannot",
        str(summary_dir): "summary.md is a folder",
    }
    for out, message in cases.items():
        assert cli.main(["run", "--notebooks", root, "--out", out, "--no-progress"]) == 2, out
        line = _one_line_error(capsys)
        assert line.startswith("fedlora-lite: error: out: ") and message in line, line
    assert not list(summary_dir.glob("*.ipynb"))  # nothing ran


def test_timeout_is_validated_and_fractions_are_rounded_up(make_notebook, tmp_path, capsys):
    make_notebook("00_slow", ["import time\ntime.sleep(4)"])
    root = str(tmp_path / "notebooks")
    for bad in ("-5", "0", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["run", "--notebooks", root, "--timeout", bad])
        assert exc.value.code == 2
        assert "--timeout" in _one_line_error(capsys)
    assert check_timeout(30.5) == 31 and check_timeout(2) == 2 and check_timeout(None) is None
    with pytest.raises(TypeError, match="execution_timeout must be a number"):
        run_notebooks("smoke", notebooks_dir=root, execution_timeout=True)
    with pytest.raises(ValueError, match="execution_timeout must be a positive number"):
        run_notebooks("smoke", notebooks_dir=root, execution_timeout=-5)
    # 1.5 s reaches nbclient as 2 s (an int trait): the 4 s cell times out instead of a traitlets error
    assert cli.main(["run", "--notebooks", root, "--out", str(tmp_path / "o"), "--no-progress", "--timeout", "1.5"]) == 1
    err = capsys.readouterr().err
    assert "Timeout" in err and "2 seconds" in err and "TraitError" not in err, err


def test_mistyped_parameter_is_an_error_listing_the_parameters(make_notebook, tmp_path, capsys):
    make_notebook("00_ok")
    make_notebook("01_other", ["seed = 3"])
    out = tmp_path / "o"
    code = cli.main(["run", "--notebooks", str(tmp_path / "notebooks"), "--out", str(out), "-p", "sede", "1"])
    assert code == 2
    line = _one_line_error(capsys)
    assert "unknown parameter name" in line and "00_ok has no parameter sede" in line
    assert "its parameters: seed, device, profile, output_dir, scale" in line
    assert not out.exists() or not list(out.iterdir())  # checked before anything ran


def test_notebook_level_output_problems_fail_that_notebook_and_keep_the_summary(make_notebook, tmp_path):
    for name in ("00_ok", "01_ok", "02_ok"):
        make_notebook(name)
    out = tmp_path / "o"
    out.mkdir()
    (out / "00_ok").write_text("a file where the notebook's output folder goes")
    (out / "01_ok.ipynb").mkdir()  # a folder where the executed copy goes
    report = run_notebooks("smoke", out=out, progress=False, notebooks_dir=tmp_path / "notebooks")
    assert [r.status for r in report.runs] == ["failed", "failed", "ok"]
    assert report.runs[0].error.ename == "OutputError" and "00_ok" in report.runs[0].error.evalue
    assert report.runs[1].error.ename == "OutputError" and "executed copy" in report.runs[1].error.evalue
    md = report.summary_md.read_text()
    assert "| 00_ok | failed |" in md and "| 01_ok | failed |" in md and "| 02_ok | ok |" in md
    assert not list(out.glob(".*partial*")) and not list(out.glob(".*.tmp"))


def test_only_run_keeps_earlier_notebooks_in_the_summary_with_their_parameters(make_notebook, tmp_path):
    for name in ("00_a", "01_b", "02_c"):
        make_notebook(name)
    root, out = tmp_path / "notebooks", tmp_path / "o"
    first = run_notebooks("smoke", out=out, parameters={"seed": 4}, progress=False, notebooks_dir=root)
    assert first.ok and first.earlier == []
    payload = json.loads((out / "00_a" / "results.json").read_text())
    assert payload["run"] == {"parameters": {"device": "auto", "profile": "smoke", "scale": 1, "seed": 4},
                              "overrides": ["seed"]}
    assert payload["results"]["nested"] == {"seed": 4}
    (out / "02_c.ipynb").unlink()  # an earlier notebook whose files are gone is not described
    shutil.rmtree(out / "02_c")

    second = run_notebooks("smoke", only=["01"], out=out, parameters={"scale": 3}, progress=False, notebooks_dir=root)
    assert [r.name for r in second.runs] == ["01_b"] and second.earlier == ["00_a"]
    with second.summary_csv.open() as fh:
        rows = {(r["notebook"], r["key"]): r for r in csv.DictReader(fh)}
    assert {n for n, _ in rows} == {"00_a", "01_b"}
    assert rows[("00_a", "value")]["run"] == "earlier run" and rows[("01_b", "value")]["run"] == "this run"
    assert json.loads(rows[("00_a", "value")]["parameters"])["parameters"]["seed"] == 4
    recorded = json.loads(rows[("01_b", "value")]["parameters"])
    assert recorded["overrides"] == ["scale"] and recorded["parameters"]["scale"] == 3
    assert rows[("01_b", "value")]["value"] == "3.0" and rows[("00_a", "value")]["value"] == "1.0"
    md = second.summary_md.read_text()
    assert "| 00_a | ok | " in md and "| earlier run | seed=4 (override) |" in md
    assert "| this run | seed=0, scale=3 (override) |" in md and "02_c" not in md


INTERRUPT_CHILD = """
import sys
from fedlora_lite.course import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _run_and_signal(root, out, tmpdir, sig) -> subprocess.CompletedProcess:
    """Run the CLI in a child (its own TMPDIR), send ``sig`` once the first notebook executes."""
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    args = [sys.executable, "-c", INTERRUPT_CHILD, "run", "--notebooks", str(root), "--out", str(out),
            "--no-progress", "-p", "scale", "60"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (out / ".00_slow.partial.ipynb").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)  # the kernel is in the sleeping cell now
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def test_interrupt_writes_an_honest_summary_cleans_up_and_exits_with_one_line(make_notebook, tmp_path):
    make_notebook("00_slow", ["import time\ntime.sleep(scale)", SAVE_CELL.format(name="00_slow")])
    make_notebook("01_ok")
    root, out = tmp_path / "notebooks", tmp_path / "o"
    assert run_notebooks("smoke", out=out, parameters={"scale": 0}, progress=False, notebooks_dir=root).ok
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):  # Ctrl-C, then kill, of a re-run
        tmpdir = tmp_path / f"tmp_{code}"
        tmpdir.mkdir()
        done = _run_and_signal(root, out, tmpdir, sig)
        assert done.returncode == code, done.stderr
        assert done.stderr.strip().splitlines() == ["fedlora-lite: interrupted"], done.stderr
        assert not list(tmpdir.iterdir())  # the temporary kernelspec folder is gone
        assert not (out / "00_slow.ipynb").exists() and not (out / "00_slow" / "results.json").exists()
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial or temporary files
        md = (out / "summary.md").read_text()
        assert "| 00_slow | interrupted |" in md and "| this run |" in md, md
        assert "| 01_ok | ok |" in md and "| earlier run | seed=0, scale=0 (override) |" in md, md
