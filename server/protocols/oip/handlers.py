"""The Open Inference Protocol's handlers (KServe v2 / Triton), knowing nothing of their transport: each takes a
decoded request (plain values, server/protocols/oip/types.py, Triton's ModelConfig message) and returns a reply or
raises one of the core's errors. Every rule of the protocol is here once: versions as strings, Triton's words for
an unknown model ("Request for unknown model", which its clients look for), request and output parameters,
requested outputs and classifications, statistics, repository states, repository control, and the extensions we
do not offer. The gRPC servicer (server/grpc/oip.py) only decodes, calls these and encodes.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from importlib import metadata as package_metadata
from typing import NoReturn

from tritonclient.grpc import model_config_pb2 as mc

from server.base.errors import InvalidInputError, NotAllowedError, NotOfferedError, quoted
from server.base.tensors import TensorSpec
from server.dataplane.inference import InferenceService
from server.dataplane.inference import ModelMetadata as CoreMetadata
from server.protocols.common import Handlers, MethodLabel, not_found_in_words
from server.protocols.oip import codec
from server.protocols.oip.types import (
    InferInput,
    InferRequest,
    InferResponse,
    InferStatistics,
    ModelMetadata,
    ModelStatistics,
    Parameter,
    RepositoryModel,
    RequestedOutput,
    ServerMetadata,
    StatisticDuration,
)


class Method(MethodLabel):
    """The Open Inference Protocol's methods (gRPC's names; its REST paths count under the same)."""

    ServerLive = "oip.ServerLive"
    ServerReady = "oip.ServerReady"
    ModelReady = "oip.ModelReady"
    ServerMetadata = "oip.ServerMetadata"
    ModelMetadata = "oip.ModelMetadata"
    ModelConfig = "oip.ModelConfig"
    ModelStatistics = "oip.ModelStatistics"
    ModelInfer = "oip.ModelInfer"
    ModelStreamInfer = "oip.ModelStreamInfer"
    RepositoryIndex = "oip.RepositoryIndex"
    RepositoryModelLoad = "oip.RepositoryModelLoad"
    RepositoryModelUnload = "oip.RepositoryModelUnload"
    SystemSharedMemoryStatus = "oip.SystemSharedMemoryStatus"
    SystemSharedMemoryRegister = "oip.SystemSharedMemoryRegister"
    SystemSharedMemoryUnregister = "oip.SystemSharedMemoryUnregister"
    CudaSharedMemoryStatus = "oip.CudaSharedMemoryStatus"
    CudaSharedMemoryRegister = "oip.CudaSharedMemoryRegister"
    CudaSharedMemoryUnregister = "oip.CudaSharedMemoryUnregister"
    TraceSetting = "oip.TraceSetting"
    LogSettings = "oip.LogSettings"


SERVER_NAME = "modelserver"
# The extensions ServerMetadata lists, in Triton's names.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
_SHARED_MEMORY = (
    "send tensors in the request (over gRPC: raw_input_contents or typed contents; over HTTP: data, or binary data "
    "after the JSON with binary_data_size)"
)
# The extensions we do not offer: each method's extension, and what to do instead.
NOT_OFFERED: dict[Method, tuple[str, str]] = {
    Method.SystemSharedMemoryStatus: ("system_shared_memory", _SHARED_MEMORY),
    Method.SystemSharedMemoryRegister: ("system_shared_memory", _SHARED_MEMORY),
    Method.SystemSharedMemoryUnregister: ("system_shared_memory", _SHARED_MEMORY),
    Method.CudaSharedMemoryStatus: ("cuda_shared_memory", _SHARED_MEMORY),
    Method.CudaSharedMemoryRegister: ("cuda_shared_memory", _SHARED_MEMORY),
    Method.CudaSharedMemoryUnregister: ("cuda_shared_memory", _SHARED_MEMORY),
    Method.TraceSetting: ("trace", "the server's metrics are on its Prometheus /metrics port"),
    Method.LogSettings: ("logging", "the log level is set when the server starts"),
}
# An unknown model or version in Triton's words, which its clients look for (then ours: what exists).
UNKNOWN_MODEL_WORDS = "Request for unknown model"
# A version's state in RepositoryIndex, in Triton's words (registry/manager.py State -> Triton's ModelReadyState).
INDEX_STATES = {
    "start": "LOADING",
    "loading": "LOADING",
    "available": "READY",
    "unloading": "UNLOADING",
    "failed": "UNAVAILABLE",
}


def server_version() -> str:
    try:
        return package_metadata.version("modelserver")
    except package_metadata.PackageNotFoundError:
        return "unknown"


class OipHandlers(Handlers):
    def __init__(self, core: InferenceService, repository_control: bool = False) -> None:
        super().__init__(core)
        self._repository_control = repository_control
        self._version = server_version()

    # -- health and metadata --------------------------------------------------------------------------------------

    def server_live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        return self.core.manager.server_ready()

    def model_ready(self, name: str, version: str) -> bool:
        """False for a model that is loading, failed to load, draining, or unknown (as Triton answers)."""
        return self.core.is_ready(name, codec.parse_version(name, version))

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

    def _metadata(self, name: str, version: str) -> CoreMetadata:
        with not_found_in_words(UNKNOWN_MODEL_WORDS):
            return self.core.metadata(name, codec.parse_version(name, version))

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        meta = self._metadata(name, version)
        return ModelMetadata(
            name=meta.name,
            versions=(str(meta.version),),
            platform=meta.platform,
            inputs=codec.tensor_metadata(meta.inputs, meta.batched),
            outputs=codec.tensor_metadata(meta.outputs, meta.batched),
        )

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        """The model as Triton's ModelConfig (model_configuration extension) describes it."""
        meta = self._metadata(name, version)
        b = meta.batching
        return codec.model_config(
            meta.name,
            meta.platform,
            meta.inputs,
            meta.outputs,
            b.max_batch_size if meta.batched else 0,
            # The longest a request waits for company (an upper bound under the 'cost' policy).
            (b.allowed_batch_sizes, b.batch_timeout) if b.enabled else None,
            # The signature that OIP serves (a SavedModel may have several; TF Serving's Predict names the others).
            {"signature_name": meta.signature, **(_batching_parameters(meta) if b.enabled else {})},
        )

    def model_statistics(self, name: str, version: str) -> list[ModelStatistics]:
        """Counts and times per model (statistics extension); an empty name asks for every loaded model."""
        statistics = []
        for model in [name] if name else self.core.model_names():
            with not_found_in_words(UNKNOWN_MODEL_WORDS):
                number = self.core.resolve(model, codec.parse_version(model, version)).version
                s = self.core.statistics(model)
            # Triton counts queue and compute per request (perf_analyzer checks that the counts agree): a request's
            # compute is its time in the core less its time queued; the batches are execution_count.
            per_request = StatisticDuration(count=s.success_count)
            inference = InferStatistics(
                success=StatisticDuration(count=s.success_count, ns=s.success_ns),
                fail=StatisticDuration(count=s.fail_count, ns=s.fail_ns),
                queue=StatisticDuration(count=s.success_count, ns=min(s.queue_ns, s.success_ns)),
                compute_input=per_request,
                compute_infer=StatisticDuration(count=s.success_count, ns=max(0, s.success_ns - s.queue_ns)),
                compute_output=per_request,
            )
            statistics.append(
                ModelStatistics(
                    name=model,
                    version=str(number),
                    last_inference=s.last_inference_ms,
                    inference_count=s.inference_count,
                    execution_count=s.execution_count,
                    inference_stats=inference,
                )
            )
        return statistics

    # -- inference ------------------------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, deadline: float | None = None) -> InferResponse:
        """Run one request. `deadline` (time.monotonic(), None: none) is the transport's; the request's 'timeout'
        parameter shortens it. Its tensors are decoded once the version is resolved, within that version's limits."""
        name = request.model_name
        version = codec.parse_version(name, request.model_version)
        codec.check_parameters(f"model {quoted(name)}", request.parameters, codec.REQUEST_PARAMETERS)
        timeout = _timeout_seconds(request.parameters)
        if timeout is not None:
            deadline = min(d for d in (deadline, time.monotonic() + timeout) if d is not None)
        with not_found_in_words(UNKNOWN_MODEL_WORDS):
            runtime = self.core.resolve(name, version)
        _check_datatypes(name, runtime.inputs, request.inputs)
        names = _requested_outputs(name, runtime.outputs, request.outputs)
        classes = _classification_counts(name, runtime.outputs, request.outputs)
        inputs = self.core.decode(runtime, request.decode)
        result = await self.core.infer(name, runtime.version, inputs, deadline)
        outputs = []
        for output in names:
            array = result.outputs[output]
            if output in classes:
                array = codec.classify(array, classes[output], runtime.batched)
            outputs.append(codec.output_tensor(output, array))
        parameters: dict[str, Parameter] = {}
        if "triton_enable_empty_final_response" in request.parameters:
            parameters["triton_final_response"] = True  # one response per request: every response is final
        return InferResponse(name, str(result.version), tuple(outputs), request.id, parameters)

    # -- model repository extension -------------------------------------------------------------------------------

    def repository_index(self, repository: str, ready: bool) -> list[RepositoryModel]:
        """Every version of every model with its state (READY, LOADING, UNLOADING, UNAVAILABLE with the load
        error); `ready`: only the versions that serve now."""
        _check_repository(repository)
        models = []
        for summary in self.core.list_models():
            if not summary.version_states and not ready:
                models.append(RepositoryModel(summary.name, state="UNAVAILABLE", reason=summary.error or summary.state))
            for number, state, error in summary.version_states:
                serving = state == "available" and self.core.is_ready(summary.name, number)
                if ready and not serving:
                    continue
                words = "READY" if serving else ("UNAVAILABLE" if state == "available" else INDEX_STATES[state])
                models.append(RepositoryModel(summary.name, str(number), words, error))
        return models

    async def repository_load(self, repository: str, name: str, parameters: Collection[str] = ()) -> None:
        """Load (or reload) the model's versions from the repository now, as its version policy says."""
        self._check_control(Method.RepositoryModelLoad, repository)
        if parameters:
            raise InvalidInputError(
                f"RepositoryModelLoad parameters {sorted(parameters)} are not supported: the model is loaded "
                "from its folder in the repository (put its files there first)"
            )
        with not_found_in_words(UNKNOWN_MODEL_WORDS):
            await self.core.manager.load_model(name)

    async def repository_unload(self, repository: str, name: str) -> None:
        """Retire every version of the model (requests already accepted finish); it stays unloaded, repository
        polling included, until loaded again."""
        self._check_control(Method.RepositoryModelUnload, repository)
        with not_found_in_words(UNKNOWN_MODEL_WORDS):
            await self.core.manager.unload_model(name)

    def _check_control(self, method: Method, repository: str) -> None:
        if not self._repository_control:
            raise NotAllowedError(
                f"{method.name} is switched off: start the server with --repository-control true to load and "
                "unload models through the Open Inference Protocol (new versions in the repository are loaded "
                "anyway, see --repository-poll-seconds)"
            )
        _check_repository(repository)

    # -- extensions we do not offer -------------------------------------------------------------------------------

    def not_offered(self, method: Method) -> NoReturn:
        """A method of an extension we do not offer: the extension, what to do instead and the extensions we do
        offer (rather than a transport's bare "method not found")."""
        extension, instead = NOT_OFFERED[method]
        raise NotOfferedError(
            f"{method.name} belongs to the '{extension}' extension of the Open Inference Protocol, which this "
            f"server does not offer: {instead}. Extensions offered: {', '.join(EXTENSIONS)} (see ServerMetadata)"
        )


