"""A loaded SavedModel: its signature's specs and a blocking predict call on the chosen device."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from server.tensors import TensorSpec

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"


def _spec(name: str, tf_spec: object) -> TensorSpec:
    shape = tuple(tf_spec.shape.as_list()[1:])  # type: ignore[attr-defined]
    return TensorSpec(name=name, dtype=np.dtype(tf_spec.dtype.as_numpy_dtype), shape=shape)  # type: ignore[attr-defined]


class ModelRuntime:
    """One version of one model, loaded with tf.saved_model.load and called through its signature.

    Calls block (TensorFlow releases the GIL while it computes); the caller runs them off the event loop.
    """

    def __init__(self, name: str, version: int, path: Path, device: str) -> None:
        import tensorflow as tf

        self.name = name
        self.version = version
        self.path = path
        self.device = device
        with tf.device(device):
            self._loaded = tf.saved_model.load(str(path))
        if SIGNATURE not in self._loaded.signatures:
            raise ValueError(
                f"{path} has no '{SIGNATURE}' signature; found: {', '.join(self._loaded.signatures) or 'none'}"
            )
        self._signature = self._loaded.signatures[SIGNATURE]
        _, input_specs = self._signature.structured_input_signature
        self.inputs: dict[str, TensorSpec] = {n: _spec(n, s) for n, s in sorted(input_specs.items())}
        self.outputs: dict[str, TensorSpec] = {
            n: _spec(n, s) for n, s in sorted(self._signature.structured_outputs.items())
        }
        # Called with the model's name before every model call once set (after warm-up): the tests' hold point.
        self.before_call: Callable[[str], None] | None = None

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature on validated inputs; returns one array per output, rows first."""
        import tensorflow as tf

        if self.before_call is not None:
            self.before_call(self.name)
        with tf.device(self.device):
            outputs = self._signature(**{name: tf.constant(value) for name, value in inputs.items()})
        return {name: tensor.numpy() for name, tensor in outputs.items()}

    def warm_up(self, rows: int = 1) -> None:
        """Call the model once so the first real request does not pay for tracing and allocation."""
        if any(spec.values_per_row is None for spec in self.inputs.values()):
            log.warning("%s v%d: inputs of unknown size, skipping warm-up", self.name, self.version)
            return
        self.predict(
            {n: np.zeros((rows, *s.shape), dtype=s.dtype) for n, s in self.inputs.items()}  # type: ignore[misc]
        )
