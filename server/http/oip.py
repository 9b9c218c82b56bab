"""The Open Inference Protocol over HTTP (KServe v2 / Triton's HTTP API): its routes, JSON bodies and Triton's binary
tensor data extension, over the protocol's transport-free handlers (server/protocols/oip/handlers.py).

A request body is JSON, or, with the header `Inference-Header-Content-Length: N`, N bytes of JSON followed by the
binary data of the inputs that say `"parameters": {"binary_data_size": n}`, in order. An output is answered as
binary data after the JSON header when the request asks for it (`binary_data` on the output, or
`binary_data_output` on the request, as tritonclient.http does by default), as JSON `data` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from server.base.errors import InvalidInputError, quoted
from server.base.tensors import InputLimits, declared_elements
from server.dataplane.inference import InferenceService
from server.http.api import HttpRequest, HttpResponse, Route, empty_response, json_response
from server.http.tensors import array_from_json, jsonable, parse_json
from server.protocols.oip import codec
from server.protocols.oip.handlers import Method, OipHandlers
from server.protocols.oip.types import InferInput, InferRequest, InferResponse, Parameter, RequestedOutput

HEADER_LENGTH = "inference-header-content-length"
_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
# Protobuf's JSON writes these (64-bit integers) as strings; Triton's HTTP API writes ModelConfig's as numbers.
_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def routes(core: InferenceService, repository_control: bool) -> list[Route]:
    handlers = OipHandlers(core, repository_control)
    endpoints = OipEndpoints(handlers)

    def not_offered(method: Method) -> Any:
        async def refuse(request: HttpRequest) -> HttpResponse:
            handlers.not_offered(method)

        return refuse

    shared_memory = r"(?:/region/[^/]+)?/(?P<action>status|register|unregister)"
    return [
        Route("GET", r"/v2/health/live", endpoints.live, Method.ServerLive, open=True, model=None),
        Route("GET", r"/v2/health/ready", endpoints.ready, Method.ServerReady, open=True, model=None),
        Route("GET", r"/v2", endpoints.server_metadata, Method.ServerMetadata, model=None),
        Route("GET", r"/v2/models/stats", endpoints.statistics, Method.ModelStatistics, model=None),
        Route("GET", _MODEL, endpoints.model_metadata, Method.ModelMetadata),
        Route("GET", _MODEL + "/ready", endpoints.model_ready, Method.ModelReady, open=True),  # a health endpoint
        Route("GET", _MODEL + "/config", endpoints.model_config, Method.ModelConfig),
        Route("GET", _MODEL + "/stats", endpoints.statistics, Method.ModelStatistics),
        Route("POST", _MODEL + "/infer", endpoints.infer, Method.ModelInfer, admitted=True, reads_body=True),
        Route("POST", r"/v2/repository/index", endpoints.index, Method.RepositoryIndex, model=None, reads_body=True),
        Route(
            "POST",
            r"/v2/repository/models/(?P<model>[^/]+)/load",
            endpoints.load,
            Method.RepositoryModelLoad,
            reads_body=True,
        ),  # fmt: skip
        Route(
            "POST",
            r"/v2/repository/models/(?P<model>[^/]+)/unload",
            endpoints.unload,
            Method.RepositoryModelUnload,
            reads_body=True,
        ),  # fmt: skip
        # The extensions we do not offer, answered with the extension's name and what to do instead.
        *(
            Route(verb, rf"/v2/{kind}" + shared_memory, not_offered(method), method, model=None)
            for verb in ("GET", "POST")
            for kind, method in (
                ("systemsharedmemory", Method.SystemSharedMemoryStatus),
                ("cudasharedmemory", Method.CudaSharedMemoryStatus),
            )
        ),
        *(
            Route(verb, path, not_offered(Method.TraceSetting), Method.TraceSetting, model=None)
            for verb in ("GET", "POST")
            for path in (r"/v2/trace/setting", _MODEL + "/trace/setting")
        ),
        *(
            Route(verb, r"/v2/logging", not_offered(Method.LogSettings), Method.LogSettings, model=None)
            for verb in ("GET", "POST")
        ),  # fmt: skip
    ]


class OipEndpoints:
    def __init__(self, handlers: OipHandlers) -> None:
        self.handlers = handlers

    # -- health and metadata --------------------------------------------------------------------------------------

    async def live(self, request: HttpRequest) -> HttpResponse:
        return empty_response(200 if self.handlers.server_live() else 400)

    async def ready(self, request: HttpRequest) -> HttpResponse:
        """200 when ready, 400 otherwise (the protocol's 4xx for false, as Triton answers), so a Kubernetes
        httpGet probe can use it."""
        return empty_response(200 if self.handlers.server_ready() else 400)

    async def model_ready(self, request: HttpRequest) -> HttpResponse:
        ready = self.handlers.model_ready(request.params["model"], request.params.get("version", ""))
        return empty_response(200 if ready else 400)

    async def server_metadata(self, request: HttpRequest) -> HttpResponse:
        return json_response(asdict(self.handlers.server_metadata()))

    async def model_metadata(self, request: HttpRequest) -> HttpResponse:
        metadata = self.handlers.model_metadata(request.params["model"], request.params.get("version", ""))
        return json_response(asdict(metadata))

    async def model_config(self, request: HttpRequest) -> HttpResponse:
        """Triton's ModelConfig as its HTTP API writes it: protobuf's JSON with field names as in the .proto, every
        field present, and int64 numbers as numbers (perf_analyzer reads it)."""
        config = self.handlers.model_config(request.params["model"], request.params.get("version", ""))
        document = json_format.MessageToDict(
            config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        return json_response(_int64_as_numbers(document, config.DESCRIPTOR))

    async def statistics(self, request: HttpRequest) -> HttpResponse:
        statistics = self.handlers.model_statistics(request.params.get("model", ""), request.params.get("version", ""))
        return json_response({"model_stats": [asdict(model) for model in statistics]})

    # -- inference ------------------------------------------------------------------------------------------------

    async def infer(self, request: HttpRequest) -> HttpResponse:
        infer_request, binary_outputs = infer_request_of(
            request.params["model"], request.params.get("version", ""), request.body, request.headers
        )
        return infer_response(await self.handlers.infer(infer_request), binary_outputs)

    # -- model repository extension -------------------------------------------------------------------------------

    async def index(self, request: HttpRequest) -> HttpResponse:
        body = _object(request.body, "the RepositoryIndex request") if request.body.strip() else {}
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInputError(f"'ready' must be true or false, got {_shown(ready)}")
        models = self.handlers.repository_index("", ready)
        return json_response([{k: v for k, v in asdict(m).items() if v or k == "name"} for m in models])

    async def load(self, request: HttpRequest) -> HttpResponse:
        body = _object(request.body, "the RepositoryModelLoad request") if request.body.strip() else {}
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInputError("'parameters' must be an object")
        await self.handlers.repository_load("", request.params["model"], list(parameters))
        return json_response({})

    async def unload(self, request: HttpRequest) -> HttpResponse:
        if request.body.strip():
            _object(request.body, "the RepositoryModelUnload request")  # its parameters (unload_dependents): none apply
        await self.handlers.repository_unload("", request.params["model"])
        return json_response({})


@dataclass(frozen=True)
class BinaryOutputs:
    """Which outputs a reply carries as binary data: those whose request says `binary_data` true, and with the
    request's `binary_data_output` true every output whose request does not say false."""

    default: bool = False
    by_name: Mapping[str, bool] = field(default_factory=dict)

    def wanted(self, name: str) -> bool:
        return self.by_name.get(name, self.default)


def _shown(value: Any) -> str:
    """A caller's JSON value for an error message, cut short (it may be megabytes)."""
    return quoted(orjson.dumps(value).decode())


def _object(body: bytes, what: str) -> dict[str, Any]:
    value = parse_json(body, what)
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _int64_as_numbers(document: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    """A message's JSON (field names as in the .proto) with every 64-bit integer field a number, as Triton writes
    its ModelConfig (dims, max_queue_delay_microseconds, priority_levels, ...), in nested messages and maps too."""
    fixed = {}
    for key, value in document.items():
        field_descriptor = descriptor.fields_by_name.get(key)
        fixed[key] = value if field_descriptor is None else _field_as_numbers(value, field_descriptor)
    return fixed


def _field_as_numbers(value: Any, field_descriptor: FieldDescriptor) -> Any:
    message = field_descriptor.message_type
    if message is not None and message.GetOptions().map_entry and isinstance(value, dict):
        entry = message.fields_by_name["value"]  # a map's keys stay strings, as JSON's keys are
        return {k: _field_as_numbers(v, entry) for k, v in value.items()}
    if isinstance(value, list):
        return [_field_as_numbers(v, field_descriptor) for v in value]
    if message is not None and isinstance(value, dict):
        return _int64_as_numbers(value, message)
    if field_descriptor.type in _INT64_TYPES and isinstance(value, str):
        return int(value)
    return value


# -- requests ---------------------------------------------------------------------------------------------------------


def _parameters(where: str, value: Any) -> dict[str, Parameter]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        v is None or isinstance(v, bool | int | float | str) for v in value.values()
    ):
        raise InvalidInputError(f"{where}: 'parameters' must be an object of booleans, numbers and strings")
    return value


def _flag(where: str, parameters: Mapping[str, Any], key: str) -> bool:
    """A boolean parameter (absent or null: false); anything but true or false is refused rather than read as false."""
    value = parameters.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInputError(f"{where}: parameter {quoted(key)} must be true or false, got {_shown(value)}")
    return value


def _string(where: str, tensor: Mapping[str, Any], key: str) -> str:
    value = tensor.get(key)
    if not isinstance(value, str):
        raise InvalidInputError(f"{where} needs {quoted(key)} as a string, got {_shown(value)}")
    return value


def _shape(where: str, tensor: Mapping[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInputError(f"{where} needs 'shape' as a list of integers, got {_shown(shape)}")
    return shape


def infer_request_of(
    model: str, version: str, body: bytes, headers: Mapping[str, str]
) -> tuple[InferRequest, BinaryOutputs]:
    """An infer body as the handler takes it, and the outputs to answer in binary (True: all of them)."""
    header, binary = _split(body, headers)
    document = _object(header, "the inference request (JSON)")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, dict) for t in inputs):
        raise InvalidInputError(f"model {quoted(model)}: 'inputs' must be a non-empty list of tensor objects")
    declared = []
    for index, tensor in enumerate(inputs):
        where = f"model {quoted(model)} input {index}"
        name = _string(where, tensor, "name")
        declared.append((name, _string(f"model {quoted(model)} input {quoted(name)}", tensor, "datatype")))
    outputs_json = document.get("outputs") or []
    if not isinstance(outputs_json, list) or not all(isinstance(o, dict) for o in outputs_json):
        raise InvalidInputError(f"model {quoted(model)}: 'outputs' must be a list of objects with a 'name'")
    outputs = []
    for output in outputs_json:
        name = _string(f"model {quoted(model)} requested output", output, "name")
        outputs.append(
            RequestedOutput(name, _parameters(f"model {quoted(model)} output {quoted(name)}", output.get("parameters")))
        )
    parameters = _parameters(f"model {quoted(model)}", document.get("parameters"))
    binary_outputs = BinaryOutputs(
        _flag(f"model {quoted(model)}", parameters, "binary_data_output"),
        {
            o.name: _flag(f"model {quoted(model)} output {quoted(o.name)}", o.parameters, "binary_data")
            for o in outputs
            if "binary_data" in o.parameters
        },
    )

    def decode(limits: InputLimits) -> dict[str, np.ndarray]:
        return decode_inputs(model, inputs, binary, limits)

    request_id = document.get("id", "")
    return (
        InferRequest(
            model_name=model,
            model_version=version,
            inputs=tuple(InferInput(name, datatype) for name, datatype in declared),
            decode=decode,
            outputs=tuple(outputs),
            parameters=parameters,
            id=request_id if isinstance(request_id, str) else str(request_id),
        ),
        binary_outputs,
    )


def _split(body: bytes, headers: Mapping[str, str]) -> tuple[bytes, bytes]:
    """(JSON header, binary data) of a body, by the Inference-Header-Content-Length header."""
    length_text = headers.get(HEADER_LENGTH)
    if length_text is None:
        return body, b""
    text = length_text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):  # "²" is a digit to isdigit()
        raise InvalidInputError(f"Inference-Header-Content-Length must be a number of bytes, got {quoted(text)}")
    length = int(length_text)
    if length > len(body):
        raise InvalidInputError(
            f"Inference-Header-Content-Length is {length}, more than the whole body ({len(body)} bytes): the header "
            "must give the length of the JSON part that starts the body"
        )
    return body[:length], body[length:]


