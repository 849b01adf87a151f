"""A Flower deployment on this machine: one SuperLink and ``n`` SuperNodes on 127.0.0.1 as
processes, insecure (loopback only), for the deployment test and ``tools/flower_bench.py``.

    with LocalFederation(3, home=tmp / "flwr_home", log_dir=tmp) as fed:
        run = fed.flwr_run(app_dir, "rounds=2 n-clients=3 budgets='2,4,8'")
        run.wait()

Every process runs in its own session; leaving the ``with`` block stops each one's whole
process group (SIGTERM, then SIGKILL after 15 s), also when the block raised.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

from ..config import available_cores


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFederation:
    """``n_nodes`` SuperNodes (``partition-id=i num-partitions=n_nodes``) and their SuperLink.

    Args:
        n_nodes: SuperNodes to start.  home: ``FLWR_HOME`` for every process (the connection
            ``connection`` is written into its ``config.toml``).  log_dir: where each process's
            output goes (``<name>.log``); None discards it.  env: extra environment variables.
        startup_timeout: seconds the SuperLink may take to answer its health check.
        warm: each SuperNode with ``--isolation process`` and a warm SuperExec
            (:mod:`fedmpq.flower.superexec`) instead of a fresh ClientApp process per message.
        threads: each node's ``threads`` (node config); default: this machine's cores / n_nodes;
            0: none in the node config, so each node's client shares the cores with the fedmpq
            processes training beside it (:func:`fedmpq.trainers.share_cores`).
    """

    def __init__(self, n_nodes: int, home: Path, log_dir: Optional[Path] = None,
                 env: Optional[Dict[str, str]] = None, connection: str = "local", startup_timeout: float = 60.0,
                 warm: bool = True, threads: Optional[int] = None):
        self.n_nodes, self.home, self.log_dir, self.connection = n_nodes, Path(home), log_dir, connection
        self.startup_timeout, self.warm = startup_timeout, warm
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise ValueError(f"threads must be an integer >= 0 (0: none in the node config), got {threads!r}")
        # the nodes share this machine's cores: each trains with its share (node config; 0: the
        # nodes count the trainers beside them instead)
        self.threads = threads if threads is not None else max(1, available_cores() // n_nodes)
        self.env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", **(env or {})}
        self.port = free_port()
        self.procs: List[subprocess.Popen] = []
        self.nodes: List[subprocess.Popen] = []

    def spawn(self, cmd: List[str], name: str) -> subprocess.Popen:
        """Start ``cmd`` in its own session with this federation's environment; stopped at exit."""
        out = open(Path(self.log_dir) / f"{name}.log", "w") if self.log_dir else subprocess.DEVNULL
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        return self.procs[-1]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def __enter__(self) -> "LocalFederation":
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            self.spawn(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                        "--disable-runtime-dependency-installation"], "superlink")
            deadline = time.monotonic() + self.startup_timeout
            while not self._healthy():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the SuperLink on 127.0.0.1:{self.port} did not start within "
                                       f"{self.startup_timeout:g} s")
                time.sleep(0.2)
            self.nodes = []
            self._execs: List[Optional[subprocess.Popen]] = []
            for i in range(self.n_nodes):
                self.nodes.append(None)
                self._execs.append(None)
                self.start_node(i)
            (self.home / "config.toml").write_text(
                f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
                f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        except BaseException:
            self.stop()
            raise
        return self

    def flwr_run(self, app_dir: Path, run_config: str, name: str = "flwr_run") -> subprocess.Popen:
        """``flwr run APP_DIR <connection> --run-config RUN_CONFIG --stream`` as a process."""
        return self.spawn(["flwr", "run", str(app_dir), self.connection, "--run-config", run_config, "--stream"], name)

    def start_node(self, i: int, name: Optional[str] = None) -> None:
        """Start SuperNode ``i`` (client ``i``; Flower gives it a new node id each time) and,
        when warm, its SuperExec."""
        port = free_port()
        name = name or f"supernode{i}"
        self.nodes[i] = self.spawn(
            ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port", str(port),
             "--max-wait-time", "120", "--isolation", "process" if self.warm else "subprocess",
             "--node-config", f"partition-id={i} num-partitions={self.n_nodes}"
             + (f" threads={self.threads}" if self.threads else "")], name)
        if self.warm:  # the node's ClientApps fork from a process that imported everything once
            self._execs[i] = self.spawn([sys.executable, "-m", "fedmpq.flower.superexec", "--insecure",
                                         "--runtime-api-address", f"127.0.0.1:{port}"], name.replace("supernode", "superexec"))

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and everything it started (its warm SuperExec too)."""
        for p in (self.nodes[i], self._execs[i]):
            if p is not None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def logs(self) -> str:
        """Every process's output so far (empty without ``log_dir``)."""
        if not self.log_dir:
            return ""
        return "".join(p.read_text(errors="replace") for p in sorted(Path(self.log_dir).glob("*.log")))

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
