"""A SavedModel, loaded with tf.saved_model.load: its serving_default signature is the version's runtime, and every
other signature is served beside it (server/runtimes/base.py, SignatureRuntime)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from server.runtimes.base import DEFAULT_SIGNATURE, ModelRuntime

SIGNATURE = DEFAULT_SIGNATURE
SAVED_MODEL_FILE = "saved_model.pb"
SERVE_TAG = "serve"


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
        self.signature_defs = self._read_signature_defs()
        signature = self._loaded.signatures[SIGNATURE]
        _, input_specs = signature.structured_input_signature
        return signature, input_specs, signature.structured_outputs

    def _other_signatures(self) -> Mapping[str, Callable[..., Mapping[str, Any]]]:
        return {key: function for key, function in self._loaded.signatures.items() if key != SIGNATURE}

    def _read_signature_defs(self) -> bytes:
        """The serving MetaGraph's SignatureDefMap as saved_model.pb holds it: what TF Serving's GetModelMetadata
        answers, every signature with its method name and tensor names (read once, at load)."""
        from tensorflow.core.protobuf import saved_model_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2

        saved = saved_model_pb2.SavedModel.FromString((self.path / SAVED_MODEL_FILE).read_bytes())
        graphs = [g for g in saved.meta_graphs if SERVE_TAG in g.meta_info_def.tags] or list(saved.meta_graphs)
        signature_defs = graphs[0].signature_def if graphs else {}
        serialized: bytes = get_model_metadata_pb2.SignatureDefMap(signature_def=signature_defs).SerializeToString()
        return serialized
