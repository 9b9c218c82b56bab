"""TensorFlow Serving's servicers (`tensorflow.serving.PredictionService` Predict and GetModelMetadata,
`tensorflow.serving.ModelService` GetModelStatus): decode, hand to the core, encode, so existing TF Serving
clients switch by changing the address. Conversions live in `server/tfserving_codec.py`.
"""

from __future__ import annotations

from typing import Any

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    predict_pb2,
    prediction_service_pb2,
)

from server import tfserving_codec as tfs
from server.errors import InvalidInputError, quoted_list
from server.inference import InferenceService
from server.rpc import deadline_of, rpc

PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]

_State = get_model_status_pb2.ModelVersionStatus.State
_STATES = {
    "loading": _State.LOADING,
    "available": _State.AVAILABLE,
    "failed": _State.END,
    "unloading": _State.UNLOADING,
}
_UNKNOWN_ERROR = 2  # tensorflow.error.Code UNKNOWN: a load failure's code is not known more precisely


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
        runtime = self._core.resolve(spec.name, version)
        tfs.check_signature(spec.name, spec)
        names = tfs.output_names(spec.name, runtime.outputs, request.output_filter)
        inputs = tfs.decode_inputs(spec.name, request.inputs)
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
        meta = self._core.metadata(spec.name, tfs.version_of(spec.name, spec))
        return tfs.metadata_response(meta.name, meta.version, meta.inputs, meta.outputs)


class ModelService(_Labels):
    @rpc("GetModelStatus", lambda self, request: self._label(request.model_spec.name))
    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        """The served version's state: AVAILABLE, LOADING, UNLOADING, or END with the load error."""
        spec = request.model_spec
        version = tfs.version_of(spec.name, spec)
        summary = self._core.summary(spec.name)
        if summary.state == "failed":
            served = version or max(summary.versions)
        else:
            served = self._core.resolve(spec.name, version).version
        status = get_model_status_pb2.ModelVersionStatus(version=served, state=_STATES[summary.state])
        if summary.error:
            status.status.error_code = _UNKNOWN_ERROR
            status.status.error_message = summary.error
        return get_model_status_pb2.GetModelStatusResponse(model_version_status=[status])
