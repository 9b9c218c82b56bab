"""A `.keras` file served natively: `<repository>/<model>/<version>/model.keras` loaded with Keras itself.

Keras 3's own format is what its documentation teaches first (`model.save("m.keras")`). The model is loaded with
`keras.saving.load_model` and called through one `tf.function` with a fixed input signature (rows of any count),
so a call costs what a SavedModel signature costs, not `model.predict`'s per-call overhead. Inputs and outputs
keep the model's own names, dtypes and shapes; everything past loading (validation, batching, metrics, every
protocol) is the same as for a SavedModel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from server.runtimes.base import ModelRuntime

KERAS_FILE = "model.keras"  # Keras 3's native format: <repository>/<model>/<version>/model.keras


class KerasRuntime(ModelRuntime):
    """One version of one model, loaded from a model.keras file. Rows first, as every Keras model takes them; the
    base class still checks that its outputs follow the rows, as it does for a SavedModel."""

    platform = "keras"

    def _open(self) -> tuple[Callable[..., Mapping[str, Any]], Mapping[str, object], Mapping[str, object]]:
        import keras
        import tensorflow as tf

        with tf.device(self.device):
            model = keras.saving.load_model(self.path / KERAS_FILE, compile=False)
        input_names = [t.name for t in model.inputs]
        output_names = list(model.output_names)
        specs = {
            t.name: tf.TensorSpec((None, *t.shape[1:]), tf.dtypes.as_dtype(t.dtype), name=t.name) for t in model.inputs
        }

        @tf.function(input_signature=[specs])  # type: ignore[untyped-decorator]  # TensorFlow ships no types
        def serve(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            args = inputs if len(input_names) > 1 else inputs[input_names[0]]
            outputs = model(args, training=False)
            if isinstance(outputs, dict):
                return outputs
            if not isinstance(outputs, (list, tuple)):
                outputs = [outputs]
            return dict(zip(output_names, outputs, strict=True))

        self._loaded = model
        return (lambda **inputs: serve(inputs)), specs, serve.get_concrete_function().structured_outputs
