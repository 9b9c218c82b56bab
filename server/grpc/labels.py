"""The request metrics' method label of a gRPC method path, for calls counted before a servicer sees them (the
bearer-token check): the label its protocol gives it (`/inference.GRPCInferenceService/ModelInfer` ->
`oip.ModelInfer`), the same one its servicer counts under, so that one method has one series."""

from __future__ import annotations

from server.grpc import oip, tfserving, typed
from server.protocols.common import MethodLabel
from server.protocols.oip.handlers import Method as OipMethod
from server.protocols.tfserving.handlers import Method as TfServingMethod
from server.protocols.typed.handlers import Method as TypedMethod

_METHODS: dict[str, type[MethodLabel]] = {
    oip.SERVICE.full_name: OipMethod,
    tfserving.PREDICTION_SERVICE.full_name: TfServingMethod,
    tfserving.MODEL_SERVICE.full_name: TfServingMethod,
    typed.SERVICE.full_name: TypedMethod,
}


def method_label(path: str) -> str:
    """The label of `/<service>/<method>`; a method of no protocol of ours (reflection) keeps its own name."""
    service, _, name = path.lstrip("/").rpartition("/")
    methods = _METHODS.get(service)
    return str(methods[name]) if methods is not None and name in methods.__members__ else name
