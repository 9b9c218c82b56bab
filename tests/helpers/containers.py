"""The image under podman (tests/deploy/test_image.py): build it with `make image`, run containers of it, and talk to
a running one the way tests talk to a server process (ServerProcess's target, metrics, hold points and process).

podman runs as root here, with runc and no default ulimits (deploy/podman/containers.conf, installed by
.ci/install-debian-tools). A machine where podman cannot run a container skips these tests, saying why.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.server import REPO_ROOT, sample_value, scrape

IMAGE = "localhost/modelserver:local"  # `make image`'s, and the name docker-compose.yml gives the image
BASE_IMAGE = "localhost/modelserver-base:bookworm"
BUILD_SECONDS = 1500  # a first build makes the base image (debootstrap) and a wheelhouse; later ones reuse both


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


@functools.cache
def unavailable() -> str | None:
    """Why podman cannot run containers here (None when it can): checked by running one from the base image."""
    if shutil.which("podman") is None:
        return "podman is not installed (.ci/install-debian-tools installs it on Debian)"
    try:
        info = podman("info", "--format", "json", check=False, timeout=60)
    except subprocess.TimeoutExpired:
        return "`podman info` did not answer"
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip()[-500:]}"
    return None


def build_image() -> str:
    """`make image` (base image and wheelhouse made when missing; layers cached between runs): the image's name."""
    result = subprocess.run(
        ["make", "--no-print-directory", "image", f"IMAGE={IMAGE}", f"BASE_IMAGE={BASE_IMAGE}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_SECONDS,
    )
    if result.returncode != 0:
        raise RuntimeError(f"make image failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return IMAGE


class _Stopper:
    """ServerProcess.process's part that tests use, for a container: SIGTERM is `podman stop` (run in the
    background, so a caller can keep calling while it drains), poll() is None until the container has exited."""

    def __init__(self, name: str, stop_timeout: int) -> None:
        self.name = name
        self.stop_timeout = stop_timeout
        self.stopping: subprocess.Popen[str] | None = None

    def send_signal(self, signum: int) -> None:
        self.stopping = subprocess.Popen(
            ["podman", "stop", "--time", str(self.stop_timeout), self.name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def poll(self) -> int | None:
        return None if self.stopping is None or self.stopping.poll() is None else self.exit_code()

    def wait(self, timeout: float) -> int:
        assert self.stopping is not None
        self.stopping.wait(timeout)
        return self.exit_code()

    def exit_code(self) -> int:
        return int(podman("inspect", self.name, "--format", "{{.State.ExitCode}}").stdout.strip())

    def reap(self) -> None:
        """The background `podman stop`, if any, ended (it returns once the container is gone) and reaped."""
        if self.stopping is not None and self.stopping.poll() is None:
            try:
                self.stopping.wait(30)
            except subprocess.TimeoutExpired:
                self.stopping.kill()
                self.stopping.wait(10)


class Container:
    """One container of the image, its ports published on free loopback ports, optionally with hold points (a
    host folder mounted as MODELSERVER_TEST_HOLD_DIR)."""

    def __init__(
        self,
        image: str,
        volume: str,
        holds: bool = False,
        held: tuple[str, ...] = (),
        stop_timeout: int = 60,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = f"modelserver-test-{uuid.uuid4().hex[:10]}"
        self.hold_dir: Path | None = None
        args = ["run", "-d", "--name", self.name, "-v", f"{volume}:/models"]
        args += ["-p", "127.0.0.1::50051", "-p", "127.0.0.1::8000", "--stop-timeout", str(stop_timeout)]
        if holds or held:
            self.hold_dir = Path(tempfile.mkdtemp(prefix="modelserver-holds-"))
            self.hold_dir.chmod(0o777)  # the server (uid 10001) writes <point>.arrived there
            for point in held:
                (self.hold_dir / point).touch()
            args += ["-v", f"{self.hold_dir}:/holds", "-e", "MODELSERVER_TEST_HOLD_DIR=/holds"]
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        podman(*args, image)
        self.process = _Stopper(self.name, stop_timeout)
        self.port = self._host_port(50051)
        self.metrics_port = self._host_port(8000)
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)

    def _host_port(self, port: int) -> int:
        return int(podman("port", self.name, f"{port}/tcp").stdout.strip().rsplit(":", 1)[1])

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def inspect(self) -> dict:
        return json.loads(podman("inspect", self.name).stdout)[0]

    def health(self) -> str:
        response = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_serving(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.inspect()["State"]["Running"]:
                raise RuntimeError(f"container exited:\n{self.logs()}")
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"not SERVING in time:\n{self.logs()}")

    def metrics_text(self) -> str:
        return scrape(self.metrics_port)

    def metric(self, name: str, **labels: str) -> float:
        return sample_value(self.metrics_text(), name, **labels)

    def hold(self, point: str = "predict") -> None:
        assert self.hold_dir is not None
        (self.hold_dir / point).touch()

    def release(self, point: str = "predict") -> None:
        assert self.hold_dir is not None
        (self.hold_dir / point).unlink(missing_ok=True)

    def arrived(self, point: str) -> int:
        assert self.hold_dir is not None
        try:
            return len((self.hold_dir / f"{point}.arrived").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def wait_arrived(self, count: int, point: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.arrived(point) < count:
            assert self.inspect()["State"]["Running"], f"container exited:\n{self.logs()}"
            assert time.monotonic() < deadline, f"{self.arrived(point)} of {count} calls reached '{point}'"
            time.sleep(0.05)

    def stop(self, timeout: int = 60) -> int:
        """`podman stop` (SIGTERM, SIGKILL after `timeout` s); the container's exit code (137: it was killed)."""
        self.channel.close()
        podman("stop", "--time", str(timeout), self.name, timeout=timeout + 60)
        return self.process.exit_code()

    def remove(self) -> None:
        self.channel.close()
        if self.hold_dir is not None:
            for point in ("predict", "load", "warmup", "export", "import"):
                self.release(point)
        podman("rm", "--force", "--time", "0", self.name, check=False)
        self.process.reap()
        if self.hold_dir is not None:
            shutil.rmtree(self.hold_dir, ignore_errors=True)
