"""Start a real `python -m server` process on port 0 and talk to it (used by the tests and bench/).

The server binds port 0 for gRPC and metrics alike and writes the ports it bound to a port file (--port-file), so
nothing here guesses a free port or reads the human log for a port. With `holds=True` the server runs with
--test-hold-dir, and a test can hold every model call (or loading, or export) until it releases it.

A ServerProcess is a context manager, and kill() ends the server and everything it started (--workers' workers,
which put themselves in process groups of their own, too) whenever it is called, as often as it is called: a test
that fails never leaves one behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from harness import procs
from server.base.hold import POINTS

REPO_ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 180  # a fresh repository is exported first; a loaded 2-core machine is slow at it


def scrape(port: int | None, tls_ca: Path | None = None) -> str:
    """The /metrics text served on a loopback port (over HTTPS, trusting `tls_ca`, when the server uses TLS: /metrics
    shares the REST port, which TLS covers)."""
    if tls_ca is None:
        url, context = f"http://127.0.0.1:{port}/metrics", None
    else:
        url, context = f"https://127.0.0.1:{port}/metrics", ssl.create_default_context(cafile=str(tls_ca))
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return response.read().decode()


def sample_value(metrics_text: str, name: str, **labels: str) -> float:
    """The samples of a /metrics text with this name and these labels, summed over the labels not given (such as
    `transport`: grpc and http); 0.0 when absent, as a counter not yet incremented is."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


