"""Start a real `python -m server` process on free ports and talk to it (used by the integration tests)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"gRPC listening on ([\d.]+):(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess: its gRPC target, its metrics, its log, and the health statuses seen while starting."""

    def __init__(self, repository: Path, args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        command = [
            sys.executable, "-m", "server",
            "--grpc-port", "0",
            "--metrics-port", str(self.metrics_port),
            "--model-repository", str(repository),
            *args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._port_found = threading.Event()
        self.port = 0
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._port_found.wait(120):
            self.kill()
            raise RuntimeError("server did not start listening:\n" + self.log_text())
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.health_seen: list[str] = []

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            match = LISTENING.search(line)
            if match:
                self.port = int(match.group(2))
                self._port_found.set()
        self._port_found.set()

    def log_text(self) -> str:
        return "".join(self.log)

    def health(self, service: str = "") -> str:
        response = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_serving(self, timeout: float = 180) -> None:
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
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (0.0 when absent, as a counter not yet incremented is)."""
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
