"""A real server whose repository changes under it (issue 21): version 2 of multi_input published and deleted every
way (atomic renames, in-place copies, `rmtree` while it serves, empty and half-written folders) and SIGHUP storms,
while 16 callers infer and a watcher asks OIP ModelReady every 20 ms. Version 1 never leaves the disk, so no call
may fail and no moment may be without a ready version. Each wait fails the test at the first failed call or
not-ready answer, so a broken server fails it in seconds, and every thread it starts is stopped either way."""

from __future__ import annotations

import asyncio
import collections
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tensorflow_serving.apis import get_model_status_pb2

from harness.server import ServerProcess
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from server.registry import repository
from tests.helpers.models import keras_outputs
from tests.helpers.repositories import make_repository, status

CALLERS = 16
CHURN_ROUNDS = 20
ASSET_FOLDERS = 100  # version 2's extra folders: its deletion takes long enough for scans to overtake it
INPUT_A = np.linspace(0, 1, 10, dtype=np.float32).reshape(1, 10)
INPUT_B = np.linspace(1, 0, 20, dtype=np.float32).reshape(1, 20)
REQUEST = pb.PredictMultiInputRequest(input_a=INPUT_A.ravel().tolist(), input_b=INPUT_B.ravel().tolist())
AVAILABLE = get_model_status_pb2.ModelVersionStatus.State.AVAILABLE


@pytest.fixture(scope="module")
def expected(keras_models) -> float:
    """multi_input's answer to REQUEST: versions 1 and 2 are the same weights."""
    return float(keras_outputs(keras_models["multi_input"], {"input_a": INPUT_A, "input_b": INPUT_B})["output"][0, 0])


@pytest.fixture
def repo(tmp_path: Path, server, model_repository: Path) -> Path:
    """A repository of its own with the session's exported built-in models (copied: nothing is exported)."""
    return make_repository(tmp_path, model_repository)


@pytest.fixture
def version_2(tmp_path: Path, model_repository: Path) -> Path:
    """Version 1's files without our manifest (a user's SavedModel: loaded once unchanged over two scans), plus
    many asset folders."""
    folder = tmp_path / "version_2"
    shutil.copytree(model_repository / "multi_input" / "1", folder)
    (folder / repository.MANIFEST).unlink()
    for index in range(ASSET_FOLDERS):
        (folder / "assets.extra" / str(index)).mkdir(parents=True)
        (folder / "assets.extra" / str(index) / "notes.txt").write_text("x" * 100)
    return folder


class Traffic:
    """CALLERS closed-loop callers of multi_input and a readiness watcher, on their own threads until stopped;
    every answer counted on the client side."""

    def __init__(self, server: ServerProcess, expected: float) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.ready_polls = 0
        self.not_ready: list[str] = []
        self._server, self._expected = server, expected
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=lambda: asyncio.run(self._call()), name="race-callers"),
            threading.Thread(target=self._watch, name="race-ready-watcher"),
        ]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not any(t.is_alive() for t in self._threads), "the traffic threads did not stop"

    def check(self) -> None:
        """Fail at the first failed call or not-ready answer."""
        assert not self.failures, f"{len(self.failures)} failed calls, first: {self.failures[:3]}"
        assert not self.not_ready, f"{len(self.not_ready)} not-ready answers, first: {self.not_ready[:3]}"

    async def _call(self) -> None:
        async with grpc.aio.insecure_channel(self._server.target) as channel:
            stub = pb_grpc.ModelServiceStub(channel)

            async def caller() -> None:
                while not self._stop.is_set():
                    try:
                        response = await stub.PredictMultiInput(REQUEST, timeout=30)
                    except grpc.aio.AioRpcError as error:
                        self.failures.append(f"{error.code().name}: {error.details()}")
                        await asyncio.sleep(0.1)  # a failure fails the test; no need to spin on it meanwhile
                        continue
                    self.calls[f"version {response.version}"] += 1
                    if abs(response.output[0] - self._expected) > 1e-5:
                        self.failures.append(f"wrong answer {response.output[0]} from version {response.version}")

            await asyncio.gather(*(caller() for _ in range(CALLERS)))

    def _watch(self) -> None:
        with triton.InferenceServerClient(self._server.target) as client:
            while not self._stop.wait(0.02):
                try:
                    ready = client.is_model_ready("multi_input")
                except Exception as error:  # an error is as much a gap as False
                    self.not_ready.append(repr(error))
                    continue
                self.ready_polls += 1
                if not ready:
                    self.not_ready.append(f"ModelReady false at {time.monotonic():.3f}")


def versions(server: ServerProcess) -> dict[int, int]:
    return {version: state for version, (state, _) in status(server).items()}


def wait_for(what: str, condition: Callable[[], bool], traffic: Traffic, timeout: float = 180) -> None:
    """Poll `condition`, failing at once if the traffic saw a failure (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while not condition():
        traffic.check()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    traffic.check()


@contextmanager
def sighup_storm(server: ServerProcess, every: float = 0.05) -> Iterator[None]:
    """SIGHUP (rescan now) every `every` seconds while the block runs."""
    stop = threading.Event()

    def storm() -> None:
        while not stop.wait(every):
            server.process.send_signal(signal.SIGHUP)

    thread = threading.Thread(target=storm, name="sighup-storm")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def test_no_folder_change_leaves_a_model_without_a_serving_version(repo: Path, version_2: Path, expected) -> None:
    target = repo / "multi_input" / "2"
    with ServerProcess(repo, ["--repository-poll-seconds", "0.1"]) as server:
        server.wait_serving()
        with Traffic(server, expected) as traffic:
            wait_for("calls on version 1", lambda: traffic.calls["version 1"] >= 50, traffic)
            for round_ in range(2):
                # Atomic publish; once version 2 serves (version 1 retired), delete it under a SIGHUP storm: version
                # 1 must load again before version 2 stops serving.
                staging = repo / "multi_input" / f".copy-{round_}"
                shutil.copytree(version_2, staging)
                staging.rename(target)
                wait_for("version 2 alone", lambda: versions(server) == {2: AVAILABLE}, traffic)
                wait_for("calls on version 2", lambda: traffic.calls["version 2"] >= 50, traffic)
                with sighup_storm(server):
                    shutil.rmtree(target)
                    wait_for("version 1 alone", lambda: versions(server) == {1: AVAILABLE}, traffic)
            with sighup_storm(server):
                for index in range(CHURN_ROUNDS):  # atomic, in place, empty, half-written: each deleted under scans
                    staging = repo / "multi_input" / f".churn-{index}"
                    shutil.copytree(version_2, staging)
                    staging.rename(target)
                    shutil.rmtree(target)
                    shutil.copytree(version_2, target)
                    shutil.rmtree(target)
                    target.mkdir()
                    shutil.rmtree(target)
                    shutil.copytree(version_2 / "assets.extra", target / "assets.extra")
                    shutil.rmtree(target)
                    traffic.check()
            served = sum(traffic.calls.values())
            wait_for("calls after the changes", lambda: sum(traffic.calls.values()) >= served + 50, traffic)
            wait_for("version 1 alone", lambda: versions(server) == {1: AVAILABLE}, traffic)
        traffic.check()
        assert traffic.ready_polls > 0 and traffic.calls["version 1"] > 0 and traffic.calls["version 2"] > 0
