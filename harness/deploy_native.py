"""The compose topology run natively: Debian's Prometheus and nginx on free loopback ports, configured from
deploy/ with only the addresses (and, for speed, the scrape interval) changed. Used by tests/deploy/ and
bench/overload.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from harness.server import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
NGINX_CONFIG = DEPLOY / "nginx" / "nginx.conf"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "modelserver.json"


def free_port() -> int:
    """A loopback port free right now, for Prometheus and nginx, which cannot tell us what a port-0 bind picked
    (our own servers bind port 0 and report it in their port file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """The path of a Debian tool; `make test` installs them (.ci/install-debian-tools), so a missing one fails."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `make test` (it installs Debian's prometheus and nginx)")
    return found


def stop_process_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a process started in its own session (start_new_session=True), SIGKILL its whole group if it has not
    exited in `timeout` s (nginx's workers too), and reap it. Safe to call again, and on one that exited."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    if process.returncode is None or not Path(f"/proc/{process.pid}").exists():  # the group is still ours
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until predicate() returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- Prometheus -------------------------------------------------------------------------------------------------


def prometheus_config_for_loopback(metrics_targets: Sequence[str], scrape_interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the compose DNS discovery replaced by the loopback targets."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "modelserver")
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": list(metrics_targets)}]
    job["scrape_interval"] = scrape_interval
    job["scrape_timeout"] = scrape_interval
    return config


class PrometheusProcess:
    """A real Prometheus on a free loopback port with its data in `workdir`."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        for job in config["scrape_configs"]:
            if job["job_name"] == "prometheus":  # it scrapes itself: on its own port here
                job["static_configs"] = [{"targets": [f"127.0.0.1:{self.port}"]}]
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log_file = workdir / "prometheus.log"
        self.url = f"http://127.0.0.1:{self.port}"
        with self.log_file.open("w") as log:
            self.process = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(self._ready, 60, "Prometheus /-/ready")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log_file.read_text()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns the `data` member, raising with Prometheus' own error otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        stop_process_group(self.process)


# --- nginx ------------------------------------------------------------------------------------------------------

# The shipped log format: '... "POST /path HTTP/2.0" 200 13 grpc-status=0 ...' (trailer, or header when
# the reply was trailers-only: nginx logs the pair, one side empty).
ACCESS_LINE = re.compile(r'" (\d{3}) \d+ grpc-status=-?(\d*)-?')

UPSTREAM_SERVER = re.compile(r"^(\s*)server\s+server:50051([^;]*);\s*$", re.MULTILINE)
HTTP_UPSTREAM_SERVER = re.compile(r"^(\s*)server\s+server:8000([^;]*);\s*$", re.MULTILINE)


def _access_fields(line: str) -> tuple[str, str]:
    """(HTTP status, gRPC status) of one access log line."""
    match = ACCESS_LINE.search(line)
    if match is None:
        raise ValueError(f"not an access log line of the format in {NGINX_CONFIG.name}: {line!r}")
    return match[1], match[2]


def nginx_config_for_loopback(
    config: str,
    listen_port: int,
    upstreams: Sequence[str],
    workdir: Path,
    http_listen_port: int | None = None,
    http_upstreams: Sequence[str] = (),
) -> str:
    """deploy/nginx/nginx.conf with the replicas, the listen ports and the writable paths moved to loopback/workdir.

    Only these lines change: the upstreams' `server server:50051` and `server server:8000` (one line per replica
    instead; the HTTP one a closed port when no HTTP replicas are given), the `listen 50051` and `listen 8000` ports
    (on 127.0.0.1; the HTTP one a free port when none is given), the pid file and the logs (files in workdir instead
    of the container's stdout and stderr), so that the proxying configuration under test is the shipped one.
    """
    assert UPSTREAM_SERVER.search(config), "deploy/nginx/nginx.conf has no `server server:50051` upstream line"
    config = UPSTREAM_SERVER.sub(
        lambda m: "\n".join(f"{m.group(1)}server {u}{m.group(2)};" for u in upstreams), config, count=1
    )
    assert HTTP_UPSTREAM_SERVER.search(config), "deploy/nginx/nginx.conf has no `server server:8000` upstream line"
    config = HTTP_UPSTREAM_SERVER.sub(
        lambda m: "\n".join(f"{m.group(1)}server {u}{m.group(2)};" for u in http_upstreams or ["127.0.0.1:1"]),
        config,
        count=1,
    )
    replaced = {
        "listen 50051 http2;": f"listen 127.0.0.1:{listen_port} http2;",
        "listen 8000;": f"listen 127.0.0.1:{http_listen_port or free_port()};",
        "pid /tmp/nginx.pid;": f"pid {workdir / 'nginx.pid'};",
        "error_log /dev/stderr warn;": f"error_log {workdir / 'error.log'} info;",
        "access_log /dev/stdout grpc;": f"access_log {workdir / 'access.log'} grpc;",
    }
    for old, new in replaced.items():
        assert old in config, f"deploy/nginx/nginx.conf no longer has {old!r}"
        config = config.replace(old, new)
    # nginx's own temp folders default to paths under /var/lib/nginx; keep every file of this instance in workdir.
    temp_paths = "".join(
        f"    {name}_temp_path {workdir / name};\n" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return config.replace("http {\n", "http {\n" + temp_paths, 1)


class NginxProcess:
    """A real nginx (master and workers) in the foreground, on a free loopback port, files in `workdir`."""

    def __init__(
        self, workdir: Path, upstreams: Sequence[str], config: str | None = None, http_upstreams: Sequence[str] = ()
    ) -> None:
        """`upstreams`: the replicas' gRPC addresses; `http_upstreams`: their HTTP ports' (none: the REST part of the
        config points at a closed port)."""
        self.workdir = workdir
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.http_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.http_upstreams = list(http_upstreams)
        self.source = NGINX_CONFIG.read_text() if config is None else config
        self.config_file = workdir / "nginx.conf"
        self.write_config(upstreams)
        test = subprocess.run(self._command("-t"), capture_output=True, text=True)
        assert test.returncode == 0, f"nginx -t failed:\n{test.stderr}"
        self.process = subprocess.Popen(
            [*self._command("-g", "daemon off;")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group: stop() can kill the master and its workers together
        )
        try:
            wait_until(self._listening, 30, "nginx to listen")
        except BaseException:
            self.stop()
            raise

    def write_config(self, upstreams: Sequence[str], http_upstreams: Sequence[str] | None = None) -> None:
        if http_upstreams is not None:
            self.http_upstreams = list(http_upstreams)
        self.config_file.write_text(
            nginx_config_for_loopback(
                self.source, self.port, upstreams, self.workdir, self.http_port, self.http_upstreams
            )
        )

    def _command(self, *args: str) -> list[str]:
        return [tool("nginx"), "-p", str(self.workdir), "-c", str(self.config_file), "-e", "stderr", *args]

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            assert self.process.stderr is not None  # started with stderr=PIPE
            raise RuntimeError(f"nginx exited with {self.process.returncode}: {self.process.stderr.read()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def access_counts(self) -> Counter[tuple[str, str]]:
        """(HTTP status nginx answered, gRPC status the replica answered) -> calls, from the access log."""
        path = self.workdir / "access.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return Counter(_access_fields(line) for line in lines)

    def errors(self) -> list[str]:
        """nginx's [error] lines, less the refused connections to a stopped replica (which it retries elsewhere)."""
        lines = self.error_log().splitlines()
        return [
            line for line in lines if "[error]" in line and "connect() failed (111: Connection refused)" not in line
        ]

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        stop_process_group(self.process)  # SIGTERM: nginx's fast shutdown; SIGKILL to all if it hangs
