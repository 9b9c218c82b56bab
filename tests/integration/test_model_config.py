"""TF Serving's model config file and version labels, against a real server (issue 24): a canary roll-out moved by
HandleReloadConfigRequest under 32 callers, and a config that adds and removes models while serving, refusing an
invalid one whole. Clients are TF Serving's own stubs.

The models are tiny SavedModels whose answer says which version gave it: version v computes x * v + v.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from harness.server import ServerProcess, serving
from tests.helpers.models import rpc_error

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
UNLOADING = get_model_status_pb2.ModelVersionStatus.UNLOADING


class _Versioned(tf.Module):
    def __init__(self, version: int) -> None:
        super().__init__()
        self.v = tf.Variable(float(version))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x):
        return {"y": x * self.v + self.v}


def _export(base_path: Path, version: int) -> None:
    module = _Versioned(version)
    tf.saved_model.save(module, str(base_path / str(version)), signatures={"serving_default": module.serve})


def _expected(x: np.ndarray, version: int) -> np.ndarray:
    return x * version + version


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Model folders, each in a folder of its own: canary (versions 1-3), alpha, beta, gamma (version 1 each)."""
    root = tmp_path_factory.mktemp("model_config")
    paths = {"canary": root / "team_a" / "canary", "alpha": root / "team_a" / "alpha"}
    paths |= {"beta": root / "team_b" / "beta", "gamma": root / "team_c" / "gamma"}
    for version in (1, 2, 3):
        _export(paths["canary"], version)
    for name in ("alpha", "beta", "gamma"):
        _export(paths[name], 1)
    return paths


def _entry(name: str, path: Path, versions: tuple[int, ...] = (), **labels: int) -> str:
    policy = f"model_version_policy {{ specific {{ {' '.join(f'versions: {v}' for v in versions)} }} }}"
    labelled = " ".join(f"version_labels {{ key: '{k}' value: {v} }}" for k, v in labels.items())
    policy = policy if versions else ""
    return f"config {{ name: '{name}' base_path: '{path}' model_platform: 'tensorflow' {policy} {labelled} }}"


def _config(*entries: str) -> str:
    return "model_config_list { " + " ".join(entries) + " }"


def _reload(server: ServerProcess, text: str) -> model_management_pb2.ReloadConfigResponse:
    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(text, request.config)
    return model_service_pb2_grpc.ModelServiceStub(server.channel).HandleReloadConfigRequest(request, timeout=120)


def _predict(
    server: ServerProcess, model: str, x: np.ndarray, timeout: float = 30, **spec
) -> predict_pb2.PredictResponse:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, value in spec.items():
        setattr(request.model_spec, key, value)
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    return prediction_service_pb2_grpc.PredictionServiceStub(server.channel).Predict(request, timeout=timeout)


def _states(server: ServerProcess, model: str, **spec) -> dict[int, int]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    for key, value in spec.items():
        setattr(request.model_spec, key, value)
    response = model_service_pb2_grpc.ModelServiceStub(server.channel).GetModelStatus(request, timeout=10)
    return {s.version: s.state for s in response.model_version_status}


@pytest.fixture
def config_file(tmp_path) -> Path:
    return tmp_path / "models.config"


def _server(config_file: Path, text: str, *args: str, **options) -> AbstractContextManager[ServerProcess]:
    config_file.write_text(text)
    return serving(
        config_file.parent / "unused_repository", ["--model-config-file", str(config_file), *args], **options
    )


