"""A `.keras` file served natively: `<repository>/<model>/<version>/model.keras` loaded with Keras itself.

Keras 3's own format is what its documentation teaches first (`model.save("m.keras")`). The model is loaded with
`keras.saving.load_model` and called through one `tf.function` with a fixed input signature (rows of any count),
so a call costs what a SavedModel signature costs, not `model.predict`'s per-call overhead. Inputs and outputs
keep the model's own names, dtypes and shapes; everything past loading (validation, batching, metrics, every
protocol) is the same as for a SavedModel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.base.tensors import TensorSpec
from server.runtimes.savedmodel import ModelRuntime

KERAS_FILE = "model.keras"  # Keras 3's native format: <repository>/<model>/<version>/model.keras


class KerasRuntime(ModelRuntime):
    """One version of one model, loaded from a model.keras file."""

    def __init__(self, name: str, version: int, path: Path, device: str) -> None:  # noqa: D107
        import keras
        import tensorflow as tf

        self.name = name
        self.version = version
        self.path = path
        self.device = device
        self.before_call = None
        self.batched, self.unbatched_reason, self._cold = True, "", False  # rows first, as Keras models take them
        with tf.device(device):
            model = keras.saving.load_model(path / KERAS_FILE, compile=False)
        input_names = [t.name for t in model.inputs]
        output_names = list(model.output_names)
        specs = {
            t.name: tf.TensorSpec((None, *t.shape[1:]), tf.dtypes.as_dtype(t.dtype), name=t.name) for t in model.inputs
        }

        @tf.function(input_signature=[specs])
        def serve(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            args = inputs if len(input_names) > 1 else inputs[input_names[0]]
            outputs = model(args, training=False)
            if isinstance(outputs, dict):
                return outputs
            if not isinstance(outputs, (list, tuple)):
                outputs = [outputs]
            return dict(zip(output_names, outputs, strict=True))

        self._loaded = model
        self._signature = lambda **inputs: serve(inputs)
        self.inputs = {n: _spec(n, specs[n].shape[1:], specs[n].dtype) for n in sorted(input_names)}
        outputs = serve.get_concrete_function().structured_outputs
        self.outputs = {n: _spec(n, t.shape[1:], t.dtype) for n, t in sorted(outputs.items())}


def _spec(name: str, shape: object, dtype: object) -> TensorSpec:
    return TensorSpec(name=name, dtype=np.dtype(dtype.as_numpy_dtype), shape=tuple(shape.as_list()))  # type: ignore[attr-defined]
