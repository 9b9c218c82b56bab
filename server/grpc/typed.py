"""The modelserver.v1.ModelService servicer: decode, call the typed API's handler
(server/protocols/typed/handlers.py), encode (server/protocols/typed/codec.py). Nothing else.

Every RPC goes through `server.grpc.rpc.rpc`, which maps core errors to status codes and records the request
metrics with the final code, cancellations and deadlines included.
"""

from __future__ import annotations

from typing import Any

from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from server.dataplane.inference import InferenceService
from server.grpc.rpc import Context, Handler, Servicer, WithFloats, deadline_of, rpc
from server.protocols.common import NO_MODEL
from server.protocols.typed import codec as typed
from server.protocols.typed.handlers import MODELS, Method, TypedHandlers

SERVICE = pb.DESCRIPTOR.services_by_name["ModelService"]


def _predict(method: Method) -> Handler[WithFloats, Any]:
    """A typed predict RPC: its float fields, read straight from the request's bytes, to its model."""

    async def predict(self: ModelService, request: WithFloats, context: Context) -> Any:
        reply = await self.handlers.predict(method, request.version, request.floats, deadline_of(context))
        return typed.predict_response(method, reply)

    predict.__name__ = predict.__qualname__ = method.name
    model = MODELS[method].name
    return rpc(method, lambda self, request: model)(predict)


class ModelService(pb_grpc.ModelServiceServicer, Servicer):
    handlers: TypedHandlers

    def __init__(self, core: InferenceService) -> None:
        super().__init__(TypedHandlers(core))

    PredictMultiInput = _predict(Method.PredictMultiInput)
    PredictSharedLayer = _predict(Method.PredictSharedLayer)
    PredictResidualCnn = _predict(Method.PredictResidualCnn)

    @rpc(Method.GetModelMetadata, lambda self, request: self.label(request.name))
    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: Context
    ) -> pb.GetModelMetadataResponse:
        return typed.metadata_response(self.handlers.get_model_metadata(request.name, request.version))

    @rpc(Method.ListModels, lambda self, request: NO_MODEL)
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return typed.list_response(self.handlers.list_models())