def test_a_canary_moves_by_label_under_32_callers(folders, config_file):
    """versions 1 and 2 loaded, stable -> 1, canary -> 2; the config then loads 3, moves canary -> 3 and then stable
    -> 3 (retiring 1 and 2): every call by label succeeds, and each answer comes from the version its label named
    at that moment (before the move that version, after it the new one, while the reload ran either)."""
    path = folders["canary"]
    start = _config(_entry("canary", path, (1, 2), stable=1, canary=2))
    moves: dict[str, tuple[float, float]] = {}  # label -> (reload sent, reload answered), on the monotonic clock
    results: list[tuple[str, float, float, int, bool]] = []  # label, sent, answered, version, output right
    failures: list[str] = []
    with _server(config_file, start, "--repository-poll-seconds", "0") as server:
        assert _states(server, "canary") == {1: AVAILABLE, 2: AVAILABLE}
        assert _states(server, "canary", version_label="canary") == {2: AVAILABLE}
        assert server.metric("modelserver_version_label_info", model="canary", label="stable", version="1") == 1
        metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        metadata.model_spec.name, metadata.model_spec.version_label = "canary", "canary"
        stub = prediction_service_pb2_grpc.PredictionServiceStub(server.channel)
        assert stub.GetModelMetadata(metadata, timeout=10).model_spec.version.value == 2
        # The same labels over TF Serving's REST API: /v1/models/{m}/labels/{l}[/metadata | :predict].
        rest = f"{server.http_url}/v1/models/canary/labels"
        status = requests.get(f"{rest}/canary", timeout=10).json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in status] == [("2", "AVAILABLE")]
        assert requests.get(f"{rest}/stable/metadata", timeout=10).json()["model_spec"]["version"] == "1"
        x = np.full((1, 4), 3, np.float32)
        for label, version in (("stable", 1), ("canary", 2)):
            reply = requests.post(f"{rest}/{label}:predict", json={"instances": x.tolist()}, timeout=30)
            assert reply.status_code == 200, reply.text
            np.testing.assert_allclose(np.asarray(reply.json()["predictions"]), _expected(x, version), rtol=1e-6)
        unknown = requests.post(f"{rest}/beta:predict", json={"instances": x.tolist()}, timeout=30)
        assert unknown.status_code == 404 and "its labels: canary -> 2, stable -> 1" in unknown.json()["error"]
        error = rpc_error(_predict, server, "canary", np.ones((1, 4), np.float32), version_label="beta")
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == (
            "Unrecognized servable version label: beta: model 'canary' has no version label 'beta'; its labels: "
            "canary -> 2, stable -> 1"
        )
        stop = threading.Event()

        def caller(index: int) -> None:
            label = ("stable", "canary")[index % 2]
            x = np.full((1, 4), index, np.float32)
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = _predict(server, "canary", x, version_label=label)
                except grpc.RpcError as error:
                    failures.append(f"{label}: {error.code()} {error.details()}")
                    continue
                version = response.model_spec.version.value
                right = np.allclose(tf.make_ndarray(response.outputs["y"]), _expected(x, version))
                results.append((label, sent, time.monotonic(), version, right))

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1)
            _reload(server, _config(_entry("canary", path, (1, 2, 3), stable=1, canary=2)))  # load 3 first
            assert _states(server, "canary")[3] == AVAILABLE
            time.sleep(1)
            sent = time.monotonic()
            assert (
                _reload(server, _config(_entry("canary", path, (1, 2, 3), stable=1, canary=3))).status.error_code == 0
            )
            moves["canary"] = (sent, time.monotonic())
            time.sleep(1)
            sent = time.monotonic()
            _reload(server, _config(_entry("canary", path, (3,), stable=3, canary=3)))
            moves["stable"] = (sent, time.monotonic())
            time.sleep(1)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert server.metric("modelserver_version_label_info", model="canary", label="stable", version="1") == 0
        assert server.metric("modelserver_version_label_info", model="canary", label="stable", version="3") == 1
        deadline = time.monotonic() + 30
        while _states(server, "canary") != {3: AVAILABLE}:  # 1 and 2 retire once their requests are answered
            assert time.monotonic() < deadline, _states(server, "canary")
            time.sleep(0.1)
    assert failures == []
    assert all(right for *_, right in results), "an answer was not its version's output"
    before = {"stable": 1, "canary": 2}
    for label, sent, answered, version, _ in results:
        moved_from, moved_to = moves[label]
        if answered < moved_from:
            assert version == before[label], (label, version)
        elif sent > moved_to:
            assert version == 3, (label, version)
        else:
            assert version in (before[label], 3)
    for label in ("stable", "canary"):  # both labels were called on both sides of their move
        moved_from, moved_to = moves[label]
        assert any(r[0] == label and r[2] < moved_from for r in results)
        assert any(r[0] == label and r[1] > moved_to for r in results)


