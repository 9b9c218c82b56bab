"""Model lifecycle (server/registry/manager.py): new versions served without a restart or a failed call, broken and
half-written versions harmless, one answer to "is it ready?" from every protocol, repository control, version
policies, and `.keras` files. Real servers on real repositories; the test holds loading or the model where a
moment matters, and otherwise waits (bounded) for what the server reports."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tensorflow_serving.apis import get_model_status_pb2
from tritonclient.utils import InferenceServerException

from harness.backoff import Backoff
from harness.server import REPO_ROOT, ServerProcess
from models.registry import BUILTIN_MODELS
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from server.registry import repository
from tests.helpers.models import keras_outputs
from tests.helpers.repositories import make_repository, status

OTHER_SEED = 99  # version 2 is exported with another seed, so its answers differ from version 1's
CALLERS = 64
POLL = ["--repository-poll-seconds", "0.1"]
INPUT_A = np.linspace(0, 1, 10, dtype=np.float32).reshape(1, 10)
INPUT_B = np.linspace(1, 0, 20, dtype=np.float32).reshape(1, 20)
REQUEST = pb.PredictMultiInputRequest(input_a=INPUT_A.ravel().tolist(), input_b=INPUT_B.ravel().tolist())
State = get_model_status_pb2.ModelVersionStatus.State


@pytest.fixture(scope="module")
def exported(server, model_repository) -> Path:
    """The session's repository, once the session's server has exported the built-in models into it."""
    return model_repository


@pytest.fixture(scope="module")
def other_version(tmp_path_factory) -> Path:
    """multi_input exported with OTHER_SEED, kept aside: tests copy it into their repositories."""
    folder = tmp_path_factory.mktemp("other_version") / "multi_input" / "2"
    repository.export_saved_model(BUILTIN_MODELS["multi_input"].build(OTHER_SEED), folder, OTHER_SEED)
    return folder


@pytest.fixture(scope="module")
def expected() -> dict[int, float]:
    """multi_input's answer to REQUEST from each version's weights (version 1: the default seed)."""
    inputs = {"input_a": INPUT_A, "input_b": INPUT_B}
    build = BUILTIN_MODELS["multi_input"].build
    return {v: float(keras_outputs(build(seed), inputs)["output"][0, 0]) for v, seed in ((1, 1234), (2, OTHER_SEED))}


def publish(source: Path, target: Path) -> None:
    """Copy a version into place atomically: into a hidden folder first, then renamed (README: repository)."""
    staging = target.parent / f".copy-{target.name}"
    shutil.copytree(source, staging)
    staging.rename(target)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Callers:
    """CALLERS closed-loop callers of multi_input (a version, or 0 = latest) on their own thread's event loop,
    every answer recorded as (code, version) and every OK answer checked against `expected`. A failed call is
    retried after a back-off, as a real client's would be.

    A context manager: leaving the block stops the callers and joins their thread, at once (calls in flight
    cancelled) when the block raised, so a failed assertion never leaves 64 callers running for minutes and
    pytest waiting for them at exit (issue 21)."""

    def __init__(self, server: ServerProcess, expected: dict[int, float], version: int = 0) -> None:
        self.outcomes: collections.Counter[tuple[str, int]] = collections.Counter()
        self.wrong: list[tuple[int, float]] = []
        self._server, self._expected, self._version = server, expected, version
        self._stopping = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()  # set on the loop by stop(): a caller backing off stops waiting
        self._task = self._loop.create_task(self._run())
        self._thread = threading.Thread(target=self._serve, name=f"callers-of-version-{version}")
        self._thread.start()

    def __enter__(self) -> Callers:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop(at_once=exc_type is not None)

    def _serve(self) -> None:
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass  # stopped at once
        finally:
            self._loop.close()

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self._server.target) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            request = pb.PredictMultiInputRequest()
            request.CopyFrom(REQUEST)
            request.version = self._version

            async def caller() -> None:
                backoff = Backoff()
                deadline = time.monotonic() + 300
                while not self._stopping.is_set() and time.monotonic() < deadline:
                    try:
                        response = await stub.PredictMultiInput(request, timeout=60)
                    except grpc.aio.AioRpcError as error:
                        self.outcomes[(error.code().name, 0)] += 1
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), backoff.delay())
                        continue
                    backoff.reset()
                    self.outcomes[("OK", response.version)] += 1
                    if abs(response.output[0] - self._expected.get(response.version, np.nan)) > 1e-5:
                        self.wrong.append((response.version, response.output[0]))

            await asyncio.gather(*(caller() for _ in range(CALLERS)))

    def total(self, version: int | None = None) -> int:
        outcomes = list(self.outcomes.items())  # one copy: the callers' thread adds keys meanwhile
        return sum(n for (code, v), n in outcomes if version is None or v == version)

    def stop(self, at_once: bool = False) -> collections.Counter[tuple[str, int]]:
        """Stop every caller after its current call, or `at_once` (calls in flight cancelled, not counted); join
        their thread either way. Idempotent."""
        self._stopping.set()
        self._signal(self._task.cancel if at_once else self._wake.set)
        self._thread.join(30 if at_once else 90)  # without at_once: a call in flight ends by its 60 s timeout
        if self._thread.is_alive():
            self._signal(self._task.cancel)
            self._thread.join(30)
        assert not self._thread.is_alive(), "the callers' thread did not stop"
        return self.outcomes

    def _signal(self, callback: Callable[[], object]) -> None:
        """Run `callback` on the callers' loop (nothing to do once the loop has ended)."""
        with contextlib.suppress(RuntimeError):  # "Event loop is closed": the callers are done
            self._loop.call_soon_threadsafe(callback)


