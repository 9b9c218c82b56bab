"""TensorFlow Serving's REST API (tensorflow_serving/g3doc/api_rest.md) over its transport-free handlers
(server/protocols/tfserving/handlers.py): model status, metadata, and `:predict` in the row format ("instances" ->
"predictions") and the columnar format ("inputs" -> "outputs"), named or unnamed inputs, {"b64": ...} for binary
strings, "signature_name", and `{"error": ...}` with the HTTP status of the core's error.

Values take the dtype of the model's input (JSON has no dtypes), as TF Serving reads them; a string output whose name
ends in `_bytes` is written as {"b64": ...}, as there. Status and metadata are TF Serving's own messages, written
as its REST API writes them (protobuf's JSON, field names as in the .proto, every field present).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from server.base.errors import InvalidInputError, quoted
from server.base.tensors import InputLimits, TensorSpec
from server.dataplane.inference import InferenceService
from server.http.api import HttpRequest, HttpResponse, Route, json_response
from server.http.tensors import STRING, array_from_json, jsonable, parse_json, strings_to_json
from server.protocols.tfserving import codec
from server.protocols.tfserving.handlers import Method, TfServingHandlers
from server.protocols.tfserving.types import ModelSpec, PredictRequest, PredictResponse

_MODEL = r"/v1/models/(?P<model>[^/:]+)(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"


def routes(core: InferenceService) -> list[Route]:
    endpoints = TfServingEndpoints(TfServingHandlers(core))
    return [
        Route("GET", _MODEL, endpoints.status, Method.GetModelStatus),
        Route("GET", _MODEL + "/metadata", endpoints.metadata, Method.GetModelMetadata),
        Route("POST", _MODEL + ":predict", endpoints.predict, Method.Predict, admitted=True, reads_body=True),
        Route("POST", _MODEL + ":classify", endpoints.classify, Method.Classify, reads_body=True),
        Route("POST", _MODEL + ":regress", endpoints.regress, Method.Regress, reads_body=True),
    ]


def model_spec(params: Mapping[str, str], signature_name: str = "") -> ModelSpec:
    """The ModelSpec a path names: /v1/models/{m}[/versions/{v} | /labels/{l}]."""
    name = params["model"]
    version_text = params.get("version")
    # ASCII digits only: str.isdigit() is true of "²", which int() refuses.
    if version_text is not None and not (version_text.isascii() and version_text.isdigit() and len(version_text) <= 18):
        raise InvalidInputError(f"model {quoted(name)} version must be a positive integer, got {quoted(version_text)}")
    return ModelSpec(name, int(version_text or 0), params.get("label"), signature_name)


def _printed(message: Message) -> Any:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class TfServingEndpoints:
    def __init__(self, handlers: TfServingHandlers) -> None:
        self.handlers = handlers

    async def status(self, request: HttpRequest) -> HttpResponse:
        statuses = self.handlers.get_model_status(model_spec(request.params))
        document = _printed(codec.status_response(statuses))
        for status in document.get("model_version_status", []):  # TF Serving prints an OK status too
            status.setdefault("status", {"error_code": "OK", "error_message": ""})
        return json_response(document)

    async def metadata(self, request: HttpRequest) -> HttpResponse:
        spec = model_spec(request.params)
        meta = self.handlers.get_model_metadata(spec)
        response = codec.metadata_response(meta)
        document = _printed(response)
        # TF Serving writes each metadata entry as its message alone ({"signature_def": {"serving_default": ...}}),
        # without the "@type" that protobuf's JSON gives an Any.
        for entry in document.get("metadata", {}).values():
            entry.pop("@type", None)
        return json_response(document)

    async def predict(self, request: HttpRequest) -> HttpResponse:
        body = parse_json(request.body, "the request body")
        if not isinstance(body, dict):
            raise InvalidInputError(
                'the request body must be a JSON object: {"instances": [...]} (row format) or {"inputs": ...} '
                "(columnar format)"
            )
        formats = [key for key in ("instances", "inputs") if key in body]
        if len(formats) != 1:
            raise InvalidInputError(
                'the request body needs exactly one of "instances" (row format) or "inputs" (columnar format), '
                f"got {', '.join(map(quoted, formats)) or 'neither'}"
            )
        unknown = sorted(set(body) - {"instances", "inputs", "signature_name"})
        if unknown:
            raise InvalidInputError(
                f"unknown field {', '.join(map(quoted, unknown))} in the request body; it takes "
                '"signature_name" and one of "instances" or "inputs"'
            )
        signature = body.get("signature_name", "")
        if not isinstance(signature, str):
            raise InvalidInputError('"signature_name" must be a string')
        spec = model_spec(request.params, signature)
        rows = formats[0] == "instances"
        values = body[formats[0]]

        def decode(limits: InputLimits) -> dict[str, np.ndarray]:
            return decode_inputs(spec.name, values, rows, limits.specs)

        response = await self.handlers.predict(PredictRequest(spec, decode))
        return json_response(predict_document(response, rows))

    async def classify(self, request: HttpRequest) -> HttpResponse:
        self.handlers.not_offered(Method.Classify)

    async def regress(self, request: HttpRequest) -> HttpResponse:
        self.handlers.not_offered(Method.Regress)


def _named(value: Any) -> bool:
    """Whether a JSON value names inputs ({"name": value, ...}), rather than being one input's value."""
    return isinstance(value, dict) and set(value) != {"b64"}


