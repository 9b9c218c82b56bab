"""Open Inference Protocol (KServe v2) gRPC messages <-> numpy and the protocol's plain data
(server/protocols/oip/types.py): every conversion between the messages and the handlers (handlers.py).

Tensors arrive either typed (`contents`, one repeated field per datatype) or raw (`raw_input_contents`:
little-endian bytes, BYTES elements as a 4-byte length and the bytes). Raw bytes decode without a copy
(`np.frombuffer`). Replies are always raw (`raw_output_contents`), as Triton sends them whatever the request
used: stock clients and tritonclient's `InferResult.as_numpy` read only that. The stubs are the ones tritonclient
ships. Where the protocol's reference server words an error in a way its clients check, our message contains
Triton's phrase and then says what we expected and received.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import ml_dtypes
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from server.base.errors import InvalidInputError, quoted, quoted_list
from server.base.tensors import InputLimits, TensorSpec, declared_elements, shape_text
from server.protocols.oip.types import (
    InferInput,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelStatistics,
    OutputTensor,
    Parameter,
    RepositoryModel,
    RequestedOutput,
    ServerMetadata,
    TensorMetadata,
)

# The protocol's datatypes, and the numpy dtype each one is (little-endian on the wire).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(object),
}
DATATYPE_NAMES = {dtype: name for name, dtype in DATATYPES.items()}

# Which InferTensorContents field carries each datatype when sent typed; FP16 and BF16 go raw only.
_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_FIELDS = sorted(set(_FIELDS.values()))

# Parameters we take (and what we do with them); any other key is refused, naming these.
REQUEST_PARAMETERS = {
    "timeout": "an int64 deadline in microseconds, applied like a gRPC deadline",
    # perf_analyzer and tritonclient streams send it; with one response per request every response is final.
    "triton_enable_empty_final_response": "accepted; each response is final and says so (triton_final_response)",
    "binary_data_output": "over HTTP: every output as binary data after the JSON header (gRPC replies are raw)",
}
INPUT_PARAMETERS = {"binary_data_size": "over HTTP: the bytes of the input's binary data after the JSON header"}
OUTPUT_PARAMETERS = {
    "binary_data": "over HTTP: the output as binary data after the JSON header (gRPC replies are always raw)",
    "classification": "an int64 > 0: the output's top classes, as BYTES 'score:index' (no labels)",
}
# Datatypes Triton's classification extension ranks (not BOOL, BYTES, FP16 or BF16).
CLASSIFIABLE = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64")


def datatype_of(dtype: np.dtype) -> str:
    """The protocol's name for a numpy dtype (TF strings are numpy objects: BYTES)."""
    try:
        return DATATYPE_NAMES[dtype]
    except KeyError:
        raise InvalidInputError(f"dtype {dtype.name} has no Open Inference Protocol datatype") from None


def parse_version(model: str, version: str) -> int:
    """OIP versions are strings: "" is the latest (0 for the core), otherwise a positive decimal integer."""
    if version == "":
        return 0
    if (
        not (version.isascii() and version.isdigit() and len(version) <= 18) or int(version) < 1
    ):  # "²" is a digit to isdigit()
        raise InvalidInputError(
            f"failed to get model version from specified version string {quoted(version)}: model {quoted(model)} "
            "versions are positive integers, or '' for the latest"
        )
    return int(version)


def check_parameters(where: str, parameters: Mapping[str, object], allowed: Mapping[str, str]) -> None:
    unknown = sorted(set(parameters) - set(allowed))
    if unknown:
        supported = "; ".join(f"'{k}': {v}" for k, v in allowed.items()) or "none"
        raise InvalidInputError(
            f"{where}: parameter {quoted_list(unknown)} is not supported "
            f"(no sequences, priorities, shared memory or classification here); supported: {supported}"
        )