def test_a_new_version_is_served_without_a_failed_call_and_the_old_one_retires(
    tmp_path, exported, other_version, expected
):
    repo = make_repository(tmp_path, exported)
    server = ServerProcess(repo, POLL, holds=True)
    try:
        server.wait_serving()
        with Callers(server, expected) as callers:
            wait_for("the callers to run on version 1", lambda: callers.total(1) >= 200)
            server.hold("load")  # the test sees version 2 loading while version 1 serves
            publish(other_version, repo / "multi_input" / "2")
            server.wait_arrived(1, "load")
            assert status(server) == {1: (State.AVAILABLE, ""), 2: (State.LOADING, "")}
            served_while_loading = callers.total(1)
            wait_for("calls while version 2 loads", lambda: callers.total(1) >= served_while_loading + 200)
            assert callers.total(2) == 0, "version 2 answered before it was available"
            server.release("load")
            wait_for("version 1 to retire", lambda: status(server) == {2: (State.AVAILABLE, "")})
            wait_for("calls on version 2", lambda: callers.total(2) >= 200)
            outcomes = callers.stop()
        assert {code for code, _ in outcomes} == {"OK"}, outcomes
        assert callers.wrong == [], callers.wrong[:5]
        assert server.metric("modelserver_model_ready", model="multi_input", version="2") == 1
        assert 'modelserver_model_ready{model="multi_input",version="1"}' not in server.metrics_text()

        # Version 2 removed from disk while callers pin it: version 1 comes back, 2 retires, nothing is lost.
        with Callers(server, expected, version=2) as pinned:
            wait_for("pinned calls", lambda: pinned.total(2) >= 200)
            shutil.rmtree(repo / "multi_input" / "2")
            wait_for("version 2 to retire", lambda: status(server) == {1: (State.AVAILABLE, "")})
            wait_for("calls refused once it retired", lambda: pinned.outcomes[("NOT_FOUND", 0)] > 0)
            outcomes = pinned.stop()
        assert set(outcomes) <= {("OK", 2), ("NOT_FOUND", 0)}, outcomes
        assert pinned.wrong == []
        assert server.stop() == 0
    finally:
        server.kill()


