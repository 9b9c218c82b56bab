"""Our typed API's messages (modelserver.v1) from the handlers' replies (server/protocols/typed/handlers.py). Its
requests need no decoding beyond gRPC's: their float fields are read as numpy arrays straight from the request's
bytes by the transport (server/grpc/rpc.py WithFloats)."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import Message

from modelserver.v1 import modelserver_pb2 as pb
from server.base.tensors import TensorSpec
from server.dataplane.inference import ModelMetadata, ModelSummary
from server.protocols.typed.handlers import Method, TypedReply

# Each predict method's reply message.
RESPONSES: dict[Method, type[Message]] = {
    Method.PredictMultiInput: pb.PredictMultiInputResponse,
    Method.PredictSharedLayer: pb.PredictSharedLayerResponse,
    Method.PredictResidualCnn: pb.PredictResidualCnnResponse,
}


def predict_response(method: Method, reply: TypedReply) -> Message:
    """Every field flat, row-major, as the reply's repeated fields carry them."""
    fields = {name: array.ravel().tolist() for name, array in reply.fields.items()}
    return RESPONSES[method](version=reply.version, **fields)


def _tensor_spec(spec: TensorSpec, batched: bool) -> pb.TensorSpec:
    """Rows first (-1) for a batched model; an unbatched model's shapes are whole."""
    dims = [-1 if d is None else d for d in spec.shape]
    return pb.TensorSpec(name=spec.name, dtype=spec.dtype.name, shape=[-1, *dims] if batched else dims)


def metadata_response(meta: ModelMetadata) -> pb.GetModelMetadataResponse:
    return pb.GetModelMetadataResponse(
        name=meta.name,
        version=meta.version,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[_tensor_spec(s, meta.batched) for s in meta.inputs],
        outputs=[_tensor_spec(s, meta.batched) for s in meta.outputs],
        device=meta.device,
        batching=pb.BatchingSettings(**meta.batching.message_fields()),
        ready=meta.ready,
    )


def list_response(models: Sequence[ModelSummary]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[pb.ModelSummary(name=m.name, versions=m.versions, ready=m.ready) for m in models]
    )