def deserialize_bytes(model: str, name: str, raw: bytes) -> np.ndarray:
    """BYTES raw contents: each element a 4-byte little-endian length followed by that many bytes."""
    items, offset, view = [], 0, memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInputError(f"model '{model}' input {name}: BYTES raw contents end inside a length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInputError(
                f"model '{model}' input {name}: a BYTES element of {length} bytes runs past the end of its "
                f"raw contents ({len(raw)} bytes)"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.ravel():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def _from_raw(
    model: str, tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype, raw: bytes, count: int
) -> np.ndarray:
    return raw_tensor(model, tensor.name, tensor.datatype, tuple(tensor.shape), raw, count)


def raw_tensor(model: str, name: str, datatype: str, shape: Sequence[int], raw: bytes, count: int) -> np.ndarray:
    """An input tensor from its raw bytes (gRPC's raw_input_contents, or a binary part of an HTTP body): little-endian
    values, or BYTES elements each after its 4-byte length. `count`: the elements of the declared shape, already
    checked against the limits (declared_elements)."""
    shown = quoted(name)
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        if count > len(raw) // 4:  # each element has a 4-byte length: no need to read on
            raise InvalidInputError(
                f"model '{model}' input {shown} has shape {shape_text(shape)} ({count} elements), "
                f"got {len(raw)} bytes of BYTES raw contents: at least 4 per element"
            )
        array = deserialize_bytes(model, shown, raw)
        if array.size != count:
            raise InvalidInputError(
                f"model '{model}' input {shown} has shape {shape_text(shape)} ({count} elements), "
                f"got {array.size} BYTES elements"
            )
        return array.reshape(tuple(shape))
    if len(raw) != count * dtype.itemsize:
        raise InvalidInputError(
            f"model '{model}' input {shown} of shape {shape_text(shape)} and datatype {datatype} needs "
            f"{count * dtype.itemsize} bytes of raw contents ({count} x {dtype.itemsize}), got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(tuple(shape))


def _from_contents(
    model: str, tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype, count: int
) -> np.ndarray:
    """`count`: the elements of the declared shape, already checked against the limits (declared_elements)."""
    name = quoted(tensor.name)
    field = _FIELDS.get(tensor.datatype)
    if field is None:
        raise InvalidInputError(
            f"model '{model}' input {name} of datatype {tensor.datatype} must be sent as raw_input_contents "
            "(the protocol has no typed field for it)"
        )
    used = [f for f in _ALL_FIELDS if len(getattr(tensor.contents, f))]
    if used and used != [field]:
        raise InvalidInputError(
            f"model '{model}' input {name} has datatype {tensor.datatype}: its values go in contents.{field}, "
            f"got {', '.join('contents.' + f for f in used)}"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"model '{model}' input {name} has shape {shape_text(tensor.shape)} ({count} elements), "
            f"got {len(values)} values in contents.{field}"
        )
    if tensor.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
    elif dtype.kind in "iu" and dtype.itemsize < 4:
        wide = np.fromiter(values, dtype=np.int64, count=count)
        info = np.iinfo(dtype)
        if count and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInputError(
                f"model '{model}' input {name} of datatype {tensor.datatype} takes values from {info.min} to "
                f"{info.max}, got {wide.min()} to {wide.max()}"
            )
        array = wide.astype(dtype)
    else:
        array = np.fromiter(values, dtype=dtype, count=count)
    return array.reshape(tuple(tensor.shape))


def decode_inputs(
    model: str, request: pb.ModelInferRequest, limits: InputLimits | None = None
) -> dict[str, np.ndarray]:
    """The request's input tensors as numpy arrays (rows first), checked against the request's own shapes;
    the core then checks them against the model's signature. Every declared shape is checked against the
    model's `limits` (rank, rows, elements) before any tensor is decoded."""
    raw = request.raw_input_contents
    typed = next((t for t in request.inputs if t.HasField("contents")), None)
    if raw and typed is not None:
        raise InvalidInputError(
            f"contents field must not be specified when using raw_input_contents for {quoted(typed.name)} for model "
            f"{quoted(model)}: send every input raw (one raw_input_contents entry per input, in order) or every input "
            f"typed (contents), got {len(raw)} raw entries and contents in input {quoted(typed.name)}"
        )
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"model '{model}': raw_input_contents must hold one entry per input ({len(request.inputs)}), "
            f"got {len(raw)}; send every input raw or every input typed"
        )
    counts = [declared_elements(model, tensor.name, tensor.shape, limits) for tensor in request.inputs]
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = quoted(tensor.name)
        check_parameters(f"model '{model}' input {name}", tensor.parameters, INPUT_PARAMETERS)
        if tensor.name in arrays:
            raise InvalidInputError(f"model '{model}' input {name} appears twice in the request")
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidInputError(
                f"model '{model}' input {name} has datatype {quoted(tensor.datatype)}; "
                f"expected one of {', '.join(DATATYPES)}"
            )
        if raw:
            arrays[tensor.name] = _from_raw(model, tensor, dtype, raw[index], counts[index])
        else:
            arrays[tensor.name] = _from_contents(model, tensor, dtype, counts[index])
    return arrays


def classify(array: np.ndarray, count: int, batched: bool) -> np.ndarray:
    """The top `count` classes of each row (of the whole tensor for a model without a batch dimension), highest
    score first, as Triton writes them: b"<score>:<index>" with the score as C's "%f" (integers as integers)."""
    rows = array.reshape(len(array), -1) if batched else array.reshape(1, -1)
    k = min(count, rows.shape[1])
    number = "{:f}" if array.dtype.kind == "f" else "{:d}"
    classes = np.empty((len(rows), k), dtype=object)
    for r, row in enumerate(rows.tolist()):
        top = sorted(range(len(row)), key=lambda i: row[i], reverse=True)[:k]  # stable: ties keep index order
        classes[r] = [f"{number.format(row[i])}:{i}".encode() for i in top]
    return classes if batched else classes[0]


def output_tensor(name: str, array: np.ndarray) -> OutputTensor:
    """An output of a reply, with the protocol's datatype for its dtype."""
    return OutputTensor(name, datatype_of(array.dtype), array)


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    """The reply: every output in raw_output_contents (one entry per output, in order), whether the request came raw
    or typed, as Triton answers."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    _set_parameters(message.parameters, response.parameters)
    for output in response.outputs:
        message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if output.datatype == "BYTES":
            message.raw_output_contents.append(serialize_bytes(output.data))
        else:
            little_endian = np.ascontiguousarray(output.data, output.data.dtype.newbyteorder("<"))
            message.raw_output_contents.append(little_endian.tobytes())
    return message


def tensor_metadata(specs: Sequence[TensorSpec], batched: bool = True) -> tuple[TensorMetadata, ...]:
    """Shapes with the rows first as -1 (any) for a batched model, the whole shapes for an unbatched one, and -1
    for any other dimension of variable size."""
    rows = [-1] if batched else []
    return tuple(TensorMetadata(s.name, datatype_of(s.dtype), (*rows, *_dims(s))) for s in specs)


def _config_type(dtype: np.dtype) -> int:
    return int(mc.DataType.Value("TYPE_STRING" if dtype == np.dtype(object) else f"TYPE_{datatype_of(dtype)}"))


def model_config(
    name: str,
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    batching: tuple[tuple[int, ...], float] | None,
    parameters: Mapping[str, str] | None = None,
) -> mc.ModelConfig:
    """The model as Triton's ModelConfig describes it: rows are the batch dimension (left out of dims), and
    dynamic batching lists our allowed batch sizes and the batch timeout when batching is on. A model without
    a batch dimension has max_batch_size 0, its whole shapes as dims, and no dynamic batching."""
    config = mc.ModelConfig(
        name=name,
        platform=platform,
        backend="tensorflow",
        max_batch_size=max_batch_size,
        input=[mc.ModelInput(name=s.name, data_type=_config_type(s.dtype), dims=_dims(s)) for s in inputs],
        output=[mc.ModelOutput(name=s.name, data_type=_config_type(s.dtype), dims=_dims(s)) for s in outputs],
    )
    if batching is not None:
        sizes, timeout = batching
        config.dynamic_batching.preferred_batch_size.extend(sizes)
        config.dynamic_batching.max_queue_delay_microseconds = int(timeout * 1e6)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


def _dims(spec: TensorSpec) -> list[int]:
    return [-1 if d is None else d for d in spec.shape]


# -- requests -----------------------------------------------------------------------------------------------------


def parameter_value(parameter: pb.InferParameter) -> Parameter:
    """An InferParameter's value, whichever field carries it (None when it carries none)."""
    kind = parameter.WhichOneof("parameter_choice")
    value: Parameter = None if kind is None else getattr(parameter, kind)
    return value


def _parameters(parameters: Mapping[str, pb.InferParameter]) -> dict[str, Parameter]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def _set_parameters(message: Mapping[str, pb.InferParameter], parameters: Mapping[str, Parameter]) -> None:
    for key, value in parameters.items():
        field = message[key]
        if isinstance(value, bool):
            field.bool_param = value
        elif isinstance(value, int):
            field.int64_param = value
        elif isinstance(value, float):
            field.double_param = value
        elif isinstance(value, str):
            field.string_param = value


def infer_request(request: pb.ModelInferRequest) -> InferRequest:
    """A ModelInfer message as the handler takes it: its tensors are decoded (decode_inputs) when the handler asks,
    within the limits of the model version it resolved."""
    name = request.model_name

    def decode(limits: InputLimits) -> dict[str, np.ndarray]:
        return decode_inputs(name, request, limits)

    return InferRequest(
        model_name=name,
        model_version=request.model_version,
        inputs=tuple(InferInput(tensor.name, tensor.datatype) for tensor in request.inputs),
        decode=decode,
        outputs=tuple(RequestedOutput(output.name, _parameters(output.parameters)) for output in request.outputs),
        parameters=_parameters(request.parameters),
        id=request.id,
    )


# -- replies ------------------------------------------------------------------------------------------------------


def server_metadata_response(metadata: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(**asdict(metadata))


def metadata_response(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(**asdict(metadata))


def statistics_response(statistics: Sequence[ModelStatistics]) -> pb.ModelStatisticsResponse:
    return pb.ModelStatisticsResponse(model_stats=[asdict(model) for model in statistics])


def index_response(models: Sequence[RepositoryModel]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(models=[asdict(model) for model in models])