def test_broken_and_half_copied_versions_are_never_served(tmp_path, exported, other_version, expected):
    repo = make_repository(tmp_path, exported)
    publish(other_version, repo / "multi_input" / "2")
    server = ServerProcess(repo, POLL)
    try:
        server.wait_serving()
        stub = pb_grpc.ModelServiceStub(server.channel)
        assert stub.PredictMultiInput(REQUEST, timeout=10).version == 2
        # A corrupt version 3 (garbage where the graph should be).
        broken = repo / "multi_input" / ".broken"
        broken.mkdir()
        (broken / repository.SAVED_MODEL_FILE).write_bytes(b"not a SavedModel")
        broken.rename(repo / "multi_input" / "3")
        wait_for("version 3 to fail", lambda: status(server).get(3, (0, ""))[0] == State.END)
        state, error = status(server)[3]
        assert "cannot load model 'multi_input' version 3" in error and str(tmp_path) not in error
        assert status(server)[2] == (State.AVAILABLE, "")
        with triton.InferenceServerClient(server.target) as client:
            index = {(m.name, m.version): m for m in client.get_model_repository_index(as_json=False).models}
            assert (
                index[("multi_input", "3")].state == "UNAVAILABLE" and "version 3" in index[("multi_input", "3")].reason
            )
            assert index[("multi_input", "2")].state == "READY"
            assert not client.is_model_ready("multi_input", "3") and client.is_model_ready("multi_input", "2")
        assert stub.PredictMultiInput(REQUEST, timeout=10).version == 2
        # Half-copied: the copy of a good version, its manifest there but a file still missing.
        shutil.rmtree(repo / "multi_input" / "3")
        half = repo / "multi_input" / ".half"
        shutil.copytree(other_version, half)
        missing = next(p for p in sorted(half.rglob("*")) if p.is_file() and p.name != repository.MANIFEST)
        content = missing.read_bytes()
        missing.unlink()
        half.rename(repo / "multi_input" / "3")
        missing = repo / "multi_input" / "3" / missing.relative_to(half)
        wait_for("the half copy to be refused", lambda: "manifest" in status(server).get(3, (0, ""))[1])
        assert stub.PredictMultiInput(REQUEST, timeout=10).version == 2
        # The copy completes: version 3 loads and serves (version 2's weights, so version 2's answers).
        missing.write_bytes(content)
        wait_for("version 3 to serve", lambda: status(server) == {3: (State.AVAILABLE, "")})
        response = stub.PredictMultiInput(REQUEST, timeout=10)
        assert response.version == 3 and abs(response.output[0] - expected[2]) < 1e-5
    finally:
        server.kill()


def readiness(server: ServerProcess, version: int = 1) -> dict[str, object]:
    """Every readiness reader at one moment."""
    with triton.InferenceServerClient(server.target) as client:
        oip = (client.is_server_ready(), client.is_model_ready("multi_input"))
    try:
        listed = pb_grpc.ModelServiceStub(server.channel).ListModels(pb.ListModelsRequest(), timeout=10)
        listing = {m.name: m.ready for m in listed.models}["multi_input"]
    except grpc.RpcError as error:
        listing = error.code().name
    try:
        state = {v: s for v, (s, _) in status(server).items()}
    except grpc.RpcError as error:
        state = error.code().name
    return {
        "health": (server.health(), server.health("multi_input")),
        "oip": oip,
        "metric": server.metric("modelserver_model_ready", model="multi_input", version=str(version)),
        "list": listing,
        "tf_serving": state,
    }


def test_every_readiness_reader_agrees_at_each_step(tmp_path, exported, other_version):
    repo = make_repository(tmp_path, exported)
    server = ServerProcess(repo, [*POLL, "--shutdown-delay", "60"], held=["load"])
    try:
        server.wait_arrived(1, "load")  # loading
        assert readiness(server) == {
            "health": ("NOT_SERVING", "NOT_SERVING"), "oip": (False, False), "metric": 0.0,
            "list": "UNAVAILABLE", "tf_serving": {1: State.LOADING},
        }  # fmt: skip
        server.release("load")
        server.wait_serving()
        serving = {
            "health": ("SERVING", "SERVING"), "oip": (True, True), "metric": 1.0, "list": True,
            "tf_serving": {1: State.AVAILABLE},
        }  # fmt: skip
        assert readiness(server) == serving
        server.hold("load")  # a switch: version 2 loads while version 1 serves
        publish(other_version, repo / "multi_input" / "2")
        server.wait_arrived(2, "load")
        assert readiness(server) == {**serving, "tf_serving": {1: State.AVAILABLE, 2: State.LOADING}}
        server.release("load")
        wait_for("the switch", lambda: status(server) == {2: (State.AVAILABLE, "")})
        assert readiness(server, version=2) == {**serving, "tf_serving": {2: State.AVAILABLE}}
        server.process.send_signal(signal.SIGTERM)  # the shutdown delay: not ready, still serving
        wait_for("NOT_SERVING", lambda: server.health() == "NOT_SERVING")
        assert readiness(server, version=2) == {
            "health": ("NOT_SERVING", "NOT_SERVING"), "oip": (False, False), "metric": 0.0, "list": False,
            "tf_serving": {2: State.UNLOADING},
        }  # fmt: skip
        assert pb_grpc.ModelServiceStub(server.channel).PredictMultiInput(REQUEST, timeout=10).version == 2
    finally:
        server.kill()


