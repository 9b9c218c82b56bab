"""Packed `repeated float` fields read straight from a request's bytes (grpc/rpc.py) equal what the message holds,
however the sender framed them: packed in one piece or several, unpacked, empty, beside other fields."""

from __future__ import annotations

import numpy as np
import pytest

from modelserver.v1 import modelserver_pb2 as pb
from server.grpc.rpc import MalformedRequest, WithFloats, _safe_decoder, packed_floats


def decode(message_class, data: bytes):
    return _safe_decoder(message_class)(data)


def test_packed_floats_are_read_from_the_bytes_and_equal_the_message():
    values = np.random.default_rng(0).random(3 * 784, dtype=np.float32)
    data = pb.PredictResidualCnnRequest(image=values.tolist(), version=7).SerializeToString()
    request = decode(pb.PredictResidualCnnRequest, data)
    assert isinstance(request, WithFloats) and request.version == 7
    assert request.floats["image"].dtype == np.float32
    np.testing.assert_array_equal(request.floats["image"], values)
    np.testing.assert_array_equal(request.floats["image"], np.array(request.message.image, np.float32))


def test_two_fields_pieces_of_one_field_and_empty_fields():
    a, b = [1.5, -2.0, 3.25], [0.5] * 20
    one = pb.PredictMultiInputRequest(input_a=a[:2]).SerializeToString()
    two = pb.PredictMultiInputRequest(input_a=a[2:], input_b=b, version=2).SerializeToString()
    request = decode(pb.PredictMultiInputRequest, one + two)  # concatenated messages merge: input_a in two pieces
    np.testing.assert_array_equal(request.floats["input_a"], np.array(a, np.float32))
    np.testing.assert_array_equal(request.floats["input_b"], np.array(b, np.float32))
    empty = decode(pb.PredictMultiInputRequest, b"")
    assert empty.floats["input_a"].shape == (0,) and empty.floats["input_b"].shape == (0,)


def test_unpacked_floats_are_read_through_the_message():
    # Field 1 (input_a) as two unpacked fixed32 values: valid protobuf that a packed reader must not misread.
    data = bytes([0x0D]) + np.float32(1.5).tobytes() + bytes([0x0D]) + np.float32(2.5).tobytes()
    assert packed_floats(data, {1: "input_a", 2: "input_b"}) is None
    request = decode(pb.PredictMultiInputRequest, data)
    np.testing.assert_array_equal(request.floats["input_a"], np.array([1.5, 2.5], np.float32))


@pytest.mark.parametrize("data", [b"\x0a\x08\x00\x00", b"\xff"])
def test_malformed_bytes_stay_malformed(data):
    assert isinstance(decode(pb.PredictMultiInputRequest, data), MalformedRequest)
