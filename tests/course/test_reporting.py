"""Unit tests for fedlora_lite.course.reporting: profiles, results files, summary tables."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from fedlora_lite.course.reporting import (
    ProfileConfig,
    atomic_write_text,
    load_results,
    load_run_record,
    load_timings,
    record_run,
    save_results,
    select_profile,
)
from fedlora_lite.course.summary import summary_table, write_summary_csv, write_summary_markdown

TABLE = {
    "smoke": {"n_clients": 6, "steps": 10},
    "default": {"n_clients": 20, "steps": 200},
    "full": {"n_clients": 100, "steps": 2000},
}


def test_select_profile_picks_and_overrides():
    cfg = select_profile("default", TABLE, n_clients=None, steps=50)
    assert isinstance(cfg, ProfileConfig)
    assert (cfg.profile, cfg.n_clients, cfg.steps) == ("default", 20, 50)  # None keeps the profile value
    assert cfg.as_dict() == {"profile": "default", "n_clients": 20, "steps": 50}
    assert repr(cfg) == "ProfileConfig(profile='default', n_clients=20, steps=50)"
    assert select_profile("smoke", TABLE).n_clients == 6
    with pytest.raises(AttributeError, match="ProfileConfig is read-only"):
        cfg.steps = 3
    assert TABLE["default"]["steps"] == 200  # the table itself is untouched


def test_select_profile_rejects_bad_input():
    with pytest.raises(ValueError, match=r"profile must be one of \['default', 'full', 'smoke'\], got 'huge'"):
        select_profile("huge", TABLE)
    with pytest.raises(ValueError, match="n_client"):
        select_profile("smoke", TABLE, n_client=3)
    with pytest.raises(ValueError, match="different settings"):
        select_profile("smoke", {"smoke": {"a": 1}, "default": {"a": 1, "b": 2}})
    with pytest.raises(ValueError, match="reserved"):
        select_profile("smoke", {"smoke": {"profile": 1}})
    with pytest.raises(TypeError, match="profile"):
        select_profile(1, TABLE)
    with pytest.raises(TypeError, match="table"):
        select_profile("smoke", {"smoke": 3})


def test_save_and_load_results_roundtrip(tmp_path):
    results = {
        "error": torch.tensor(0.125, dtype=torch.float64),
        "flags": torch.tensor([True, False, True]),
        "rank": np.int64(2),
        "scores": np.array([0.1, 0.5]),
        "nested": {"k": 3, "ratio": np.float32(0.5), "shape": (2, 3)},
        "name": "clair",
        "config": select_profile("smoke", TABLE),
    }
    path = save_results(results, tmp_path / "a" / "b", notebook="02_linear_regression")
    assert path == tmp_path / "a" / "b" / "results.json"
    payload = json.loads(path.read_text())
    assert payload["notebook"] == "02_linear_regression" and payload["format_version"] == 1
    loaded = load_results(path.parent)
    assert loaded == {
        "error": 0.125,
        "flags": [True, False, True],
        "rank": 2,
        "scores": [0.1, 0.5],
        "nested": {"k": 3, "ratio": 0.5, "shape": [2, 3]},
        "name": "clair",
        "config": {"profile": "smoke", "n_clients": 6, "steps": 10},
    }
    assert load_results(path) == loaded
    # Same input, same bytes (no timestamps).
    first = path.read_bytes()
    save_results(results, tmp_path / "a" / "b", notebook="02_linear_regression")
    assert path.read_bytes() == first


def test_save_results_refuses_nan_unless_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"results\.nested\.loss is nan"):
        save_results({"nested": {"loss": float("nan")}}, tmp_path, notebook="x")
    with pytest.raises(ValueError, match=r"results\.v\[1\]"):
        save_results({"v": torch.tensor([1.0, float("inf")])}, tmp_path, notebook="x")
    assert not (tmp_path / "results.json").exists()
    save_results({"loss": float("nan")}, tmp_path, notebook="x", allow_nonfinite=True)
    assert load_results(tmp_path) == {"loss": None}


def test_save_results_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="results"):
        save_results([1, 2], tmp_path, notebook="x")
    with pytest.raises(ValueError, match="notebook"):
        save_results({"a": 1}, tmp_path, notebook="bad name/../x")
    with pytest.raises(TypeError, match="non-string key"):
        save_results({1: 2}, tmp_path, notebook="x")
    with pytest.raises(TypeError, match="object"):
        save_results({"a": object()}, tmp_path, notebook="x")
    with pytest.raises(ValueError, match="not weights"):
        save_results({"w": torch.zeros(200, 200)}, tmp_path, notebook="x")
    (tmp_path / "bogus.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a fedlora_lite results file"):
        load_results(tmp_path / "bogus.json")


def test_summary_table_flattens_and_keeps_failed_notebooks(tmp_path):
    rows = summary_table(
        {
            "00_overview": {"flags_correct": True, "err": {"clair": 0.1234567, "local": 0.5}, "ks": [1, 2, 3],
                            "curve": list(range(50))},
            "01_theory": None,
        },
        status={"01_theory": "failed"},
        wall_times={"00_overview": 3.21, "01_theory": 1.0},
    )
    keyed = {(r.notebook, r.key): r for r in rows}
    assert keyed[("00_overview", "err.clair")].value == pytest.approx(0.1234567)
    assert keyed[("00_overview", "ks")].value == "[1, 2, 3]"
    assert keyed[("00_overview", "curve")].value == "<list of 50>"
    assert keyed[("01_theory", "")].status == "failed"
    assert keyed[("00_overview", "flags_correct")].wall_time_s == 3.21

    md = write_summary_markdown(rows, tmp_path / "s.md").read_text()
    assert "| 00_overview | ok | 3.2 |" in md and "| 01_theory | failed | 1.0 |" in md
    assert "| 00_overview | err.clair | 0.123457 |" in md and "| 00_overview | flags_correct | true |" in md
    with write_summary_csv(rows, tmp_path / "s.csv").open() as fh:
        table = list(csv.DictReader(fh))
    byk = {(r["notebook"], r["key"]): r for r in table}
    assert math.isclose(float(byk[("00_overview", "err.clair")]["value"]), 0.1234567)  # full precision in CSV
    assert byk[("01_theory", "")]["status"] == "failed"
    with pytest.raises(TypeError, match="results_by_notebook"):
        summary_table([("a", {})])


def test_timings_go_to_their_own_file_and_results_stay_byte_identical(tmp_path):
    save_results({"speedup_at_least_10x": True}, tmp_path / "a", notebook="07_x", timings={"dense_s": 1.23})
    save_results({"speedup_at_least_10x": True}, tmp_path / "b", notebook="07_x", timings={"dense_s": 4.56})
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    assert load_timings(tmp_path / "b") == {"dense_s": 4.56}
    assert "dense_s" not in (tmp_path / "a" / "results.json").read_text()
    with pytest.raises(TypeError, match="timings must be a mapping"):
        save_results({"a": 1}, tmp_path, notebook="x", timings=[1.0])
    with pytest.raises(ValueError, match=r"timings\.t is nan"):
        save_results({"a": 1}, tmp_path, notebook="x", timings={"t": float("nan")})


def test_record_run_adds_a_run_record_next_to_the_results(tmp_path):
    path = save_results({"a": 1}, tmp_path, notebook="x")
    assert load_run_record(path) is None
    record_run(path, {"parameters": {"seed": 3, "sizes": (1, 2)}, "overrides": ["seed"]})
    assert load_run_record(tmp_path) == {"parameters": {"seed": 3, "sizes": [1, 2]}, "overrides": ["seed"]}
    assert load_results(path) == {"a": 1}


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old\n")
    mode = path.stat().st_mode & 0o777
    assert mode == 0o666 & ~_current_umask()  # an ordinary file's mode, not mkstemp's 0600

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
