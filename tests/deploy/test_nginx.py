"""The replicated topology natively: a real nginx (Debian's) with deploy/nginx/nginx.conf adapted to loopback in
front of two server processes that share a model repository exported once by the compose `model-export` step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from harness.deploy_native import NginxProcess, wait_until
from harness.server import REPO_ROOT, ServerProcess
from tests.helpers.closedloop import ClosedLoop
from tests.helpers.deploy_files import compose_model

OK_CALLS = {"model": "multi_input", "method": "typed.PredictMultiInput", "code": "OK"}


# The compose file's drain settings (shutdown delay, grace period), so that replicas stop as they would there.
DRAIN_SETTINGS = {
    name: value
    for name, value in compose_model()["services"]["server"]["environment"].items()
    if name in ("MODELSERVER_SHUTDOWN_DELAY", "MODELSERVER_GRACE_PERIOD")
}


class Replicas:
    """Two servers, restartable one at a time: each first binds port 0, and a restart takes that port back (nginx's
    upstream names it). A context manager: every replica started, the first ones of a failed start included, is
    killed when the block ends."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self.servers: list[ServerProcess] = []
        try:
            for _ in range(2):
                self.servers.append(self._start(0))
        except BaseException:
            self.kill()
            raise
        self.ports = [server.port for server in self.servers]

    def __enter__(self) -> Replicas:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.kill()

    def _start(self, port: int) -> ServerProcess:
        server = ServerProcess(self.repository, ["--grpc-port", str(port)], env=DRAIN_SETTINGS)
        try:
            server.wait_serving()
        except BaseException:
            server.kill()
            raise
        return server

    def restart(self, index: int, kill: bool = False) -> int:
        """SIGTERM (or SIGKILL) the replica, wait for it to exit, start it again on its port; returns the old
        one's exit code."""
        old = self.servers[index]
        if kill:
            old.kill()
        code = old.process.returncode if kill else old.stop()
        old.kill()  # reaped, channel closed (a no-op after a clean stop)
        self.servers[index] = self._start(self.ports[index])
        return code

    def wait_for_calls(self, index: int) -> None:
        """Until nginx sends calls to the (re)started replica again: it took its port back."""
        wait_until(
            lambda: self.servers[index].metric("modelserver_requests_total", **OK_CALLS) >= 50,
            60,
            f"calls to reach restarted replica {index}",
        )

    def ok_calls(self) -> list[float]:
        return [server.metric("modelserver_requests_total", **OK_CALLS) for server in self.servers]

    def kill(self) -> None:
        """Kill every replica, even when killing one of them fails (that failure is raised afterwards)."""
        failures: list[BaseException] = []
        for server in self.servers:
            try:
                server.kill()
            except Exception as error:  # each replica, whatever the others do
                failures.append(error)
        if failures:
            raise failures[0]


