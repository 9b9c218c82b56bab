"""TensorFlow Serving's servicers (`tensorflow.serving.PredictionService` Predict and GetModelMetadata,
`tensorflow.serving.ModelService` GetModelStatus): decode, call the protocol's handler
(server/protocols/tfserving/handlers.py, where every rule of the protocol is), encode, so existing TF Serving
clients switch by changing the address. Conversions live in `server/protocols/tfserving/codec.py`.
"""

from __future__ import annotations

from typing import Any

from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2,
    predict_pb2,
    prediction_service_pb2,
    status_pb2,
)

from server.dataplane.inference import InferenceService
from server.grpc.rpc import Context, Servicer, deadline_of, not_offered, rpc
from server.protocols.common import NO_MODEL
from server.protocols.tfserving import codec as tfs
from server.protocols.tfserving.handlers import Method, TfServingHandlers

PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]


class _Servicer(Servicer):
    handlers: TfServingHandlers

    def __init__(self, core: InferenceService) -> None:
        super().__init__(TfServingHandlers(core))


class PredictionService(_Servicer):
    @rpc(Method.Predict, lambda self, request: self.label(request.model_spec.name))
    async def Predict(self, request: predict_pb2.PredictRequest, context: Context) -> Any:
        response = await self.handlers.predict(tfs.predict_request(request), deadline_of(context))
        return tfs.predict_response(response)

    @rpc(Method.GetModelMetadata, lambda self, request: self.label(request.model_spec.name))
    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: Context) -> Any:
        spec = tfs.model_spec_of(request.model_spec)
        return tfs.metadata_response(self.handlers.get_model_metadata(spec, list(request.metadata_field)))

    Classify = not_offered(Method.Classify)
    Regress = not_offered(Method.Regress)
    MultiInference = not_offered(Method.MultiInference)


class ModelService(_Servicer):
    @rpc(Method.GetModelStatus, lambda self, request: self.label(request.model_spec.name))
    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context: Context) -> Any:
        return tfs.status_response(self.handlers.get_model_status(tfs.model_spec_of(request.model_spec)))

    @rpc(Method.HandleReloadConfigRequest, lambda self, request: NO_MODEL)
    async def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context: Context
    ) -> Any:
        await self.handlers.reload_config(request.config)
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto(error_code=0))