class ServerProcess:
    """A server subprocess: its gRPC target, its metrics, its log, its hold points, and the health statuses seen
    while starting."""

    def __init__(
        self,
        repository: Path,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        holds: bool = False,
        held: Sequence[str] = (),
    ) -> None:
        """`holds`: start with --test-hold-dir; `held`: hold points closed from the start (implies holds)."""
        self._scratch = Path(tempfile.mkdtemp(prefix="modelserver-test-"))
        self.port_file = self._scratch / "ports.json"
        self.hold_dir = self._scratch / "holds" if holds or held else None
        hold_args: list[str] = []
        if self.hold_dir is not None:
            self.hold_dir.mkdir()
            hold_args = ["--test-hold-dir", str(self.hold_dir)]
            for point in held:
                (self.hold_dir / point).touch()
        command = [
            sys.executable, "-m", "server",
            "--grpc-port", "0",
            "--metrics-port", "0",
            "--port-file", str(self.port_file),
            "--model-repository", str(repository),
            *hold_args,
            *args,
        ]  # fmt: skip
        # The server's own certificate, trusted for HTTPS (a self-signed test certificate is its own CA).
        self.tls_ca = Path(args[list(args).index("--tls-cert-file") + 1]) if "--tls-cert-file" in args else None
        self.log: list[str] = []
        self._log_done = threading.Event()
        self._channels: list[grpc.Channel] = []  # closed by stop() and kill()
        self._workers: list[procs.Process] = []  # the port file's server pids other than the server's own
        # A session of its own: a signal meant for pytest's terminal does not reach the server, and what it starts
        # without a group of its own (multiprocessing's resource tracker) is in the server's process group.
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            threading.Thread(target=self._read_log, name=f"server-log-{self.process.pid}", daemon=True).start()
            ports = self._wait_ports()
            self.port: int = ports["grpc_port"]
            self.metrics_port: int | None = ports["metrics_port"]
            self.http_port: int | None = ports.get("http_port")
            self.http_url = f"http://127.0.0.1:{self.http_port}" if self.http_port else ""
            self.server_pids: list[int] = ports["server_pids"]
            others = (procs.process(pid) for pid in self.server_pids if pid != self.process.pid)
            self._workers = [seen for seen in others if seen is not None]  # killed by kill() even once orphaned
            self.target = f"127.0.0.1:{self.port}"
            self.channel = grpc.insecure_channel(self.target)
            self._channels.append(self.channel)
            self.health_seen: list[str] = []
        except BaseException:
            self.kill()
            raise

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.kill()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
        self._log_done.set()

    def _wait_ports(self) -> dict:
        deadline = time.monotonic() + START_SECONDS
        while not self.port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start listening:\n" + self.log_text())
            time.sleep(0.01)
        return json.loads(self.port_file.read_text())

    def log_text(self) -> str:
        if self.process.poll() is not None:
            self._log_done.wait(10)  # everything it wrote before exiting
        return "".join(self.log)

    def health(self, service: str = "") -> str:
        # The stubs omit the methods that HealthStub's __init__ sets.
        response = health_pb2_grpc.HealthStub(self.channel).Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_serving(self, timeout: float = START_SECONDS) -> None:
        """Poll health until SERVING, recording every distinct status seen on the way."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                status = self.health()
            except grpc.RpcError:
                status = "UNREACHABLE"
            if not self.health_seen or self.health_seen[-1] != status:
                self.health_seen.append(status)
            if status == "SERVING":
                return
            time.sleep(0.02)
        raise RuntimeError("server not SERVING in time:\n" + self.log_text())

    def metrics_text(self) -> str:
        return scrape(self.metrics_port, self.tls_ca)

    def metric(self, name: str, **labels: str) -> float:
        """The samples with this name and labels, summed (0.0 when absent, as a counter not yet incremented is)."""
        return sample_value(self.metrics_text(), name, **labels)

    # Hold points (--test-hold-dir): the test, not the machine's speed, decides how long the server is busy.

    def hold(self, point: str = "predict") -> None:
        """Close a hold point: from now on the server waits there (every model call, for "predict")."""
        assert self.hold_dir is not None, "start the server with holds=True"
        (self.hold_dir / point).touch()

    def release(self, point: str = "predict") -> None:
        """Open a hold point: whatever waits there goes on."""
        assert self.hold_dir is not None, "start the server with holds=True"
        (self.hold_dir / point).unlink(missing_ok=True)

    def arrived(self, point: str = "predict") -> int:
        """How many calls have reached the point while it was closed."""
        assert self.hold_dir is not None, "start the server with holds=True"
        try:
            return len((self.hold_dir / f"{point}.arrived").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def wait_arrived(self, count: int, point: str = "predict", timeout: float = 120) -> None:
        """Wait (bounded) until `count` calls in all have reached the closed point."""
        deadline = time.monotonic() + timeout
        while self.arrived(point) < count:
            assert self.process.poll() is None, f"server exited:\n{self.log_text()}"
            assert time.monotonic() < deadline, f"{self.arrived(point)} of {count} calls reached '{point}'"
            time.sleep(0.005)

    @contextmanager
    def held(self, point: str = "predict") -> Iterator[None]:
        """The point closed for the body of a `with` block, and open again after it, whatever happens."""
        self.hold(point)
        try:
            yield
        finally:
            self.release(point)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server (the supervisor, with --workers: it forwards) and wait for its exit code."""
        self._close_channels()
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the server, every process it started (its workers: those it has now, and those the port file
        named, should they have outlived it) and its process group; reap it and close the channel. Idempotent,
        and safe on a server that failed to start or has exited already."""
        if self.hold_dir is not None:
            for point in POINTS:
                self.release(point)
        if self.process.returncode is None:  # not reaped: its pid is still its own, and its children its children
            procs.kill_tree(self.process.pid, self._workers)
        else:
            for worker in self._workers:
                procs.kill(worker)
        # Once the server is reaped its pid stays taken while its group has a member: a live process with that pid
        # is someone else's (and our group empty); without one, the group, if any, is ours.
        if self.process.returncode is None or not Path(f"/proc/{self.process.pid}").exists():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self._log_done.wait(10)  # every process that held the log pipe is gone: the reader ends
        self._close_channels()

    def _close_channels(self) -> None:
        while self._channels:
            self._channels.pop().close()


@contextmanager
def serving(repository: Path, args: Sequence[str] = (), **options: Any) -> Iterator[ServerProcess]:
    """A server started and SERVING for the body of a `with` block (ServerProcess's `options`: holds, held, env),
    killed after it, whatever happens."""
    with ServerProcess(repository, args, **options) as server:
        server.wait_serving()
        yield server