@pytest.fixture(scope="module")
def exported_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository written by deploy/docker/export_models.py, as compose's model-export step writes the volume."""
    repository = tmp_path_factory.mktemp("shared_models")
    command = [sys.executable, "deploy/docker/export_models.py", "--model-repository", str(repository)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.count(": exported in") == 3, result.stdout + result.stderr
    return repository


@pytest.fixture(scope="module")
def replicas(exported_repository: Path) -> Iterator[Replicas]:
    with Replicas(exported_repository) as group:
        yield group


@pytest.fixture(scope="module")
def nginx(replicas: Replicas, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxProcess]:
    process = NginxProcess(tmp_path_factory.mktemp("nginx"), [f"127.0.0.1:{port}" for port in replicas.ports])
    try:
        yield process
    finally:
        process.stop()


def test_replicas_load_the_exported_models_without_exporting(replicas: Replicas) -> None:
    for server in replicas.servers:
        assert "exported" not in server.log_text()


def test_load_through_nginx_reaches_both_replicas(nginx: NginxProcess, replicas: Replicas, tmp_path: Path) -> None:
    before = replicas.ok_calls()
    summary = tmp_path / "loadtest.json"
    command = [sys.executable, "-m", "clients", "--target", nginx.target, "loadtest", "multi_input"]
    command += ["--concurrency", "8", "--requests", "400", "--no-progress", "--json", str(summary)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    load = json.loads(summary.read_text())
    assert (load["ok"], load["errors"]) == (400, {})
    served = [after - b for after, b in zip(replicas.ok_calls(), before, strict=True)]
    assert sum(served) == 400, served  # every call reached exactly one replica, none was retried
    assert min(served) > 0, f"nginx sent every call to one replica: {served}"


# What gRPC itself reports when a call dies on the way (the client's connection to nginx, or nginx's to a
# replica): such failures would be the proxy's doing, which the shipped nginx settings rule out.
TRANSPORT_FAILURES = ("GOAWAY", "Socket closed", "Connection reset", "failed to connect", "Stream removed", "reachable")
# The UNAVAILABLE a replica answers itself while it loads its models (ModelManager.resolve).
STILL_LOADING = ("the server is starting", "is loading; retry shortly")


def test_rolling_restart_under_load(nginx: NginxProcess, replicas: Replicas) -> None:
    """SIGTERM one replica, start it again, wait for SERVING and for nginx to send it calls, then the other, while
    two closed loops run through nginx: callers that never retry and callers with the project's retry policy.

    nginx retries a call on the next replica only when it could not hand it to one (connection refused, or lost
    before the call went out: the shipped `grpc_next_upstream error timeout non_idempotent`); a draining
    replica's own UNAVAILABLE answer is a
    gRPC response, which nginx passes on, and open-source nginx has no active health check to stop routing to a
    replica during its shutdown delay. So callers that never retry can see a few UNAVAILABLE (counted and
    printed); callers that retry UNAVAILABLE, as the project's clients do, must see no failure from the drain (a
    restarted replica still loading is another matter: below).
    """
    answered_before, errors_before = nginx.access_counts(), len(nginx.errors())
    with (
        ClosedLoop(nginx.target, concurrency=6, max_seconds=240) as plain,
        ClosedLoop(nginx.target, concurrency=4, max_seconds=240, retries=3) as retrying,
    ):
        wait_until(lambda: plain.total >= 200 and retrying.total >= 100, 60, "the loads to run")
        for index in range(2):
            assert replicas.restart(index) == 0, replicas.servers[index].log_text()
            replicas.wait_for_calls(index)  # before the next one stops
    plain_codes, retrying_codes = plain.stop(), retrying.stop()  # stopped already: their final counts
    print(f"rolling restart through nginx: no retry {dict(plain_codes)}; with retries {dict(retrying_codes)}")
    # Both loads ran before the restarts (the wait above) and reached each restarted replica (wait_for_calls).
    assert plain_codes["OK"] >= 200 and retrying_codes["OK"] >= 100, (plain_codes, retrying_codes)
    # A restarted replica listens before its models are loaded, and nginx (no active health check) sends it calls
    # again once its fail_timeout (10 s) has passed: it answers them UNAVAILABLE itself (STILL_LOADING). Pinned to one
    # busy core its start outlasts that, and a retrying caller's four attempts can all meet it (seen once in a full
    # pinned run). That is the start (the kill test below counts such answers for callers that never retry); this
    # test is about the drain.
    starting = [f for f in retrying.failures if any(marker in f for marker in STILL_LOADING)]
    print(f"retrying callers' calls answered 'starting' by a replica still loading: {len(starting)}")
    others = [f for f in retrying.failures if f not in starting]
    assert others == [], f"retrying callers saw failures: {sorted(set(others))[:5]}"
    # Never an error. A CANCELLED is gRPC's, for a call that reached a replica in the instant its listener closed
    # (README, Health and shutdown; about one restart in eight): callers with the retry policy resend it.
    assert set(plain_codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, dict(plain_codes)
    made_on_the_way = [f for f in plain.failures if any(marker in f for marker in TRANSPORT_FAILURES)]
    assert made_on_the_way == [], made_on_the_way[:5]
    answered = nginx.access_counts() - answered_before
    # nginx's own answers (HTTP 200, no upstream grpc-status) are its UNAVAILABLE: a call caught in the instant a
    # replica's listener closed (README, Health and shutdown); every other failure was a replica's own answer.
    assert {status for status, _ in answered} == {"200"}, answered
    unavailable = answered[("200", "")] + sum(n for (_, grpc_status), n in answered.items() if grpc_status == "14")
    assert unavailable >= len(plain.failures), answered
    assert nginx.errors()[errors_before:] == [], nginx.errors()[errors_before:][:5]


def test_a_killed_replica_loses_only_the_calls_it_was_reading(nginx: NginxProcess, replicas: Replicas) -> None:
    """SIGKILL one replica under load, then start it again. nginx streams gRPC request bodies, so it cannot resend
    a call the replica had started reading: callers that never retry lose at most the calls they had in flight
    there (one per caller), as nginx's own UNAVAILABLE; callers with the retry policy lose nothing.

    Once nginx's fail_timeout (10 s) has passed it tries the replica again, and a replica still loading its models
    answers UNAVAILABLE itself (STILL_LOADING): how many such answers a caller that never retries sees
    depends on how long the start takes (none when it is quick, about 50 on one busy core), so those are told
    apart by their message, not counted."""
    before = nginx.access_counts()
    with (
        ClosedLoop(nginx.target, concurrency=6, max_seconds=240) as plain,
        ClosedLoop(nginx.target, concurrency=4, max_seconds=240, retries=3) as retrying,
    ):
        wait_until(lambda: plain.total >= 200 and retrying.total >= 100, 60, "the loads to run")
        assert replicas.restart(0, kill=True) == -9
        replicas.wait_for_calls(0)
    plain_codes, retrying_codes = plain.stop(), retrying.stop()  # stopped already: their final counts
    print(f"replica killed behind nginx: no retry {dict(plain_codes)}; with retries {dict(retrying_codes)}")
    assert retrying.failures == [], f"retrying callers saw failures: {sorted(set(retrying.failures))[:5]}"
    assert set(plain_codes) <= {"OK", "UNAVAILABLE"}, dict(plain_codes)
    lost = [failure for failure in plain.failures if "no modelserver replica reachable" in failure]
    starting = [failure for failure in plain.failures if any(words in failure for words in STILL_LOADING)]
    assert len(lost) + len(starting) == len(plain.failures), sorted(set(plain.failures))[:5]
    assert len(lost) <= 6, f"{len(lost)} calls lost with the killed replica, more than the 6 callers had in flight"
    nginx_answered = (nginx.access_counts() - before)[("200", "")]  # the shipped error_page: grpc-status 14
    assert nginx_answered >= len(lost), (nginx_answered, lost)