def test_repository_control_through_tritonclient_with_and_without_a_token(tmp_path, exported):
    repo = make_repository(tmp_path, exported)
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    args = ["--repository-control", "true", "--auth-token-file", str(tokens), "--repository-poll-seconds", "0"]
    server = ServerProcess(repo, args)
    try:
        server.wait_serving()
        with triton.InferenceServerClient(server.target) as client:
            with pytest.raises(InferenceServerException) as caught:
                client.unload_model("shared_layer")
            assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
            headers = {"authorization": "Bearer s3cret"}
            index = client.get_model_repository_index(headers=headers, as_json=True)["models"]
            assert {(m["name"], m["version"], m["state"]) for m in index} == {
                ("multi_input", "1", "READY"),
                ("shared_layer", "1", "READY"),
                ("residual_cnn", "1", "READY"),
            }
            client.unload_model("shared_layer", headers=headers)
            wait_for("the unload", lambda: not client.is_model_ready("shared_layer", headers=headers))
            assert client.is_model_ready("multi_input", headers=headers)
            index = client.get_model_repository_index(headers=headers, as_json=True)["models"]
            assert {m["name"]: m["state"] for m in index}["shared_layer"] == "UNAVAILABLE"
            assert server.health("shared_layer") == "NOT_SERVING" and server.health() == "SERVING"
            client.load_model("shared_layer", headers=headers)
            assert client.is_model_ready("shared_layer", headers=headers)
            with pytest.raises(InferenceServerException) as caught:
                client.load_model("no_such_model", headers=headers)
            assert caught.value.status() == "StatusCode.NOT_FOUND"
    finally:
        server.kill()


