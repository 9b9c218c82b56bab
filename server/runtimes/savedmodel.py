"""A SavedModel, loaded with tf.saved_model.load and called through its serving_default signature."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from server.runtimes.base import ModelRuntime

SIGNATURE = "serving_default"


class SavedModelRuntime(ModelRuntime):
    """One version of one model from a SavedModel folder."""

    platform = "tensorflow_savedmodel"

    def _open(self) -> tuple[Callable[..., Mapping[str, Any]], Mapping[str, object], Mapping[str, object]]:
        import tensorflow as tf

        with tf.device(self.device):
            self._loaded = tf.saved_model.load(str(self.path))
        if SIGNATURE not in self._loaded.signatures:
            found = ", ".join(self._loaded.signatures) or "none"
            raise ValueError(f"the SavedModel has no '{SIGNATURE}' signature; found: {found}")
        signature = self._loaded.signatures[SIGNATURE]
        _, input_specs = signature.structured_input_signature
        return signature, input_specs, signature.structured_outputs
