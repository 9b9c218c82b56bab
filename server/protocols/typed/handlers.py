"""Our typed API's handlers (modelserver.v1.ModelService), knowing nothing of their transport: one predict method
per built-in model, with its inputs and outputs as named fields of flat row-major floats, model metadata and the
model list. Each takes decoded values and returns a reply or raises one of the core's errors; the gRPC servicer
(server/grpc/typed.py) only decodes, calls these and encodes (server/protocols/typed/codec.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from server.dataplane.inference import ModelMetadata, ModelSummary
from server.protocols.common import Handlers, MethodLabel


class Method(MethodLabel):
    """Our typed API's methods."""

    PredictMultiInput = "typed.PredictMultiInput"
    PredictSharedLayer = "typed.PredictSharedLayer"
    PredictResidualCnn = "typed.PredictResidualCnn"
    GetModelMetadata = "typed.GetModelMetadata"
    ListModels = "typed.ListModels"


@dataclass(frozen=True)
class TypedModel:
    """The built-in model a typed predict method serves: its inputs, and the outputs its reply carries."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


MODELS: dict[Method, TypedModel] = {
    Method.PredictMultiInput: TypedModel("multi_input", ("input_a", "input_b"), ("output",)),
    Method.PredictSharedLayer: TypedModel("shared_layer", ("input_a", "input_b"), ("output_a", "output_b")),
    Method.PredictResidualCnn: TypedModel("residual_cnn", ("image",), ("probabilities",)),
}


@dataclass(frozen=True)
class TypedReply:
    """A typed predict reply: the version that answered, and each field of the reply (rows first)."""

    version: int
    fields: dict[str, np.ndarray]


class TypedHandlers(Handlers):
    async def predict(
        self, method: Method, version: int, flat_inputs: Mapping[str, np.ndarray], deadline: float | None = None
    ) -> TypedReply:
        """Run one request of `method` on its model: `flat_inputs` holds each input as flat row-major values (the
        model's shapes give the rows); `deadline` is a time.monotonic() value (None: none). residual_cnn's reply
        adds each row's arg-max class, `predicted_class`."""
        model = MODELS[method]
        inputs = {name: flat_inputs[name] for name in model.inputs}
        result = await self.core.infer_flat(model.name, version, inputs, deadline)
        fields = {name: result.outputs[name] for name in model.outputs}
        if method is Method.PredictResidualCnn:
            fields["predicted_class"] = np.argmax(fields["probabilities"], axis=1)
        return TypedReply(result.version, fields)

    def get_model_metadata(self, name: str, version: int = 0) -> ModelMetadata:
        return self.core.metadata(name, version)

    def list_models(self) -> list[ModelSummary]:
        return self.core.list_models()
