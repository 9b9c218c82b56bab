"""The protocols' transport-free handlers (server/protocols/*/handlers.py) on a fake core: no server, no model. Each
rule of a protocol is checked once here, where an HTTP front-end would call it too; the gRPC servicers only decode,
call these and encode (tests/integration checks them through the wire). Also: one method label per protocol and
method, and a failure answered and counted the same way in every protocol."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from server.base.errors import (
    InvalidInputError,
    ModelNotFoundError,
    NotAllowedError,
    NotOfferedError,
    SignatureNotFoundError,
    UnavailableError,
)
from server.base.tensors import InputLimits, TensorSpec
from server.batching.config import BatchingConfig
from server.dataplane.inference import InferenceResult, ModelMetadata, ModelStatistics, ModelSummary
from server.grpc import oip as oip_grpc
from server.grpc import tfserving as tfs_grpc
from server.grpc import typed as typed_grpc
from server.grpc.labels import method_label
from server.grpc.status import to_status
from server.protocols.oip import codec as oip_codec
from server.protocols.oip.handlers import Method as OipMethod
from server.protocols.oip.handlers import OipHandlers
from server.protocols.oip.types import InferInput, InferRequest, RepositoryModel, RequestedOutput
from server.protocols.tfserving import codec as tfs_codec
from server.protocols.tfserving.handlers import UNKNOWN_ERROR, TfServingHandlers
from server.protocols.tfserving.handlers import Method as TfsMethod
from server.protocols.tfserving.types import ModelSpec, ModelVersionStatus, PredictRequest
from server.protocols.typed import codec as typed_codec
from server.protocols.typed.handlers import Method as TypedMethod
from server.protocols.typed.handlers import TypedHandlers
from server.registry.manager import Phase
from server.runtimes.base import ModelRuntime
from server.runtimes.savedmodel import SIGNATURE

F32 = np.dtype(np.float32)


@dataclass
class FakeRuntime:
    name: str
    version: int
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    batched: bool = True
    signature_name: str = SIGNATURE
    signatures: dict[str, FakeRuntime] = field(default_factory=dict)  # the other signatures of its version
    unservable: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.signatures = {self.signature_name: self, **self.signatures}

    def signature(self, key: str) -> Any:
        return ModelRuntime.signature(self, key)  # type: ignore[arg-type]  # the real lookup, on the fake


@dataclass
class FakeManager:
    ready: bool = True
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)

    def server_ready(self) -> bool:
        return self.ready

    async def load_model(self, name: str) -> None:
        self.loaded.append(name)

    async def unload_model(self, name: str) -> None:
        self.unloaded.append(name)


class FakeCore:
    """What the handlers ask of InferenceService, over a fixed set of runtimes. `run(inputs)` computes outputs;
    every infer call is recorded with its deadline."""

    def __init__(self, runtimes: list[FakeRuntime], run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]):
        self.manager = FakeManager()
        self.phase = Phase.SERVING
        self._runtimes = {(r.name, r.version): r for r in runtimes}
        self._run = run
        self.calls: list[tuple[str, int, dict[str, np.ndarray], float | None]] = []
        self.limits: list[InputLimits] = []
        self.states: dict[str, list[tuple[int, str, str]]] = {}
        self.not_ready: set[tuple[str, int]] = set()
        self.signatures_called: list[str] = []
        self.labels: dict[str, dict[str, int]] = {}  # model -> version label -> version

    def _versions(self, name: str) -> list[int]:
        return sorted(v for n, v in self._runtimes if n == name)

    def is_known(self, name: str) -> bool:
        return bool(self._versions(name)) or name in self.states

    def model_names(self) -> list[str]:
        return sorted({n for n, _ in self._runtimes})

    def resolve(self, name: str, version: int = 0) -> FakeRuntime:
        versions = self._versions(name)
        if not versions:
            raise ModelNotFoundError(f"no model named '{name}'; available models: {', '.join(self.model_names())}")
        number = version or versions[-1]
        if number not in versions:
            raise ModelNotFoundError(f"model '{name}' has no version {number}")
        return self._runtimes[(name, number)]

    def version_for_label(self, name: str, label: str) -> int:
        if label in self.labels.get(name, {}):
            return self.labels[name][label]
        self.resolve(name)
        known = ", ".join(f"{k} -> {v}" for k, v in sorted(self.labels.get(name, {}).items()))
        raise ModelNotFoundError(f"model '{name}' has no version label '{label}'; its labels: {known or 'none'}")

    def is_ready(self, name: str, version: int = 0) -> bool:
        try:
            runtime = self.resolve(name, version)
        except ModelNotFoundError:
            return False
        return (name, runtime.version) not in self.not_ready

    def decode(self, runtime: FakeRuntime, decode: Callable[[InputLimits], Any]) -> Any:
        limits = InputLimits(runtime.inputs, 64, runtime.batched)
        self.limits.append(limits)
        return decode(limits)

    async def infer(
        self,
        name: str,
        version: int,
        inputs: Mapping[str, np.ndarray],
        deadline: float | None = None,
        signature: str = "",
    ) -> InferenceResult:
        runtime = self.resolve(name, version)
        self.calls.append((name, runtime.version, dict(inputs), deadline))
        self.signatures_called.append(signature)
        return InferenceResult(runtime.version, self._run(inputs), runtime.batched)

    async def infer_flat(
        self, name: str, version: int, flat_inputs: Mapping[str, np.ndarray], deadline: float | None = None
    ) -> InferenceResult:
        runtime = self.resolve(name, version)
        rows = {key: value.reshape(-1, *runtime.inputs[key].shape) for key, value in flat_inputs.items()}
        return await self.infer(name, version, rows, deadline)

    def metadata(self, name: str, version: int = 0) -> ModelMetadata:
        runtime = self.resolve(name, version)
        return ModelMetadata(
            name=name,
            version=runtime.version,
            versions=tuple(self._versions(name)),
            platform="tensorflow_savedmodel",
            inputs=tuple(runtime.inputs.values()),
            outputs=tuple(runtime.outputs.values()),
            device="/CPU:0",
            batching=BatchingConfig(),
            ready=True,
            batched=runtime.batched,
        )

    def statistics(self, name: str) -> ModelStatistics:
        self.resolve(name)
        return ModelStatistics(
            success_count=4, success_ns=1000, fail_count=1, fail_ns=50, inference_count=9, last_inference_ms=7,
            execution_count=2, queue_ns=300,
        )  # fmt: skip

    def summary(self, name: str) -> ModelSummary:
        if name not in self.states:
            raise ModelNotFoundError(f"no model named '{name}'")
        states = tuple(self.states[name])
        return ModelSummary(name, True, "available", "", states)

    def list_models(self) -> list[ModelSummary]:
        if self.phase is Phase.STARTING:
            raise UnavailableError("the server is starting")
        return [self.summary(name) for name in sorted(self.states)]


def _spec(name: str, *shape: int | None, dtype: np.dtype = F32) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def _two_outputs(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = inputs["x"]
    return {"sum": x.sum(axis=1, keepdims=True), "scores": x * 2}


@pytest.fixture
def core() -> FakeCore:
    runtimes = [
        FakeRuntime("m", 1, {"x": _spec("x", 3)}, {"sum": _spec("sum", 1), "scores": _spec("scores", 3)}),
        FakeRuntime("m", 2, {"x": _spec("x", 3)}, {"sum": _spec("sum", 1), "scores": _spec("scores", 3)}),
    ]
    return FakeCore(runtimes, _two_outputs)


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# -- the Open Inference Protocol ---------------------------------------------------------------------------------


def _infer_request(
    x: np.ndarray, *, version: str = "", datatype: str = "FP32", outputs: tuple[RequestedOutput, ...] = (), **kw: Any
) -> tuple[InferRequest, list[InputLimits]]:
    seen: list[InputLimits] = []

    def decode(limits: InputLimits) -> dict[str, np.ndarray]:
        seen.append(limits)
        return {"x": x}

    request = InferRequest("m", version, (InferInput("x", datatype),), decode, outputs, **kw)
    return request, seen


def test_oip_infer_decodes_within_the_version_limits_and_answers_the_outputs_asked_for(core):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    request, seen = _infer_request(
        x, version="1", outputs=(RequestedOutput("scores"), RequestedOutput("sum"), RequestedOutput("scores")),
        id="abc", parameters={"triton_enable_empty_final_response": True},
    )  # fmt: skip
    response = _run(OipHandlers(core).infer(request, deadline=None))
    assert [limits.specs for limits in seen] == [core.resolve("m", 1).inputs]
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "abc")
    assert [(o.name, o.datatype, o.shape) for o in response.outputs] == [
        ("scores", "FP32", (2, 3)),
        ("sum", "FP32", (2, 1)),
    ]
    np.testing.assert_array_equal(response.outputs[0].data, x * 2)
    assert response.parameters == {"triton_final_response": True}
    # No outputs named: every output of the model, in its order; the latest version by default.
    request, _ = _infer_request(x)
    response = _run(OipHandlers(core).infer(request))
    assert response.model_version == "2" and [o.name for o in response.outputs] == ["sum", "scores"]
    assert response.parameters == {}


def test_oip_timeout_parameter_shortens_the_transports_deadline(core):
    x = np.zeros((1, 3), np.float32)
    handlers = OipHandlers(core)
    _run(handlers.infer(_infer_request(x, parameters={"timeout": 5_000_000})[0], deadline=1.0))
    _run(handlers.infer(_infer_request(x, parameters={"timeout": 0})[0], deadline=None))
    _run(handlers.infer(_infer_request(x, parameters={"timeout": 1000})[0], deadline=None))
    deadlines = [call[3] for call in core.calls]
    assert deadlines[0] == 1.0 and deadlines[1] is None and deadlines[2] is not None
    for value, words in ((True, "integer number of microseconds"), ("1", "integer"), (-1, ">= 0 microseconds")):
        with pytest.raises(InvalidInputError, match=words):
            _run(handlers.infer(_infer_request(x, parameters={"timeout": value})[0]))


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"version": "x"}, InvalidInputError, "failed to get model version from specified version string 'x'"),
        ({"version": "7"}, ModelNotFoundError, "Request for unknown model: model 'm' has no version 7"),
        ({"datatype": "INT32"}, InvalidInputError, "input 'x' has datatype FP32, got 'INT32'"),
        ({"parameters": {"sequence_id": 3}}, InvalidInputError, "parameter 'sequence_id' is not supported"),
        ({"outputs": (RequestedOutput("nope"),)}, InvalidInputError, "no output named 'nope'; expected outputs: sum"),
        (
            {"outputs": (RequestedOutput("sum", {"shared_memory_region": "r"}),)},
            InvalidInputError,
            "output 'sum': parameter 'shared_memory_region' is not supported",
        ),
        (
            {"outputs": (RequestedOutput("sum", {"classification": 0}),)},
            InvalidInputError,
            "invalid value for 'classification' parameter, expected an int64_param > 0: model 'm' output 'sum' got 0",
        ),
        (
            {"outputs": (RequestedOutput("sum", {"classification": None}),)},
            InvalidInputError,
            "got no value",
        ),
    ],
)
def test_oip_infer_refuses_before_decoding(core, change, error, words):
    request, seen = _infer_request(np.zeros((1, 3), np.float32), **change)
    with pytest.raises(error, match=words):
        _run(OipHandlers(core).infer(request))
    assert not seen and not core.calls


def test_oip_unknown_model_is_in_tritons_words(core):
    request = dataclasses.replace(_infer_request(np.zeros((1, 3), np.float32))[0], model_name="nope")
    with pytest.raises(ModelNotFoundError, match="^Request for unknown model: no model named 'nope'"):
        _run(OipHandlers(core).infer(request))
    for call in (OipHandlers(core).model_metadata, OipHandlers(core).model_config, OipHandlers(core).model_statistics):
        with pytest.raises(ModelNotFoundError, match="^Request for unknown model: "):
            call("nope", "")
    assert OipHandlers(core).model_ready("nope", "") is False


def test_oip_classification_gives_the_top_classes_as_bytes(core):
    x = np.array([[0.1, 0.9, 0.5]], np.float32)
    outputs = (RequestedOutput("scores", {"classification": 2}),)
    response = _run(OipHandlers(core).infer(_infer_request(x, outputs=outputs)[0]))
    (scores,) = response.outputs
    assert scores.datatype == "BYTES" and scores.data.tolist() == [[b"1.800000:1", b"1.000000:2"]]


def test_oip_metadata_and_config_give_rows_first_and_the_platform(core):
    meta = OipHandlers(core).model_metadata("m", "1")
    assert dataclasses.asdict(meta) == {
        "name": "m",
        "versions": ("1",),
        "platform": "tensorflow_savedmodel",
        "inputs": ({"name": "x", "datatype": "FP32", "shape": (-1, 3)},),
        "outputs": (
            {"name": "sum", "datatype": "FP32", "shape": (-1, 1)},
            {"name": "scores", "datatype": "FP32", "shape": (-1, 3)},
        ),
    }
    assert oip_codec.metadata_response(meta).inputs[0].shape == [-1, 3]
    config = OipHandlers(core).model_config("m", "")
    assert (config.name, config.platform, config.max_batch_size) == ("m", "tensorflow_savedmodel", 64)
    assert list(config.input[0].dims) == [3] and config.parameters["batch_policy"].string_value


def test_oip_statistics_split_queue_and_compute_per_request(core):
    (stats,) = OipHandlers(core).model_statistics("m", "")
    assert (stats.name, stats.version, stats.inference_count, stats.execution_count) == ("m", "2", 9, 2)
    infer = stats.inference_stats
    assert (infer.success.count, infer.success.ns, infer.fail.count, infer.fail.ns) == (4, 1000, 1, 50)
    assert (infer.queue.count, infer.queue.ns) == (4, 300)
    assert (infer.compute_infer.count, infer.compute_infer.ns) == (4, 700)
    assert infer.compute_input.count == infer.compute_output.count == 4
    # An empty name asks for every model; the reply is Triton's JSON once made a dict.
    assert [s.name for s in OipHandlers(core).model_statistics("", "")] == ["m"]
    assert dataclasses.asdict(stats)["inference_stats"]["compute_infer"] == {"count": 4, "ns": 700}
    assert oip_codec.statistics_response([stats]).model_stats[0].inference_stats.queue.ns == 300


def test_oip_repository_index_in_tritons_words(core):
    core.states = {
        "m": [(1, "available", ""), (2, "loading", ""), (3, "unloading", "")],
        "broken": [(1, "failed", "cannot load model 'broken' version 1: bad")],
        "empty": [],
    }
    core.not_ready = {("m", 1)}  # available, but the server is not ready
    index = OipHandlers(core).repository_index("", ready=False)
    assert index == [
        RepositoryModel("broken", "1", "UNAVAILABLE", "cannot load model 'broken' version 1: bad"),
        RepositoryModel("empty", "", "UNAVAILABLE", "available"),
        RepositoryModel("m", "1", "UNAVAILABLE", ""),
        RepositoryModel("m", "2", "LOADING", ""),
        RepositoryModel("m", "3", "UNLOADING", ""),
    ]
    core.not_ready = set()
    assert OipHandlers(core).repository_index("", ready=True) == [RepositoryModel("m", "1", "READY", "")]
    with pytest.raises(InvalidInputError, match="this server has one model repository"):
        OipHandlers(core).repository_index("other", ready=False)


def test_oip_repository_control(core):
    with pytest.raises(NotAllowedError, match="RepositoryModelLoad is switched off"):
        _run(OipHandlers(core).repository_load("", "m"))
    with pytest.raises(NotAllowedError, match="RepositoryModelUnload is switched off"):
        _run(OipHandlers(core).repository_unload("", "m"))
    handlers = OipHandlers(core, repository_control=True)
    with pytest.raises(InvalidInputError, match=r"parameters \['config'\] are not supported"):
        _run(handlers.repository_load("", "m", ["config"]))
    _run(handlers.repository_load("", "m"))
    _run(handlers.repository_unload("", "m"))
    assert (core.manager.loaded, core.manager.unloaded) == (["m"], ["m"])


def test_oip_server_health_and_metadata(core):
    handlers = OipHandlers(core)
    assert handlers.server_live() and handlers.server_ready() and handlers.model_ready("m", "1")
    core.manager.ready = False
    assert not handlers.server_ready()
    meta = handlers.server_metadata()
    assert meta.name == "modelserver" and "model_repository" in meta.extensions


@pytest.mark.parametrize(
    ("method", "extension"),
    [
        (OipMethod.SystemSharedMemoryStatus, "system_shared_memory"),
        (OipMethod.CudaSharedMemoryRegister, "cuda_shared_memory"),
        (OipMethod.TraceSetting, "trace"),
        (OipMethod.LogSettings, "logging"),
    ],
)
def test_oip_extensions_not_offered_say_so(core, method, extension):
    with pytest.raises(NotOfferedError) as caught:
        OipHandlers(core).not_offered(method)
    assert str(caught.value).startswith(f"{method.name} belongs to the '{extension}' extension")
    assert "Extensions offered: classification, model_configuration, model_repository, statistics" in str(caught.value)


# -- TensorFlow Serving ------------------------------------------------------------------------------------------


def _predict_request(spec: ModelSpec, x: np.ndarray, output_filter: tuple[str, ...] = ()) -> PredictRequest:
    return PredictRequest(spec, lambda limits: {"x": x}, output_filter)


def test_tfs_predict_answers_the_filtered_outputs_with_the_served_spec(core):
    x = np.ones((2, 3), np.float32)
    response = _run(TfServingHandlers(core).predict(_predict_request(ModelSpec("m"), x, ("scores", "scores"))))
    assert response.model_spec == ModelSpec("m", 2, signature_name=SIGNATURE)
    assert list(response.outputs) == ["scores"]
    response = _run(TfServingHandlers(core).predict(_predict_request(ModelSpec("m", 1, None, SIGNATURE), x)))
    assert response.model_spec.version == 1 and list(response.outputs) == ["sum", "scores"]


def test_tfs_predict_runs_the_signature_it_names_validated_against_its_own_inputs():
    """Each signature has its own specs: a request decodes within the named signature's limits, the core runs that
    signature (the default one as "", so its hot path is unchanged), and the reply names it."""
    images = FakeRuntime("m", 1, {"images": _spec("images", 4)}, {"scores": _spec("scores", 3)}, True, "predict_images")
    runtime = FakeRuntime("m", 1, {"x": _spec("x", 3)}, {"sum": _spec("sum", 1)}, signatures={"predict_images": images})
    core = FakeCore([runtime], lambda inputs: {"scores" if "images" in inputs else "sum": np.ones((1, 3), np.float32)})
    request = PredictRequest(
        ModelSpec("m", signature_name="predict_images"), lambda limits: {"images": np.ones((1, 4))}
    )
    response = _run(TfServingHandlers(core).predict(request))
    assert response.model_spec == ModelSpec("m", 1, signature_name="predict_images")
    assert list(response.outputs) == ["scores"] and core.signatures_called == ["predict_images"]
    assert list(core.limits[-1].specs) == ["images"]  # decoded within the signature's own inputs
    _run(TfServingHandlers(core).predict(PredictRequest(ModelSpec("m"), lambda limits: {"x": np.ones((1, 3))})))
    assert core.signatures_called[-1] == ""
    with pytest.raises(SignatureNotFoundError, match="its signatures: 'predict_images', 'serving_default'$"):
        _run(TfServingHandlers(core).predict(PredictRequest(ModelSpec("m", signature_name="nope"), request.decode)))
    assert to_status(SignatureNotFoundError("x"))[0] == grpc.StatusCode.FAILED_PRECONDITION  # as TF Serving's


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        (ModelSpec("nope"), ModelNotFoundError, "^Servable not found for request: Latest\\(nope\\): no model named"),
        (ModelSpec("m", 7), ModelNotFoundError, "^Servable not found for request: Specific\\(m, 7\\): "),
        (
            ModelSpec("m", version_label="stable"),
            ModelNotFoundError,
            "^Unrecognized servable version label: stable: model 'm' has no version label 'stable'",
        ),
        (ModelSpec("nope", version_label="stable"), ModelNotFoundError, "^Servable not found for request: Latest"),
        (ModelSpec("m", -1), InvalidInputError, "version must be >= 1 \\(or absent: latest\\), got -1"),
        (
            ModelSpec("m", signature_name="other"),
            SignatureNotFoundError,
            "^Serving signature key \"other\" not found: model 'm' has no signature 'other'; its signatures: "
            "'serving_default'$",
        ),
    ],
)
def test_tfs_predict_refuses_in_tf_servings_words(core, spec, error, words):
    with pytest.raises(error, match=words):
        _run(TfServingHandlers(core).predict(_predict_request(spec, np.ones((1, 3), np.float32))))
    assert not core.calls


def test_tfs_version_labels_name_a_version_for_predict_metadata_and_status(core):
    """A label resolves to the version it names now, in each of the three methods; moving it (one assignment of the
    map) moves the next request."""
    core.labels = {"m": {"stable": 1, "canary": 2}}
    core.states = {"m": [(1, "available", ""), (2, "available", "")]}
    handlers = TfServingHandlers(core)
    x = np.ones((1, 3), np.float32)
    assert _run(handlers.predict(_predict_request(ModelSpec("m", version_label="stable"), x))).model_spec.version == 1
    assert _run(handlers.predict(_predict_request(ModelSpec("m", version_label="canary"), x))).model_spec.version == 2
    assert handlers.get_model_metadata(ModelSpec("m", version_label="stable")).version == 1
    assert handlers.get_model_status(ModelSpec("m", version_label="canary")) == [ModelVersionStatus(2, "AVAILABLE")]
    core.labels = {"m": {"stable": 2}}
    assert _run(handlers.predict(_predict_request(ModelSpec("m", version_label="stable"), x))).model_spec.version == 2
    with pytest.raises(
        ModelNotFoundError, match="^Unrecognized servable version label: canary: .*its labels: stable -> 2$"
    ):
        handlers.get_model_status(ModelSpec("m", version_label="canary"))


def test_tfs_metadata_takes_only_the_signature_field(core):
    meta = TfServingHandlers(core).get_model_metadata(ModelSpec("m"), ["signature_def"])
    assert (meta.name, meta.version) == ("m", 2)
    with pytest.raises(InvalidInputError, match="metadata_field 'x' is not supported"):
        TfServingHandlers(core).get_model_metadata(ModelSpec("m"), ["signature_def", "x"])
    with pytest.raises(ModelNotFoundError, match="^Servable not found for request: Latest\\(nope\\)"):
        TfServingHandlers(core).get_model_metadata(ModelSpec("nope"))


def test_tfs_model_status_agrees_with_readiness(core):
    core.states = {"m": [(1, "available", ""), (2, "failed", "cannot load: bad"), (3, "start", "")]}
    handlers = TfServingHandlers(core)
    assert handlers.get_model_status(ModelSpec("m")) == [
        ModelVersionStatus(1, "AVAILABLE"),
        ModelVersionStatus(2, "END", UNKNOWN_ERROR, "cannot load: bad"),
        ModelVersionStatus(3, "START"),
    ]
    core.not_ready = {("m", 1)}
    core.phase = Phase.STARTING
    assert handlers.get_model_status(ModelSpec("m", 1)) == [ModelVersionStatus(1, "LOADING")]
    core.phase = Phase.STOPPING
    assert handlers.get_model_status(ModelSpec("m", 1)) == [ModelVersionStatus(1, "UNLOADING")]
    with pytest.raises(
        ModelNotFoundError, match="^Could not find version 9 of model m: no such version; versions: 1, 2, 3"
    ):
        handlers.get_model_status(ModelSpec("m", 9))
    with pytest.raises(ModelNotFoundError, match="^Could not find any versions of model nope: "):
        handlers.get_model_status(ModelSpec("nope"))
    response = tfs_codec.status_response(handlers.get_model_status(ModelSpec("m", 2)))
    assert response.model_version_status[0].status.error_message == "cannot load: bad"


@pytest.mark.parametrize("method", [TfsMethod.Classify, TfsMethod.Regress, TfsMethod.MultiInference])
def test_tfs_methods_not_offered_say_what_to_use(core, method):
    with pytest.raises(
        NotOfferedError,
        match=f"^{method.name} is not offered by this server .*call Predict with the signature's tensors",
    ):
        TfServingHandlers(core).not_offered(method)


# -- our typed API -----------------------------------------------------------------------------------------------


def test_typed_predict_reads_flat_fields_and_adds_the_predicted_class():
    runtimes = [FakeRuntime("residual_cnn", 1, {"image": _spec("image", 2, 2)}, {"probabilities": _spec("p", 3)})]
    core = FakeCore(runtimes, lambda inputs: {"probabilities": inputs["image"].reshape(-1, 4)[:, :3], "extra": 0})
    flat = np.array([0, 5, 1, 9, 7, 2, 3, 9], np.float32)
    reply = _run(TypedHandlers(core).predict(TypedMethod.PredictResidualCnn, 0, {"image": flat}))
    assert reply.version == 1 and list(reply.fields) == ["probabilities", "predicted_class"]
    assert reply.fields["predicted_class"].tolist() == [1, 0]
    message = typed_codec.predict_response(TypedMethod.PredictResidualCnn, reply)
    assert list(message.probabilities) == [0, 5, 1, 7, 2, 3] and list(message.predicted_class) == [1, 0]


# -- labels and status codes, the same in every protocol ---------------------------------------------------------


@pytest.mark.parametrize(
    ("methods", "protocol", "service"),
    [
        (OipMethod, "oip", oip_grpc.SERVICE),
        (TfsMethod, "tfs", tfs_grpc.PREDICTION_SERVICE),
        (TfsMethod, "tfs", tfs_grpc.MODEL_SERVICE),
        (TypedMethod, "typed", typed_grpc.SERVICE),
    ],
)
def test_every_method_has_one_label_naming_its_protocol(methods, protocol, service):
    assert all(method.value == f"{protocol}.{method.name}" for method in methods)
    for rpc in service.methods:
        assert rpc.name in methods.__members__, f"{service.full_name}/{rpc.name} has no label"
        assert method_label(f"/{service.full_name}/{rpc.name}") == f"{protocol}.{rpc.name}"
    assert method_label("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == "ServerReflectionInfo"


def test_labels_never_add_up_across_protocols():
    labels = [m.value for methods in (OipMethod, TfsMethod, TypedMethod) for m in methods]
    assert len(labels) == len(set(labels))
    assert {TypedMethod.GetModelMetadata.value, TfsMethod.GetModelMetadata.value} == {
        "typed.GetModelMetadata",
        "tfs.GetModelMetadata",
    }


class _Aborted(Exception):
    pass


class _Context:
    """Just what server.grpc.rpc.rpc asks of a servicer context."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.aborted = (code, message)
        raise _Aborted