def _check_repository(name: str) -> None:
    if name:
        raise InvalidInputError(
            f"unknown repository {quoted(name)}: this server has one model repository; leave repository_name empty"
        )


def _timeout_seconds(parameters: Mapping[str, Parameter]) -> float | None:
    """The request's 'timeout' parameter (microseconds, as Triton defines it) in seconds, or None."""
    if "timeout" not in parameters:
        return None
    value = parameters["timeout"]
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInputError("parameter 'timeout' must be an integer number of microseconds")
    if value < 0:
        raise InvalidInputError(f"parameter 'timeout' must be >= 0 microseconds, got {value}")
    return value / 1e6 if value else None


def _check_datatypes(model: str, specs: Mapping[str, TensorSpec], inputs: Sequence[InferInput]) -> None:
    """Refuse an input whose datatype is not the model's, in the protocol's own words, before decoding it."""
    for tensor in inputs:
        spec = specs.get(tensor.name)
        if spec is not None and codec.DATATYPES.get(tensor.datatype) != spec.dtype:
            expected = codec.DATATYPE_NAMES.get(spec.dtype, spec.dtype.name)
            raise InvalidInputError(
                f"model '{model}' input {quoted(tensor.name)} has datatype {expected}, got {quoted(tensor.datatype)}"
            )


