"""Deployment: a real SuperLink and real SuperNodes as separate processes, running the same app.

:class:`LocalDeployment` starts ``flower-superlink`` and K ``flower-supernode`` processes on
localhost (insecure mode: no TLS, for tests and demonstrations), each in its own process
group on free ports, with logs under ``<workdir>/logs``; :meth:`LocalDeployment.run` submits
the app with ``flwr run`` and waits for it; :meth:`LocalDeployment.stop` (also on ``with``
exit, at interpreter exit and when the object is collected) terminates every process it
started *and their descendants* (Flower spawns ``flower-superexec``, ``flwr-serverapp`` and
``flwr-clientapp`` children, some in new sessions), escalating to SIGKILL, and checks that
the ports are free again. Nothing is installed at run time
(``--disable-runtime-dependency-installation``): every machine needs this package installed.

The app itself is a folder with one ``pyproject.toml`` (:func:`write_app`) whose components
point at :data:`fedlora_lite.flower.server.server_app` and
:data:`fedlora_lite.flower.client.client_app`, and whose ``[tool.flwr.app.config]`` holds
every key of :meth:`~fedlora_lite.flower.config.FlowerRunConfig.to_run_config`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from .config import FlowerRunConfig
from .results import FlowerResult

__all__ = ["write_app", "LocalDeployment", "DeploymentRun", "run_deployment", "free_port"]

CONNECTION = "fedlora-local"


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_app(directory: str | Path, cfg: FlowerRunConfig | None = None) -> Path:
    """Write the Flower app folder (``pyproject.toml`` only) with ``cfg``'s run config as defaults.

    ``flwr run <directory> <connection>`` then runs the federated copy task; override any
    key with ``--run-config 'num-server-rounds=3 methods="fedavg,clair"'``.
    """
    cfg = FlowerRunConfig() if cfg is None else cfg
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    lines = [
        "# A Flower app running fedlora_lite's ServerApp and ClientApp (written by fedlora_lite.flower.deploy.write_app).",
        "# Every machine running a SuperLink or SuperNode needs fedlora-lite[flower] installed.",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "fedlora-flower-app"', 'version = "1.0.0"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "fedlora-lite"', "",
        "[tool.flwr.app.components]", 'serverapp = "fedlora_lite.flower.server:server_app"',
        'clientapp = "fedlora_lite.flower.client:client_app"', "",
        "[tool.flwr.app.config]",
        *(f'"{k}" = {_toml_value(v)}' for k, v in cfg.to_run_config().items()),
    ]
    (path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _signal(procs: list[subprocess.Popen], descendants: list, sig: int) -> None:
    import psutil

    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)  # the process group: everything it started in its own session
    for d in descendants:
        with contextlib.suppress(psutil.Error):
            d.send_signal(sig)  # children that moved to a new session (flower-superexec, flwr-serverapp)


def _kill_tree(procs: list[subprocess.Popen], grace: float = 10.0) -> list[int]:
    """SIGTERM every process, its group and its descendants; SIGKILL what is left after ``grace`` s.

    Returns:
        The pids of every process it stopped (the started ones and their descendants).
    """
    import psutil

    descendants = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            descendants += psutil.Process(p.pid).children(recursive=True)
    _signal(procs, descendants, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    _, alive = psutil.wait_procs(descendants, timeout=max(deadline - time.monotonic(), 0.1))
    _signal(procs, alive, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
    return [p.pid for p in procs] + [d.pid for d in descendants]


@dataclass
class DeploymentRun:
    """One ``flwr run``: the command, its exit status, its output, how long it took.

    Attributes:
        command: ``flwr run`` and its arguments.
        returncode, output, seconds: how it ended, what it printed, its wall time.
        result: the run's results (set by :func:`run_deployment`).
        processes: the SuperLink / SuperNode command lines that served it.
        pids, ports: every process stopped afterwards and the ports they held.
    """

    command: list[str]
    returncode: int
    output: str
    seconds: float
    result: FlowerResult | None = None
    processes: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)


@dataclass
class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on localhost, as separate processes (insecure mode).

    Args:
        num_nodes: SuperNodes to start; node i gets ``--node-config 'partition-id=i num-partitions=K'``.
        workdir: logs (``logs/``), the Flower home (``flwr_home/``: config and installed app bundles).
        host: address everything binds to.
        start_timeout: seconds to wait for the SuperLink to accept connections.
    """

    num_nodes: int
    workdir: str | Path
    host: str = "127.0.0.1"
    start_timeout: float = 60.0
    superlink_port: int = 0
    node_ports: list[int] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_nodes, bool) or not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive int, got {self.num_nodes!r}")
        self.workdir = Path(self.workdir)
        self._finalizer = weakref.finalize(self, _kill_tree, self._procs)
        atexit.register(self._finalizer)

    @property
    def env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                "FLWR_HOME": str(self.workdir / "flwr_home"), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                "PYTHONUNBUFFERED": "1"}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        exe = str(Path(sys.executable).parent / args[0])
        cmd = [exe if Path(exe).exists() else args[0], *args[1:]]
        self.commands.append(shlex.join(args))
        with open(logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                    start_new_session=True)
        self._procs.append(proc)
        return proc

    def log(self, name: str = "superlink", tail: int = 4000) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.is_file() else ""

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait until it listens, then start the SuperNodes."""
        if self._procs:
            raise RuntimeError("this deployment is already started")
        self.superlink_port = free_port(self.host)
        link = self._spawn("superlink", ["flower-superlink", "--insecure", "--host", self.host, "--port",
                                         str(self.superlink_port), "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + self.start_timeout
        while not _port_open(self.host, self.superlink_port):
            if link.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the SuperLink did not start (exit {link.returncode}):\n{self.log('superlink')}")
            time.sleep(0.2)
        self.node_ports = [free_port(self.host) for _ in range(self.num_nodes)]
        for i, port in enumerate(self.node_ports):
            self._spawn(f"supernode_{i}", ["flower-supernode", "--insecure", "--superlink",
                                           f"{self.host}:{self.superlink_port}", "--host", self.host, "--port", str(port),
                                           "--node-config", f"partition-id={i} num-partitions={self.num_nodes}"])
        home = self.workdir / "flwr_home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                          f'address = "{self.host}:{self.superlink_port}"\ninsecure = true\n')
        return self

    def run(self, app_dir: str | Path, cfg: FlowerRunConfig, *, timeout: float = 600.0) -> DeploymentRun:
        """``flwr run <app_dir> fedlora-local --stream --run-config <cfg>``, bounded by ``timeout`` seconds."""
        if not self._procs:
            raise RuntimeError("start the deployment first")
        overrides = Path(self.workdir) / "run_config.toml"
        overrides.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in cfg.to_run_config().items()))
        args = ["flwr", "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(overrides)]
        self.commands.append(shlex.join(args))
        exe = str(Path(sys.executable).parent / "flwr")
        t0 = time.perf_counter()
        proc = subprocess.Popen([exe, *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree([proc], grace=5.0)
            out, _ = proc.communicate()
            raise TimeoutError(f"flwr run did not finish within {timeout:.0f} s:\n{out.decode(errors='replace')[-3000:]}") from None
        return DeploymentRun(args, proc.returncode, out.decode(errors="replace"), time.perf_counter() - t0)

    def stop(self) -> None:
        """Terminate every process started here and their descendants; wait until the ports are free.

        Safe to call twice; ``self.stopped`` lists every pid it stopped.
        """
        self.stopped += _kill_tree(self._procs)
        ports = [self.superlink_port, *self.node_ports]
        deadline = time.monotonic() + 10
        while any(p and _port_open(self.host, p) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.2)
        self._procs.clear()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_deployment(cfg: FlowerRunConfig, workdir: str | Path, *, timeout: float = 600.0) -> DeploymentRun:
    """Start a local SuperLink and ``cfg.num_nodes`` SuperNodes, run ``cfg`` on them, stop everything.

    Args:
        cfg: the run (``output_dir`` defaults to ``<workdir>/results``).
        workdir: the app folder (``app/``), logs and the Flower home.
        timeout: seconds for the whole ``flwr run``.

    Returns:
        The :class:`DeploymentRun` with the parsed results (``.result``).

    Raises:
        RuntimeError: ``flwr run`` failed or the ServerApp wrote no complete results.
    """
    workdir = Path(workdir).resolve()
    if cfg.output_dir is None:
        cfg = cfg.replace(output_dir=str(workdir / "results"))
    cfg = cfg.replace(output_dir=str(Path(cfg.output_dir).resolve()))
    app = write_app(workdir / "app", cfg)
    with LocalDeployment(cfg.num_nodes, workdir) as dep:
        run = dep.run(app, cfg, timeout=timeout)
        run.processes = list(dep.commands[:-1])
    run.pids = list(dep.stopped)
    run.ports = [dep.superlink_port, *dep.node_ports]
    try:
        run.result = FlowerResult.load(cfg.output_dir)
    except FileNotFoundError as exc:
        raise RuntimeError(f"flwr run exited with {run.returncode} and wrote no results:\n{run.output[-3000:]}") from exc
    missing = [m for m in cfg.methods if m not in run.result.methods
               or run.result.rounds(m)[-1] != cfg.num_rounds]
    if run.returncode != 0 or missing:
        raise RuntimeError(f"flwr run exited with {run.returncode}; incomplete methods {missing}:\n{run.output[-3000:]}")
    return run
