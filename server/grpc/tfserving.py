"""TensorFlow Serving's servicers (`tensorflow.serving.PredictionService` Predict and GetModelMetadata,
`tensorflow.serving.ModelService` GetModelStatus): decode, hand to the core, encode, so existing TF Serving
clients switch by changing the address. Conversions live in `server/protocols/tfserving/codec.py`.

An unknown model or version is answered with TF Serving's own words first ("Servable not found for request",
"Could not find any versions of model"), then ours; the methods we do not offer (Classify, Regress,
MultiInference, HandleReloadConfigRequest) answer UNIMPLEMENTED saying what to use instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    predict_pb2,
    prediction_service_pb2,
)

from server.base.errors import InvalidInputError, ModelNotFoundError, quoted_list
from server.base.metrics import REQUESTS
from server.dataplane.inference import InferenceService
from server.grpc.rpc import deadline_of, rpc
from server.protocols.tfserving import codec as tfs
from server.registry.manager import Phase

PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]

_State = get_model_status_pb2.ModelVersionStatus.State
# A version's state (registry/manager.py) in TF Serving's terms; a failed version is END with its error, as there.
_STATES = {
    "start": _State.START,
    "loading": _State.LOADING,
    "available": _State.AVAILABLE,
    "unloading": _State.UNLOADING,
    "failed": _State.END,
}
_UNKNOWN_ERROR = 2  # tensorflow.error.Code UNKNOWN: a load failure's code is not known more precisely


@contextlib.contextmanager
def _tf_serving_words(phrase: str) -> Iterator[None]:
    """An unknown model or version in TF Serving's words (`phrase`), followed by ours (what exists)."""
    try:
        yield
    except ModelNotFoundError as error:
        raise ModelNotFoundError(f"{phrase}: {error}") from None


def _servable(name: str, version: int) -> str:
    """TF Serving's ServableRequest::DebugString, which its NOT_FOUND messages show."""
    request = f"Specific({tfs.shown(name)}, {version})" if version else f"Latest({tfs.shown(name)})"
    return f"Servable not found for request: {request}"


def _not_offered(method: str, instead: str) -> Callable[..., Awaitable[Any]]:
    """UNIMPLEMENTED for a TF Serving method we do not offer, saying what to use instead (counted like every call)."""
    message = f"{method} is not offered by this server (it serves TF Serving's Predict, GetModelMetadata and "
    message += f"GetModelStatus): {instead}"

    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        REQUESTS.labels("", method, grpc.StatusCode.UNIMPLEMENTED.name).inc()
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    handler.__name__ = method
    return handler


_PREDICT_INSTEAD = "call Predict with the model's serving_default signature (tf.Example inputs are not taken)"


class _Labels:
    def __init__(self, core: InferenceService) -> None:
        self._core = core

    def _label(self, name: str) -> str:
        """A metric label for a caller-supplied model name: unknown names share one label."""
        return name if self._core.is_known(name) else "unknown"


class PredictionService(_Labels):
    @rpc("Predict", lambda self, request: self._label(request.model_spec.name))
    async def Predict(self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext) -> Any:
        spec = request.model_spec
        version = tfs.version_of(spec.name, spec)
        with _tf_serving_words(_servable(spec.name, version)):
            runtime = self._core.resolve(spec.name, version)
        tfs.check_signature(spec.name, spec)
        names = tfs.output_names(spec.name, runtime.outputs, request.output_filter)
        inputs = self._core.decode(runtime, lambda limits: tfs.decode_inputs(spec.name, request.inputs, limits))
        result = await self._core.infer(spec.name, runtime.version, inputs, deadline_of(context))
        return tfs.predict_response(spec.name, result.version, result.outputs, names)

    @rpc("GetModelMetadata", lambda self, request: self._label(request.model_spec.name))
    async def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        spec = request.model_spec
        unsupported = [f for f in request.metadata_field if f != "signature_def"]
        if unsupported:
            raise InvalidInputError(
                f"metadata_field {quoted_list(unsupported)} is not supported; the one field is 'signature_def'"
            )
        version = tfs.version_of(spec.name, spec)
        with _tf_serving_words(_servable(spec.name, version)):
            meta = self._core.metadata(spec.name, version)
        return tfs.metadata_response(meta.name, meta.version, meta.inputs, meta.outputs, meta.batched)

    Classify = _not_offered("Classify", _PREDICT_INSTEAD)
    Regress = _not_offered("Regress", _PREDICT_INSTEAD)
    MultiInference = _not_offered("MultiInference", _PREDICT_INSTEAD)


class ModelService(_Labels):
    @rpc("GetModelStatus", lambda self, request: self._label(request.model_spec.name))
    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        """Every version's state (or the one asked for), as TF Serving reports them: START, LOADING, AVAILABLE,
        UNLOADING, or END with the load error. An available version is LOADING while the server starts and
        UNLOADING once it stops (it is not ready then), so this agrees with health and ModelReady."""
        spec = request.model_spec
        version = tfs.version_of(spec.name, spec)
        if version:
            phrase = f"Could not find version {version} of model {tfs.shown(spec.name)}"
        else:
            phrase = f"Could not find any versions of model {tfs.shown(spec.name)}"
        with _tf_serving_words(phrase):
            summary = self._core.summary(spec.name)
            states = [s for s in summary.version_states if not version or s[0] == version]
            if not states:
                raise ModelNotFoundError(
                    f"no such version; versions: {', '.join(map(str, summary.versions)) or 'none'}"
                )
        statuses = []
        for number, state, error in states:
            if state == "available" and not self._core.is_ready(spec.name, number):
                state = "loading" if self._core.phase is Phase.STARTING else "unloading"
            status = get_model_status_pb2.ModelVersionStatus(version=number, state=_STATES[state])
            if error:
                status.status.error_code = _UNKNOWN_ERROR
                status.status.error_message = error
            statuses.append(status)
        return get_model_status_pb2.GetModelStatusResponse(model_version_status=statuses)

    HandleReloadConfigRequest = _not_offered(
        "HandleReloadConfigRequest",
        "the server serves the versions it finds in its repository (scanned every --repository-poll-seconds, and on "
        "SIGHUP), as each model's version policy says (--version-policy, --model-version-policy)",
    )