def decode_inputs(model: str, values: Any, rows: bool, specs: Mapping[str, TensorSpec]) -> dict[str, np.ndarray]:
    """The inputs of a row-format ("instances": one entry per row, each an input's value or {name: value}) or a
    columnar ("inputs": an input's value or {name: value} for the whole batch) request, in the inputs' dtypes."""
    if rows:
        if not isinstance(values, list) or not values:
            raise InvalidInputError('"instances" must be a non-empty list, one entry per row')
        if all(_named(instance) for instance in values):
            names = list(values[0])
            for index, instance in enumerate(values):
                if set(instance) != set(names):
                    raise InvalidInputError(
                        f"instance {index} names inputs {sorted(instance)}, instance 0 names {sorted(names)}: every "
                        "instance must name the same inputs"
                    )
            columns = {name: [instance[name] for instance in values] for name in names}
        elif any(_named(instance) for instance in values):
            raise InvalidInputError(
                '"instances" mixes named inputs ({"name": value}) with bare values: use one form for every instance'
            )
        else:
            columns = {_only_input(model, specs): values}
    else:
        columns = dict(values) if _named(values) else {_only_input(model, specs): values}
    arrays = {}
    for name, value in columns.items():
        spec = specs.get(name)
        if spec is None:
            raise InvalidInputError(
                f"model {quoted(model)} has no input named {quoted(name)}; expected inputs: {', '.join(specs)}"
            )
        arrays[name] = array_from_json(f"model {quoted(model)} input {quoted(name)}", value, spec.dtype)
    return arrays


def _only_input(model: str, specs: Mapping[str, TensorSpec]) -> str:
    if len(specs) != 1:
        raise InvalidInputError(
            f"model {quoted(model)} has {len(specs)} inputs ({', '.join(specs)}): name them, as "
            '{"instances": [{"input": value, ...}]} or {"inputs": {"input": value, ...}}'
        )
    return next(iter(specs))


def _output(name: str, array: np.ndarray) -> Any:
    if array.dtype == STRING:
        return strings_to_json(array, b64=name.endswith("_bytes"))
    return jsonable(array)


def predict_document(response: PredictResponse, rows: bool) -> dict[str, Any]:
    """{"predictions": [...]} (row format: one entry per row, {name: value} with several outputs) or {"outputs": ...}
    (columnar: the output, or {name: output} with several)."""
    outputs = response.outputs
    if not rows:
        if len(outputs) == 1:
            return {"outputs": _output(*next(iter(outputs.items())))}
        return {"outputs": {name: _output(name, array) for name, array in outputs.items()}}
    if len(outputs) == 1:
        return {"predictions": _output(*next(iter(outputs.items())))}
    counts = {name: array.shape[0] if array.ndim else None for name, array in outputs.items()}
    if len(set(counts.values())) != 1 or None in counts.values():
        # A model without a batch dimension may answer outputs of unrelated lengths: no rows to pair them in.
        shown = ", ".join(f"{quoted(name)} {'a scalar' if n is None else f'{n} rows'}" for name, n in counts.items())
        raise InvalidInputError(
            f"model {quoted(response.model_spec.name)}: the row format pairs the outputs row by row, but they "
            f'have different numbers of rows ({shown}): send the columnar format ({{"inputs": ...}}) instead'
        )
    columns = {name: _output(name, array) for name, array in outputs.items()}
    count = len(next(iter(outputs.values())))
    return {"predictions": [{name: column[index] for name, column in columns.items()} for index in range(count)]}
