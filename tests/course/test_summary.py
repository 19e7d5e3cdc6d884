"""The run summary's view of earlier runs (fedlora_lite.course.summary.earlier_runs)."""

from __future__ import annotations

from fedlora_lite.course.reporting import record_run, save_results
from fedlora_lite.course.summary import earlier_runs, summary_table, write_summary_csv


def test_earlier_runs_describe_only_files_that_are_there(tmp_path):
    out = tmp_path / "o"
    save_results({"v": 1.0}, out / "00_ok", notebook="00_ok")
    record_run(out / "00_ok" / "results.json", {"parameters": {"seed": 2}, "overrides": []})
    (out / "00_ok.ipynb").write_text("{}")
    (out / "01_half.ipynb").write_text("{}")  # an executed copy without results: it did not finish
    save_results({"v": 2.0}, out / "02_checkfailed", notebook="02_checkfailed")  # saved, then its check cell failed
    (out / "03_gone").mkdir()  # nothing left
    rows = summary_table({"00_ok": {"v": 1.0}, "02_checkfailed": None}, status={"02_checkfailed": "failed"},
                         wall_times={"00_ok": 1.5, "02_checkfailed": 2.5})
    write_summary_csv(rows, out / "summary.csv")
    names = ("00_ok", "01_half", "02_checkfailed", "03_gone")
    found = earlier_runs({n: (out / f"{n}.ipynb", out / n) for n in names}, out / "summary.csv")
    assert sorted(found) == ["00_ok", "01_half", "02_checkfailed"]
    assert (found["00_ok"].status, found["00_ok"].results, found["00_ok"].wall_time_s) == ("ok", {"v": 1.0}, 1.5)
    assert found["00_ok"].record == {"parameters": {"seed": 2}, "overrides": []}
    assert (found["01_half"].status, found["01_half"].results) == ("failed", None)
    assert (found["02_checkfailed"].status, found["02_checkfailed"].results) == ("failed", None)
    (out / "summary.csv").write_bytes(b"\xff\xfe garbage")  # an unreadable earlier summary is ignored
    assert earlier_runs({"00_ok": (out / "00_ok.ipynb", out / "00_ok")}, out / "summary.csv")["00_ok"].status == "ok"
