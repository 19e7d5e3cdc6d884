"""Deployment: a real SuperLink and 3 real SuperNodes on localhost run 2 rounds; nothing is left behind, even on failure."""

from __future__ import annotations

import socket

import psutil
import pytest

from fedlora_lite.flower.deploy import LocalDeployment, run_deployment, write_app

from .conftest import tiny_config


def _alive(pids):
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _listening(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_superlink_and_three_supernodes_run_two_rounds(tmp_path):
    # no round-0 evaluation: every phase starts one ClientApp process per node, the slow part of a local deployment
    cfg = tiny_config(tmp_path / "results", nodes=3, contamination=0.0, rounds=2, methods=("clair",), round_timeout=300.0,
                      evaluate_base=False)
    run = run_deployment(cfg, tmp_path / "work", timeout=540)
    try:
        assert run.returncode == 0 and "flwr run" in run.command_line
        assert len(run.processes) == 4 and sum("flower-supernode" in c for c in run.processes) == 3
        res = run.result
        assert res.data["engine"] == "deployment" and res.rounds("clair") == [1, 2]
        assert all(len(h["accuracy"]) == 3 for h in res.history("clair"))
        assert res.history("clair")[1]["participants"] == [0, 1, 2]
        acc = res.accuracy("clair")
        assert acc[-1] > acc[0] + 0.02, acc  # the second round improves on the first
        assert res.history("clair")[1]["bytes"]["train_up"] > 3 * 4 * res.data["reference"]["uplink_floats"]
    finally:
        assert len(run.pids) >= 4 and not _alive(run.pids), _alive(run.pids)
        assert not any(_listening(p) for p in run.ports)


def test_a_failing_run_releases_every_process_and_port(tmp_path):
    cfg = tiny_config(tmp_path / "results", nodes=3, contamination=0.0, rounds=50, methods=("fedavg",))
    app = write_app(tmp_path / "app", cfg)
    with pytest.raises(TimeoutError, match="did not finish"):
        with LocalDeployment(3, tmp_path / "work") as dep:
            ports = [dep.superlink_port, *dep.node_ports]
            dep.run(app, cfg, timeout=20)  # far too short for 50 rounds: the test fails mid-run
    assert dep.stopped and not _alive(dep.stopped), _alive(dep.stopped)
    assert not any(_listening(p) for p in ports)
    dep.stop()  # idempotent