def _requested_outputs(model: str, specs: Mapping[str, TensorSpec], outputs: Sequence[RequestedOutput]) -> list[str]:
    """The outputs to return, in the order asked for: all the model's when the request names none."""
    if not outputs:
        return list(specs)
    names = []
    for output in outputs:
        where = f"model '{model}' output {quoted(output.name)}"
        codec.check_parameters(where, output.parameters, codec.OUTPUT_PARAMETERS)
        if output.name not in specs:
            raise InvalidInputError(
                f"model '{model}' has no output named {quoted(output.name)}; expected outputs: {', '.join(specs)}"
            )
        if output.name not in names:
            names.append(output.name)
    return names


def _classification_counts(
    model: str, specs: Mapping[str, TensorSpec], outputs: Sequence[RequestedOutput]
) -> dict[str, int]:
    """The outputs asked for as classifications (Triton's classification extension: the output parameter
    'classification'), each with how many top classes, checked before the model runs."""
    counts = {}
    for output in outputs:
        if "classification" not in output.parameters:
            continue
        count = output.parameters["classification"]
        where = f"model '{model}' output {quoted(output.name)}"
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            got = "no value" if count is None else repr(count)
            raise InvalidInputError(
                f"invalid value for 'classification' parameter, expected an int64_param > 0: {where} got {got}"
            )
        datatype = codec.DATATYPE_NAMES.get(specs[output.name].dtype) if output.name in specs else None
        if datatype is not None and datatype not in codec.CLASSIFIABLE:
            raise InvalidInputError(
                f"class result not available for output due to unsupported type '{datatype}': {where} can be "
                f"classified when its datatype is one of {', '.join(codec.CLASSIFIABLE)}"
            )
        counts[output.name] = count
    return counts


def _batching_parameters(meta: CoreMetadata) -> dict[str, str]:
    """What the batcher decides from, as ModelConfig parameters: the policy, and once the version has run, its
    measured call cost (fixed + per row, what the 'cost' policy and the back-off hints use) and the time the work
    queued now will take."""
    parameters = {"batch_policy": meta.batching.policy}
    if meta.cost is not None and meta.cost.by_size:
        parameters |= {
            "batch_cost_fixed_ms": f"{meta.cost.a * 1000:.3f}",
            "batch_cost_per_row_ms": f"{meta.cost.b * 1000:.4f}",
            "queue_wait_ms": f"{meta.queue_wait * 1000:.1f}",
        }
    return parameters
