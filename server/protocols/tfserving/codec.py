"""TensorFlow Serving's gRPC messages <-> numpy and the protocol's plain data (server/protocols/tfserving/types.py):
every conversion between the messages and the handlers (handlers.py).

A TensorProto carries its values either packed (`tensor_content`: little-endian bytes, what
`tf.make_tensor_proto` writes for numbers) or in a typed field (`float_val`, `int_val`, `string_val`, ...,
where one value may stand for the whole shape). Requests may use either. Replies use the typed fields, as
TensorFlow Serving answers by default (`Tensor::AsProtoField`; `tensor_content` only behind its
--enable_serialization_as_tensor_content flag): its own example clients read `outputs[name].float_val`, and
`tf.make_ndarray` reads either. The stubs are the ones the tensorflow-serving-api package ships.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from server.base.errors import InvalidInputError, quoted
from server.base.tensors import MAX_FILL_ELEMENTS, InputLimits, TensorSpec, declared_elements, shape_text
from server.dataplane.inference import ModelMetadata
from server.protocols.tfserving.types import ModelSpec, ModelVersionStatus, PredictRequest, PredictResponse
from server.runtimes.base import shown as shown

METHOD_NAME = "tensorflow/serving/predict"

# TensorFlow dtypes a SavedModel signature can have that numpy (with ml_dtypes) holds, and their value field.
_DTYPES: dict[int, tuple[np.dtype, str]] = {
    types_pb2.DT_FLOAT: (np.dtype(np.float32), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype(np.float64), "double_val"),
    types_pb2.DT_HALF: (np.dtype(np.float16), "half_val"),
    types_pb2.DT_BFLOAT16: (np.dtype(ml_dtypes.bfloat16), "half_val"),
    types_pb2.DT_INT8: (np.dtype(np.int8), "int_val"),
    types_pb2.DT_INT16: (np.dtype(np.int16), "int_val"),
    types_pb2.DT_INT32: (np.dtype(np.int32), "int_val"),
    types_pb2.DT_INT64: (np.dtype(np.int64), "int64_val"),
    types_pb2.DT_UINT8: (np.dtype(np.uint8), "int_val"),
    types_pb2.DT_UINT16: (np.dtype(np.uint16), "int_val"),
    types_pb2.DT_UINT32: (np.dtype(np.uint32), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype(np.uint64), "uint64_val"),
    types_pb2.DT_BOOL: (np.dtype(np.bool_), "bool_val"),
    types_pb2.DT_STRING: (np.dtype(object), "string_val"),
}
_ENUMS = {dtype: enum for enum, (dtype, _) in _DTYPES.items()}


def dtype_enum(dtype: np.dtype) -> int:
    return int(_ENUMS.get(dtype, types_pb2.DT_INVALID))


def model_spec_of(spec: model_pb2.ModelSpec) -> ModelSpec:
    label = spec.version_label if spec.WhichOneof("version_choice") == "version_label" else None
    version = spec.version.value if spec.HasField("version") else 0
    return ModelSpec(spec.name, version, label, spec.signature_name)


def predict_request(request: predict_pb2.PredictRequest) -> PredictRequest:
    """A Predict message as the handler takes it: its tensors are decoded (decode_inputs) when the handler asks,
    within the limits of the model version it resolved."""
    name = request.model_spec.name

    def decode(limits: InputLimits) -> dict[str, np.ndarray]:
        return decode_inputs(name, request.inputs, limits)

    return PredictRequest(model_spec_of(request.model_spec), decode, tuple(request.output_filter))


def decode_tensor(
    model: str, name: str, proto: tensor_pb2.TensorProto, limits: InputLimits | None = None
) -> np.ndarray:
    """One TensorProto as a numpy array of its own shape (the core checks it against the model's signature). The
    declared shape is checked against the model's `limits` (rank, rows, elements) before anything is decoded, and
    one value fills a tensor only as large as the model takes (a broadcast view: nothing is copied)."""
    shown_name = quoted(name)
    if proto.dtype not in _DTYPES:
        label = types_pb2.DataType.Name(proto.dtype) if proto.dtype in types_pb2.DataType.values() else proto.dtype
        supported = ", ".join(types_pb2.DataType.Name(e) for e in _DTYPES)
        raise InvalidInputError(f"model '{model}' input {shown_name} has dtype {label}; supported dtypes: {supported}")
    dtype, field = _DTYPES[proto.dtype]
    if proto.tensor_shape.unknown_rank:
        raise InvalidInputError(f"model '{model}' input {shown_name} needs a known shape with non-negative dimensions")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    count = declared_elements(model, name, shape, limits)
    if proto.tensor_content and dtype != np.dtype(object):
        if len(proto.tensor_content) != count * dtype.itemsize:
            raise InvalidInputError(
                f"model '{model}' input {shown_name} of shape {shape_text(shape)} needs {count * dtype.itemsize} bytes "
                f"of tensor_content ({count} x {dtype.itemsize}), got {len(proto.tensor_content)}"
            )
        return (
            np.frombuffer(proto.tensor_content, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)
        )
    values = getattr(proto, field)
    if len(values) not in (count, 1) or (len(values) == 1 and count == 0):
        raise InvalidInputError(
            f"model '{model}' input {shown_name} of shape {shape_text(shape)} needs {count} values in {field} "
            f"(or one for all), got {len(values)}"
        )
    most = (limits.max_elements(name) if limits is not None else None) or MAX_FILL_ELEMENTS
    if len(values) == 1 and count > most:
        raise InvalidInputError(
            f"model '{model}' input {shown_name} of shape {shape_text(shape)}: one value fills at most {most} "
            f"elements, got a shape of {count}; send the model's shape"
        )
    if dtype == np.dtype(object):
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
    elif field == "half_val":
        array = np.fromiter(values, dtype=np.uint16, count=len(values)).view(dtype)
    else:
        array = np.fromiter(values, dtype=np.int64 if field == "int_val" else dtype, count=len(values))
        if field == "int_val":
            info = np.iinfo(dtype)
            if len(array) and (array.min() < info.min or array.max() > info.max):
                raise InvalidInputError(
                    f"model '{model}' input {shown_name} of dtype {dtype.name} takes values from {info.min} to "
                    f"{info.max}, got {array.min()} to {array.max()}"
                )
            array = array.astype(dtype)
    return (np.broadcast_to(array, shape) if len(values) == 1 else array).reshape(shape)


def decode_inputs(
    model: str, inputs: Mapping[str, tensor_pb2.TensorProto], limits: InputLimits | None = None
) -> dict[str, np.ndarray]:
    """Every input's declared shape is checked (decode_tensor) before the next one is decoded; a one-value tensor
    is a view, so nothing is allocated beyond the values sent."""
    return {name: decode_tensor(model, name, proto, limits) for name, proto in inputs.items()}


def output_names(model: str, specs: Mapping[str, TensorSpec], output_filter: Sequence[str]) -> list[str]:
    """The outputs to return: those in `output_filter` (each must exist), else all of them."""
    for name in output_filter:
        if name not in specs:
            raise InvalidInputError(
                f"model '{model}' output_filter names {quoted(name)}, which is not an output; "
                f"outputs: {', '.join(specs)}"
            )
    return list(dict.fromkeys(output_filter)) if output_filter else list(specs)


def _shape(dims: Iterable[int]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])


def encode_tensor(array: np.ndarray) -> tensor_pb2.TensorProto:
    """One output in its dtype's typed field, every value written out, as TF Serving's Tensor::AsProtoField does:
    float_val, double_val, int_val (8- to 32-bit integers), int64_val, uint32_val, uint64_val, bool_val,
    string_val, and half_val holding the 16 bits of each float16 or bfloat16."""
    enum = dtype_enum(array.dtype)
    proto = tensor_pb2.TensorProto(dtype=enum, tensor_shape=_shape(array.shape))
    name = _DTYPES[enum][1]
    field = getattr(proto, name)
    if array.dtype == np.dtype(object):
        field.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.ravel())
    elif name == "half_val":
        field.extend(array.view(np.uint16).ravel().tolist())
    else:
        field.extend(array.ravel().tolist())
    return proto


def model_spec(spec: ModelSpec) -> model_pb2.ModelSpec:
    """The served model's spec, as TF Serving echoes it: Predict names the signature, GetModelMetadata does not."""
    message = model_pb2.ModelSpec(name=spec.name, signature_name=spec.signature_name)
    message.version.value = spec.version
    return message


def predict_response(response: PredictResponse) -> predict_pb2.PredictResponse:
    return predict_pb2.PredictResponse(
        model_spec=model_spec(response.model_spec),
        outputs={name: encode_tensor(array) for name, array in response.outputs.items()},
    )


def _tensor_info(spec: TensorSpec, batched: bool) -> meta_graph_pb2.TensorInfo:
    return meta_graph_pb2.TensorInfo(
        name=spec.name,
        dtype=dtype_enum(spec.dtype),
        tensor_shape=_shape([*([-1] if batched else []), *(-1 if d is None else d for d in spec.shape)]),
    )


def metadata_response(meta: ModelMetadata) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """GetModelMetadata's one field, `signature_def`. For a SavedModel, its whole SignatureDefMap as saved_model.pb
    holds it, as TF Serving answers (every signature, `__saved_model_init_op` included, with method names and graph
    tensor names). For a format without one (a .keras file), the one signature built from the specs, rows first as -1
    (a model without a batch dimension: its whole shapes)."""
    if meta.signature_defs:
        signatures = get_model_metadata_pb2.SignatureDefMap.FromString(meta.signature_defs)
    else:
        signature = meta_graph_pb2.SignatureDef(
            inputs={s.name: _tensor_info(s, meta.batched) for s in meta.inputs},
            outputs={s.name: _tensor_info(s, meta.batched) for s in meta.outputs},
            method_name=METHOD_NAME,
        )
        signatures = get_model_metadata_pb2.SignatureDefMap(signature_def={meta.signature: signature})
    response = get_model_metadata_pb2.GetModelMetadataResponse(
        model_spec=model_spec(ModelSpec(meta.name, meta.version))
    )
    response.metadata["signature_def"].Pack(signatures)
    return response


def status_response(statuses: Iterable[ModelVersionStatus]) -> get_model_status_pb2.GetModelStatusResponse:
    state = get_model_status_pb2.ModelVersionStatus.State
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in statuses:
        message = response.model_version_status.add(version=status.version, state=state.Value(status.state))
        if status.error_message:
            message.status.error_code = status.error_code
            message.status.error_message = status.error_message
    return response
