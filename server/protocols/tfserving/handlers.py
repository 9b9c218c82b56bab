"""TensorFlow Serving's handlers (PredictionService Predict and GetModelMetadata, ModelService GetModelStatus),
knowing nothing of their transport: each takes a decoded request (plain data, server/protocols/tfserving/types.py)
and returns a reply or raises one of the core's errors. Every rule of the protocol is here once: version numbers
and labels, the signature a request names, TF Serving's words for an unknown model or version ("Servable not found
for request", "Could not find any versions of model"), followed by ours, the version states, and the methods we do not
offer (Classify, Regress, MultiInference), which say what to use instead; and HandleReloadConfigRequest, which
replaces the model config (server/registry/model_config.py) through the model manager. The gRPC
servicers (server/grpc/tfserving.py) only decode, call these and encode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from server.base.errors import InvalidInputError, ModelNotFoundError, NotOfferedError, quoted, quoted_list
from server.dataplane.inference import InferenceService, ModelMetadata
from server.protocols.common import Handlers, MethodLabel, not_found_in_words
from server.protocols.tfserving import codec
from server.protocols.tfserving.types import ModelSpec, ModelVersionStatus, PredictRequest, PredictResponse
from server.registry.manager import Phase
from server.runtimes.savedmodel import SIGNATURE

if TYPE_CHECKING:
    from tensorflow_serving.config.model_server_config_pb2 import ModelServerConfig


class Method(MethodLabel):
    """TensorFlow Serving's methods (gRPC's names; its REST API counts under the same)."""

    Predict = "tfs.Predict"
    GetModelMetadata = "tfs.GetModelMetadata"
    GetModelStatus = "tfs.GetModelStatus"
    Classify = "tfs.Classify"
    Regress = "tfs.Regress"
    MultiInference = "tfs.MultiInference"
    HandleReloadConfigRequest = "tfs.HandleReloadConfigRequest"


# A version's state (registry/manager.py) in TF Serving's words; a failed version is END with its error, as there.
STATES = {
    "start": "START",
    "loading": "LOADING",
    "available": "AVAILABLE",
    "unloading": "UNLOADING",
    "failed": "END",
}
UNKNOWN_ERROR = 2  # tensorflow.error.Code UNKNOWN: a load failure's code is not known more precisely
# GetModelMetadata's one field.
METADATA_FIELD = "signature_def"
_PREDICT_INSTEAD = (
    "call Predict with the signature's tensors (signature_name names any signature; tf.Example inputs are not taken)"
)
# The methods we do not offer, and what to do instead.
NOT_OFFERED: dict[Method, str] = {
    Method.Classify: _PREDICT_INSTEAD,
    Method.Regress: _PREDICT_INSTEAD,
    Method.MultiInference: _PREDICT_INSTEAD,
}


def _servable(name: str, version: int) -> str:
    """TF Serving's ServableRequest::DebugString, which its NOT_FOUND messages show."""
    request = f"Specific({codec.shown(name)}, {version})" if version else f"Latest({codec.shown(name)})"
    return f"Servable not found for request: {request}"


def version_of(spec: ModelSpec, core: InferenceService) -> int:
    """The requested version (0 = latest): its number, or the version its label names now (a model config's
    version_labels). An unknown label is NOT_FOUND in TF Serving's words ("Unrecognized servable version label"),
    then ours, naming the labels the model has."""
    if spec.version_label is not None:
        if not core.is_known(spec.name):
            phrase = _servable(spec.name, 0)
        else:
            phrase = f"Unrecognized servable version label: {codec.shown(spec.version_label)}"
        with not_found_in_words(phrase):
            return core.version_for_label(spec.name, spec.version_label)
    if spec.version < 0:
        raise InvalidInputError(
            f"model {quoted(spec.name)} version must be >= 1 (or absent: latest), got {spec.version}"
        )
    return spec.version


class TfServingHandlers(Handlers):
    async def predict(self, request: PredictRequest, deadline: float | None = None) -> PredictResponse:
        """Run one request on the signature it names (`signature_name`, "" = serving_default), validated against
        that signature's own inputs; an unknown signature is FAILED_PRECONDITION naming those that exist, as TF
        Serving's "Serving signature key ... not found". `deadline` is a time.monotonic() value (None: none)."""
        spec = request.model_spec
        version = version_of(spec, self.core)
        with not_found_in_words(_servable(spec.name, version)):
            runtime = self.core.resolve(spec.name, version)
        runtime = runtime.signature(spec.signature_name)
        names = codec.output_names(spec.name, runtime.outputs, request.output_filter)
        inputs = self.core.decode(runtime, request.decode)
        signature = "" if runtime.signature_name == SIGNATURE else runtime.signature_name
        result = await self.core.infer(spec.name, runtime.version, inputs, deadline, signature)
        return PredictResponse(
            ModelSpec(spec.name, result.version, signature_name=runtime.signature_name),
            {name: result.outputs[name] for name in names},
        )

    def get_model_metadata(self, spec: ModelSpec, metadata_fields: Sequence[str] = ()) -> ModelMetadata:
        """The version's signatures (the one metadata field, `signature_def`), for codec.metadata_response."""
        unsupported = [f for f in metadata_fields if f != METADATA_FIELD]
        if unsupported:
            raise InvalidInputError(
                f"metadata_field {quoted_list(unsupported)} is not supported; the one field is '{METADATA_FIELD}'"
            )
        version = version_of(spec, self.core)
        with not_found_in_words(_servable(spec.name, version)):
            return self.core.metadata(spec.name, version)

    def get_model_status(self, spec: ModelSpec) -> list[ModelVersionStatus]:
        """Every version's state (or the one asked for), as TF Serving reports them: START, LOADING, AVAILABLE,
        UNLOADING, or END with the load error. An available version is LOADING while the server starts and
        UNLOADING once it stops (it is not ready then), so this agrees with health and ModelReady."""
        version = version_of(spec, self.core)
        if version:
            phrase = f"Could not find version {version} of model {codec.shown(spec.name)}"
        else:
            phrase = f"Could not find any versions of model {codec.shown(spec.name)}"
        with not_found_in_words(phrase):
            summary = self.core.summary(spec.name)
            states = [s for s in summary.version_states if not version or s[0] == version]
            if not states:
                raise ModelNotFoundError(
                    f"no such version; versions: {', '.join(map(str, summary.versions)) or 'none'}"
                )
        statuses = []
        for number, state, error in states:
            if state == "available" and not self.core.is_ready(spec.name, number):
                state = "loading" if self.core.phase is Phase.STARTING else "unloading"
            statuses.append(ModelVersionStatus(number, STATES[state], UNKNOWN_ERROR if error else 0, error))
        return statuses

    async def reload_config(self, message: ModelServerConfig) -> None:
        """HandleReloadConfigRequest: the models, policies and labels of `message` replace the served ones (only on
        a server started with --model-config-file); a config refused is refused whole, the old one serving on."""
        await self.core.reload_config(message)

    def not_offered(self, method: Method) -> NoReturn:
        """A method we do not offer, saying what to use instead (rather than a transport's bare "not found")."""
        raise NotOfferedError(
            f"{method.name} is not offered by this server (it serves TF Serving's Predict, GetModelMetadata, "
            f"GetModelStatus and HandleReloadConfigRequest): {NOT_OFFERED[method]}"
        )
