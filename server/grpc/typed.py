"""The modelserver.v1.ModelService servicer: decode, hand to the core, encode. Nothing else.

Every RPC goes through `server.grpc.rpc.rpc`, which maps core errors to status codes and records the request
metrics with the final code, cancellations and deadlines included.
"""

from __future__ import annotations

import grpc
import numpy as np

from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from server.base.tensors import TensorSpec
from server.dataplane.inference import InferenceService, ModelMetadata
from server.grpc.rpc import WithFloats, deadline_of, rpc


def _tensor_spec(spec: TensorSpec, batched: bool) -> pb.TensorSpec:
    """Rows first (-1) for a batched model; an unbatched model's shapes are whole."""
    dims = [-1 if d is None else d for d in spec.shape]
    return pb.TensorSpec(name=spec.name, dtype=spec.dtype.name, shape=[-1, *dims] if batched else dims)


def metadata_message(meta: ModelMetadata) -> pb.GetModelMetadataResponse:
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


class ModelService(pb_grpc.ModelServiceServicer):
    def __init__(self, core: InferenceService) -> None:
        self._core = core

    def _known(self, name: str) -> str:
        """A metric label for a caller-supplied model name: unknown names share one label."""
        return name if name in self._core.model_names() else "unknown"

    @rpc("PredictMultiInput", lambda self, request: "multi_input")
    async def PredictMultiInput(
        self, request: WithFloats, context: grpc.aio.ServicerContext
    ) -> pb.PredictMultiInputResponse:
        result = await self._core.infer_flat(
            "multi_input",
            request.version,
            {"input_a": request.floats["input_a"], "input_b": request.floats["input_b"]},
            deadline_of(context),
        )
        return pb.PredictMultiInputResponse(output=result.outputs["output"].ravel().tolist(), version=result.version)

    @rpc("PredictSharedLayer", lambda self, request: "shared_layer")
    async def PredictSharedLayer(
        self, request: WithFloats, context: grpc.aio.ServicerContext
    ) -> pb.PredictSharedLayerResponse:
        result = await self._core.infer_flat(
            "shared_layer",
            request.version,
            {"input_a": request.floats["input_a"], "input_b": request.floats["input_b"]},
            deadline_of(context),
        )
        return pb.PredictSharedLayerResponse(
            output_a=result.outputs["output_a"].ravel().tolist(),
            output_b=result.outputs["output_b"].ravel().tolist(),
            version=result.version,
        )

    @rpc("PredictResidualCnn", lambda self, request: "residual_cnn")
    async def PredictResidualCnn(
        self, request: WithFloats, context: grpc.aio.ServicerContext
    ) -> pb.PredictResidualCnnResponse:
        result = await self._core.infer_flat(
            "residual_cnn", request.version, {"image": request.floats["image"]}, deadline_of(context)
        )
        probabilities = result.outputs["probabilities"]
        return pb.PredictResidualCnnResponse(
            probabilities=probabilities.ravel().tolist(),
            predicted_class=np.argmax(probabilities, axis=1).tolist(),
            version=result.version,
        )

    @rpc("GetModelMetadata", lambda self, request: self._known(request.name))
    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelMetadataResponse:
        return metadata_message(self._core.metadata(request.name, request.version))

    @rpc("ListModels", lambda self, request: "")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = self._core.list_models()
        return pb.ListModelsResponse(
            models=[pb.ModelSummary(name=m.name, versions=m.versions, ready=m.ready) for m in models]
        )