def decode_inputs(
    model: str, inputs: Sequence[Mapping[str, Any]], binary: bytes, limits: InputLimits | None
) -> dict[str, np.ndarray]:
    """Every declared shape is checked against the model's limits before any tensor is decoded; binary inputs take
    their bytes from `binary` in order, and together they must use it all."""
    shapes = []
    for tensor in inputs:
        name = tensor["name"]
        shape = _shape(f"model {quoted(model)} input {quoted(name)}", tensor)
        shapes.append((shape, declared_elements(model, name, shape, limits)))
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor, (shape, count) in zip(inputs, shapes, strict=True):
        name, datatype = tensor["name"], tensor["datatype"]
        where = f"model {quoted(model)} input {quoted(name)}"
        parameters = _parameters(where, tensor.get("parameters"))
        codec.check_parameters(where, parameters, codec.INPUT_PARAMETERS)
        if name in arrays:
            raise InvalidInputError(f"{where} appears twice in the request")
        dtype = codec.DATATYPES.get(datatype)
        if dtype is None:
            raise InvalidInputError(
                f"{where} has datatype {quoted(datatype)}; expected one of {', '.join(codec.DATATYPES)}"
            )
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInputError(f"{where}: 'binary_data_size' must be a number of bytes, got {_shown(size)}")
            if "data" in tensor:
                raise InvalidInputError(f"{where} has both 'data' and 'binary_data_size': send its values once")
            if offset + size > len(binary):
                raise InvalidInputError(
                    f"{where} says binary_data_size {size}, but the body has only {len(binary) - offset} bytes of "
                    "binary data left after the JSON header (Inference-Header-Content-Length)"
                )
            arrays[name] = codec.raw_tensor(model, name, datatype, shape, binary[offset : offset + size], count)
            offset += size
            continue
        if "data" not in tensor:
            raise InvalidInputError(f"{where} has no 'data' (nor 'binary_data_size' in its parameters)")
        array = array_from_json(where, tensor["data"], dtype)
        if array.size != count:
            raise InvalidInputError(f"{where} has shape {shape} ({count} elements), got {array.size} values in 'data'")
        arrays[name] = array.reshape(shape)
    if offset != len(binary):
        raise InvalidInputError(
            f"model {quoted(model)}: the body has {len(binary)} bytes of binary data after the JSON header, but the "
            f"inputs' binary_data_size add up to {offset}: Inference-Header-Content-Length or binary_data_size is wrong"
        )
    return arrays


# -- replies ----------------------------------------------------------------------------------------------------------


def infer_response(response: InferResponse, binary_outputs: BinaryOutputs) -> HttpResponse:
    """The reply as JSON, with the outputs asked for in binary after it (and its length in the header)."""
    outputs = []
    parts = []
    for output in response.outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if binary_outputs.wanted(output.name):
            if output.datatype == "BYTES":
                data = codec.serialize_bytes(output.data)
            else:
                data = np.ascontiguousarray(output.data, output.data.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            parts.append(data)
        else:
            entry["data"] = jsonable(output.data.ravel())
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = dict(response.parameters)
    document["outputs"] = outputs
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not parts:
        return HttpResponse(200, header)
    return HttpResponse(
        200,
        b"".join([header, *parts]),
        "application/octet-stream",
        [(HEADER_LENGTH.encode(), str(len(header)).encode())],
    )