def test_version_policies_latest_two_all_and_specific(tmp_path, exported, other_version, expected):
    repo = make_repository(tmp_path, exported)
    publish(other_version, repo / "multi_input" / "2")
    shutil.copytree(exported / "shared_layer" / "1", repo / "shared_layer" / "2")
    shutil.copytree(exported / "shared_layer" / "1", repo / "shared_layer" / "3")
    args = ["--version-policy", "latest:2", "--model-version-policy", "shared_layer=specific:1/3"]
    server = ServerProcess(repo, args)
    try:
        server.wait_serving()
        stub = pb_grpc.ModelServiceStub(server.channel)
        for version, want in ((0, 2), (1, 1), (2, 2)):
            request = pb.PredictMultiInputRequest()
            request.CopyFrom(REQUEST)
            request.version = version
            response = stub.PredictMultiInput(request, timeout=10)
            assert response.version == want and abs(response.output[0] - expected[want]) < 1e-5
        assert status(server) == {1: (State.AVAILABLE, ""), 2: (State.AVAILABLE, "")}
        assert status(server, "shared_layer") == {1: (State.AVAILABLE, ""), 3: (State.AVAILABLE, "")}
        shared = pb.PredictSharedLayerRequest(input_a=REQUEST.input_a, input_b=REQUEST.input_b, version=2)
        with pytest.raises(grpc.RpcError) as caught:
            stub.PredictSharedLayer(shared, timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "loaded versions: 1, 3" in caught.value.details()
        shared.version = 0
        assert stub.PredictSharedLayer(shared, timeout=10).version == 3
    finally:
        server.kill()


def test_a_keras_file_is_served_through_every_protocol_and_the_cli(tmp_path, exported):
    import keras
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    keras.utils.set_random_seed(5)
    left = keras.Input((4,), name="left")
    right = keras.Input((3,), name="right")
    joined = keras.layers.Concatenate()([left, right])
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(joined)
    score = keras.layers.Dense(1, activation="sigmoid", name="score")(hidden)
    classes = keras.layers.Dense(3, activation="softmax", name="classes")(hidden)
    model = keras.Model(inputs=[left, right], outputs=[score, classes], name="two_heads")
    repo = make_repository(tmp_path, exported)
    (repo / "two_heads" / "1").mkdir(parents=True)
    model.save(repo / "two_heads" / "1" / "model.keras")
    x = {"left": np.random.default_rng(1).random((3, 4), np.float32),
         "right": np.random.default_rng(2).random((3, 3), np.float32)}  # fmt: skip
    want = dict(zip(model.output_names, [np.asarray(v) for v in model(x)], strict=True))
    server = ServerProcess(repo)
    try:
        server.wait_serving()
        with triton.InferenceServerClient(server.target) as client:
            meta = client.get_model_metadata("two_heads", as_json=True)
            assert meta["platform"] == "keras"  # what it is, not what it is served as
            assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
                ("left", "FP32", ["-1", "4"]), ("right", "FP32", ["-1", "3"])
            ]  # fmt: skip
            assert sorted(o["name"] for o in meta["outputs"]) == ["classes", "score"]
            tensors = []
            for name, array in x.items():
                tensors.append(triton.InferInput(name, list(array.shape), "FP32"))
                tensors[-1].set_data_from_numpy(array)
            result = client.infer("two_heads", tensors)
            for name, value in want.items():
                np.testing.assert_allclose(result.as_numpy(name), value, atol=1e-5)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "two_heads"
        for name, array in x.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
        response = prediction_service_pb2_grpc.PredictionServiceStub(server.channel).Predict(request, timeout=10)
        for name, value in want.items():
            np.testing.assert_allclose(tf.make_ndarray(response.outputs[name]), value, atol=1e-5)
        cli = subprocess.run(
            [sys.executable, "-m", "clients", "--target", server.target, "predict", "two_heads", "--json",
             '{"left": [[0.1, 0.2, 0.3, 0.4]], "right": [[0.5, 0.6, 0.7]]}'],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        one = {"left": np.array([[0.1, 0.2, 0.3, 0.4]], np.float32), "right": np.array([[0.5, 0.6, 0.7]], np.float32)}
        printed = json.loads(cli.stdout)
        for name, value in zip(model.output_names, model(one), strict=True):
            np.testing.assert_allclose(np.asarray(printed[name]), np.asarray(value), atol=1e-5)
    finally:
        server.kill()


def test_every_readiness_reader_agrees_while_draining(tmp_path, exported):
    """After the signal and the in-transit window the server refuses new calls while it finishes accepted ones:
    held here by the test, so that every reader is sampled while the drain is on."""
    server = ServerProcess(make_repository(tmp_path, exported), holds=True)
    try:
        server.wait_serving()
        stub = pb_grpc.ModelServiceStub(server.channel)
        server.hold()
        accepted = stub.PredictMultiInput.future(REQUEST, timeout=120)
        server.wait_arrived(1)
        server.process.send_signal(signal.SIGTERM)
        # The drain is on once a new call is refused (calls accepted just after the signal wait in the model too).
        probes: list[grpc.Future] = []
        deadline = time.monotonic() + 60
        while not any(p.done() and p.exception() is not None for p in probes):
            assert time.monotonic() < deadline, "the server never refused a new call"
            probes.append(stub.PredictMultiInput.future(REQUEST, timeout=120))
            time.sleep(0.02)
        refused = next(p.exception() for p in probes if p.done() and p.exception() is not None)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.details()
        assert readiness(server) == {
            "health": ("NOT_SERVING", "NOT_SERVING"), "oip": (False, False), "metric": 0.0, "list": False,
            "tf_serving": {1: State.UNLOADING},
        }  # fmt: skip
        assert not accepted.done()
        server.release()
        assert accepted.result(timeout=60).version == 1
        assert all(p.exception(timeout=60) is None or p.exception().code() == grpc.StatusCode.UNAVAILABLE
                   for p in probes)  # fmt: skip
        assert server.process.wait(60) == 0
    finally:
        server.kill()
