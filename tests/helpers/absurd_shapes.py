"""Requests that declare absurd shapes in a few bytes (for the request-limit tests: tests/unit/test_request_limits.py
decodes them, tests/integration/test_request_limits.py sends them to a real server)."""

from __future__ import annotations

import re

from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tritonclient.grpc import service_pb2

MAX_ROWS = 4096  # the server's default --max-queued-rows: rows per request at most
MANY_DIMS = [1] * 10_000
# A message must stay short (it travels in the status trailer) and never show a wrapped-around size.
WRAPPED = re.compile(r"-\d{6,}")


def oip_input(shape: list[int], raw: bytes | None = None, values: int = 0) -> service_pb2.ModelInferRequest:
    """One FP32 input of a declared shape: raw (`raw` bytes) or typed (`values` zeros, the contents present)."""
    request = service_pb2.ModelInferRequest(model_name="multi_input")
    tensor = request.inputs.add(name="input_a", datatype="FP32", shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    else:
        tensor.contents.SetInParent()
        tensor.contents.fp32_contents.extend([0.0] * values)
    return request


def tfs_tensor(shape: list[int], values: int = 0, content: bytes = b"") -> tensor_pb2.TensorProto:
    """A DT_FLOAT TensorProto of a declared shape with `values` float_val entries (or tensor_content)."""
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims))
    proto.float_val.extend([0.5] * values)
    proto.tensor_content = content
    return proto