def test_a_config_adds_and_removes_models_and_an_invalid_one_changes_nothing(folders, config_file):
    """Two models in two folders; a reload adds a third and removes one (whose in-flight call is answered first);
    invalid configs (by RPC and in the polled file) are refused whole. Callers of the models that stay: 0 failed."""
    alpha, beta, gamma = (_entry(name, folders[name]) for name in ("alpha", "beta", "gamma"))
    # Threads enough for beta's held call beside the callers' held calls of alpha.
    args = ("--model-config-file-poll-seconds", "0.2", "--inference-threads", "8")
    with _server(config_file, _config(alpha, beta), *args, holds=True) as server:
        assert _states(server, "alpha") == {1: AVAILABLE} and _states(server, "beta") == {1: AVAILABLE}
        x = np.ones((2, 4), np.float32)
        calls = {"ok": 0, "failed": 0}
        stop = threading.Event()

        def caller() -> None:
            while not stop.is_set():
                try:
                    response = _predict(server, "alpha", x)
                    assert np.allclose(tf.make_ndarray(response.outputs["y"]), _expected(x, 1))
                    calls["ok"] += 1
                except grpc.RpcError:
                    calls["failed"] += 1

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            # A call of beta held in the model, then a reload that adds gamma and removes beta.
            with server.held("predict"):
                result: dict[str, object] = {}
                held = threading.Thread(target=lambda: result.update(r=_predict(server, "beta", x, timeout=60)))
                held.start()
                deadline = time.monotonic() + 60
                while " beta" not in _arrivals(server):  # beta's call waits in the model
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                # As TF Serving's, the polled file wins over a reload by RPC that it differs from: both say the same.
                config_file.write_text(_config(alpha, gamma))
                response = _reload(server, _config(alpha, gamma))
                assert response.status.error_code == 0
                assert _states(server, "beta") == {1: UNLOADING}  # retiring: its call is still being answered
                assert _states(server, "gamma") == {1: AVAILABLE}  # loaded before the reload answered
            held.join(60)
            np.testing.assert_allclose(tf.make_ndarray(result["r"].outputs["y"]), _expected(x, 1))  # type: ignore[attr-defined]
            deadline = time.monotonic() + 30
            while True:
                try:
                    _states(server, "beta")
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND
                    assert "Could not find any versions of model beta" in error.details()
                    break
                assert time.monotonic() < deadline
                time.sleep(0.05)
            error = rpc_error(_predict, server, "beta", x)
            assert error.code() == grpc.StatusCode.NOT_FOUND and "no model named 'beta'" in error.details()
            np.testing.assert_allclose(tf.make_ndarray(_predict(server, "gamma", x).outputs["y"]), _expected(x, 1))

            # Invalid configs, refused whole: a model listed twice, a label on a version that is not loaded.
            error = rpc_error(_reload, server, _config(alpha, alpha))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "Illegal to list model alpha multiple times in config list" in error.details()
            error = rpc_error(_reload, server, _config(_entry("alpha", folders["alpha"], stable=7)))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "label to version 7 of model alpha, which is not currently available" in error.details()
            assert _states(server, "gamma") == {1: AVAILABLE}  # the refused configs had no gamma: nothing changed

            # The polled file: an invalid one is logged and changes nothing; a valid one is applied.
            config_file.write_text(_config(alpha) + " this is not a config")
            deadline = time.monotonic() + 30
            while "refused; the config in force keeps serving" not in server.log_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert _states(server, "gamma") == {1: AVAILABLE}
            config_file.write_text(_config(alpha, beta))
            deadline = time.monotonic() + 60
            while "beta" not in _models_available(server):
                assert time.monotonic() < deadline, server.log_text()[-4000:]
                time.sleep(0.05)
            np.testing.assert_allclose(tf.make_ndarray(_predict(server, "beta", x).outputs["y"]), _expected(x, 1))
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert calls["failed"] == 0 and calls["ok"] > 0, calls


def _arrivals(server: ServerProcess) -> str:
    """Who reached the closed "predict" hold point: one line per call, with its model's name."""
    assert server.hold_dir is not None
    path = server.hold_dir / "predict.arrived"
    return path.read_text() if path.exists() else ""


def _models_available(server: ServerProcess) -> set[str]:
    available = set()
    for name in ("alpha", "beta", "gamma"):
        try:
            if AVAILABLE in _states(server, name).values():
                available.add(name)
        except grpc.RpcError:
            pass
    return available


def test_without_a_config_file_reload_is_refused_and_labels_are_unknown(server):
    """Today's single repository works as before: no labels, and HandleReloadConfigRequest says how to get them."""
    error = rpc_error(_reload, server, _config())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "--model-config-file" in error.details()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "multi_input"
    request.model_spec.version_label = "stable"
    error = rpc_error(prediction_service_pb2_grpc.PredictionServiceStub(server.channel).Predict, request, timeout=10)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "Unrecognized servable version label: stable: model 'multi_input' has no version label 'stable'" in (
        error.details()
    )


def test_a_start_up_label_on_a_version_that_is_not_there_stops_the_start_unless_allowed(folders, config_file):
    """TF Serving's rule at start-up: a label names an available version, or the flag allows it (then a request by
    that label waits for its version like one by number)."""
    text = _config(_entry("alpha", folders["alpha"], stable=1, next=9))
    with _server_process(config_file, text) as server:
        assert server.process.wait(120) == 1
        assert "Request to assign label to version 9 of model alpha, which is not currently available" in (
            server.log_text()
        )
    with _server(config_file, text, "--allow-version-labels-for-unavailable-models", "true") as server:
        x = np.ones((1, 4), np.float32)
        np.testing.assert_allclose(
            tf.make_ndarray(_predict(server, "alpha", x, version_label="stable").outputs["y"]), _expected(x, 1)
        )
        error = rpc_error(_predict, server, "alpha", x, version_label="next")
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "Servable not found for request: Specific(alpha, 9): model 'alpha' has no loaded version 9" in (
            error.details()
        )


def _server_process(config_file: Path, text: str, *args: str) -> ServerProcess:
    config_file.write_text(text)
    return ServerProcess(config_file.parent / "unused_repository", ["--model-config-file", str(config_file), *args])
