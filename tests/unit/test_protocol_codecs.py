"""The protocol codecs without a server: every datatype both ways, raw and typed, and their error messages."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow as tf
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from server.base.errors import InvalidInputError
from server.protocols.oip import codec as oip_codec
from server.protocols.oip.types import InferResponse
from server.protocols.tfserving import codec as tfserving_codec

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


def _array(datatype: str) -> np.ndarray:
    dtype = oip_codec.DATATYPES[datatype]
    values = np.arange(6).reshape(2, 3) % (2 if datatype == "BOOL" else 100)
    return values.astype(dtype)


def _request(arrays: dict[str, np.ndarray], raw: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, array in arrays.items():
        datatype = oip_codec.datatype_of(array.dtype)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            data = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
            request.raw_input_contents.append(data)
        else:
            values = array.ravel().tolist()
            getattr(tensor.contents, oip_codec._FIELDS[datatype]).extend(values)
    return request


@pytest.mark.parametrize("datatype", [*NUMERIC, "BF16"])
def test_oip_raw_round_trip(datatype):
    array = _array(datatype)
    request = _request({"x": array}, raw=True)
    decoded = oip_codec.decode_inputs("m", request)["x"]
    assert decoded.dtype == array.dtype and np.array_equal(decoded, array)
    response = oip_codec.encode_response(InferResponse("m", "1", (oip_codec.output_tensor("x", decoded),)))
    assert response.outputs[0].datatype == datatype and list(response.outputs[0].shape) == [2, 3]
    assert response.raw_output_contents[0] == array.tobytes()


@pytest.mark.parametrize("datatype", [d for d in NUMERIC if d != "FP16"])
def test_oip_typed_round_trip(datatype):
    array = _array(datatype)
    request = _request({"x": array}, raw=False)
    decoded = oip_codec.decode_inputs("m", request)["x"]
    assert decoded.dtype == array.dtype and np.array_equal(decoded, array)
    response = oip_codec.encode_response(InferResponse("m", "1", (oip_codec.output_tensor("x", decoded),)))
    assert response.raw_output_contents[0] == array.tobytes()  # typed requests are answered raw, as Triton does


def test_oip_bytes_raw_and_typed():
    array = np.array([[b"a", b""], [b"\x00\xff", "ünï".encode()]], dtype=object)
    for raw in (True, False):
        request = _request({"s": array}, raw=raw)
        decoded = oip_codec.decode_inputs("m", request)["s"]
        assert decoded.shape == (2, 2) and decoded.tolist() == array.tolist()
    response = oip_codec.encode_response(InferResponse("m", "1", (oip_codec.output_tensor("s", array),)))
    assert deserialize_bytes_tensor(response.raw_output_contents[0]).tolist() == array.ravel().tolist()


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda r: r.raw_input_contents.__setitem__(0, b"\x00" * 5), "needs 24 bytes of raw contents"),
        (lambda r: r.raw_input_contents.append(b""), "one entry per input (1), got 2"),
        (lambda r: setattr(r.inputs[0], "datatype", "FLOAT32"), "expected one of BOOL"),
        (lambda r: r.inputs[0].shape.__setitem__(0, -1), "non-negative dimensions"),
        (lambda r: (r.inputs.append(r.inputs[0]), r.raw_input_contents.append(r.raw_input_contents[0])), "twice"),
        (lambda r: r.parameters["sequence_id"].CopyFrom(pb.InferParameter(int64_param=3)), "'sequence_id' is not"),
        (
            lambda r: r.inputs[0].parameters["shared_memory_region"].CopyFrom(pb.InferParameter(string_param="r")),
            "'shared_memory_region' is not supported",
        ),
    ],
)
def test_oip_raw_errors(mutate, words):
    request = _request({"x": _array("FP32")}, raw=True)
    mutate(request)
    with pytest.raises(InvalidInputError, match=re.escape(words)):
        oip_codec.check_parameters("model 'm'", request.parameters, oip_codec.REQUEST_PARAMETERS)
        oip_codec.decode_inputs("m", request)


def test_oip_typed_errors_say_which_field_and_range():
    request = _request({"x": _array("FP32")}, raw=False)
    request.inputs[0].contents.ClearField("fp32_contents")
    request.inputs[0].contents.int_contents.extend(range(6))
    with pytest.raises(InvalidInputError, match="go in contents.fp32_contents, got contents.int_contents"):
        oip_codec.decode_inputs("m", request)
    request = _request({"x": _array("INT8")}, raw=False)
    request.inputs[0].contents.int_contents[0] = 300
    with pytest.raises(InvalidInputError, match="from -128 to 127, got 1 to 300"):
        oip_codec.decode_inputs("m", request)
    request = _request({"x": _array("FP16")}, raw=True)
    request.ClearField("raw_input_contents")
    with pytest.raises(InvalidInputError, match="must be sent as raw_input_contents"):
        oip_codec.decode_inputs("m", request)


def test_caller_strings_in_messages_are_bounded():
    request = _request({"x" * 10_000: _array("FP32")}, raw=True)
    request.inputs[0].datatype = "Q" * 10_000
    with pytest.raises(InvalidInputError) as caught:
        oip_codec.decode_inputs("m", request)
    assert len(str(caught.value)) < 500
    with pytest.raises(InvalidInputError) as caught:
        oip_codec.parse_version("m", "v" * 10_000)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.arange(6, dtype=np.float64).reshape(3, 2),
        np.arange(4, dtype=np.float16).reshape(2, 2),
        np.arange(6, dtype=np.int8).reshape(2, 3),
        np.arange(6, dtype=np.uint16).reshape(2, 3),
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.array([[True, False]]),
        np.array([[b"ab", b"c"]], dtype=object),
    ],
)
def test_tfserving_tensor_round_trip(array):
    decoded = tfserving_codec.decode_tensor("m", "x", tf.make_tensor_proto(array))
    assert decoded.shape == array.shape and decoded.tolist() == array.tolist()
    assert np.array_equal(tf.make_ndarray(tfserving_codec.encode_tensor(decoded)).astype(array.dtype), array)


def test_tfserving_one_value_fills_the_shape_and_counts_are_checked():
    proto = tf.make_tensor_proto(2.5, dtype=tf.float32, shape=[2, 2])
    assert tfserving_codec.decode_tensor("m", "x", proto).tolist() == [[2.5, 2.5], [2.5, 2.5]]
    proto = tf.make_tensor_proto(np.zeros((2, 2), np.float32))
    proto.tensor_content = proto.tensor_content[:-1]
    with pytest.raises(InvalidInputError, match="needs 16 bytes of tensor_content"):
        tfserving_codec.decode_tensor("m", "x", proto)