@pytest.mark.parametrize(
    ("servicer", "method"),
    [
        (lambda core: oip_grpc.OipService(core), OipMethod.TraceSetting),
        (lambda core: tfs_grpc.PredictionService(core), TfsMethod.Classify),
        (lambda core: tfs_grpc.PredictionService(core), TfsMethod.Regress),
    ],
)
def test_not_offered_is_unimplemented_and_counted_alike_in_every_protocol(core, servicer, method):
    assert to_status(NotOfferedError("x")) == (grpc.StatusCode.UNIMPLEMENTED, "x")
    handler = getattr(servicer(core), method.name)
    labels = {"model": "", "method": method.value, "transport": "grpc"}
    before = REGISTRY.get_sample_value("modelserver_requests_total", {**labels, "code": "UNIMPLEMENTED"}) or 0
    timed = REGISTRY.get_sample_value("modelserver_request_duration_seconds_count", labels) or 0
    context = _Context()
    with pytest.raises(_Aborted):
        _run(handler(object(), context))
    assert context.aborted is not None and context.aborted[0] is grpc.StatusCode.UNIMPLEMENTED
    assert context.aborted[1].startswith(f"{method.name} ")
    assert REGISTRY.get_sample_value("modelserver_requests_total", {**labels, "code": "UNIMPLEMENTED"}) == before + 1
    assert REGISTRY.get_sample_value("modelserver_request_duration_seconds_count", labels) == timed + 1
