"""Declared shapes cost nothing to send: a few bytes can declare [2**62, 4], 10,000 dimensions, or one value that
"fills" a billion elements. Every limit (rank, rows, elements, bytes) is checked from the declared shape, in
Python integers, before anything is allocated, and is INVALID_ARGUMENT naming the limit, never INTERNAL."""

from __future__ import annotations

import re
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from server.base import tensors
from server.base.errors import InvalidInputError
from server.base.tensors import TensorSpec
from server.protocols.oip import codec as oip_codec
from server.protocols.tfserving import codec as tfserving_codec
from tests.helpers.server import ServerProcess

MAX_ROWS = 4096  # the server's default --max-queued-rows: rows per request at most
SPECS = {
    "input_a": TensorSpec("input_a", np.dtype(np.float32), (10,)),
    "input_b": TensorSpec("input_b", np.dtype(np.float32), (20,)),
}
MANY_DIMS = [1] * 10_000
# A message must stay short (it travels in the status trailer) and never show a wrapped-around size.
WRAPPED = re.compile(r"-\d{6,}")


def _limits(batched: bool = True) -> tensors.InputLimits:
    return tensors.InputLimits(SPECS, max_rows=MAX_ROWS, batched=batched)


def _oip(shape: list[int], raw: bytes | None = None, values: int = 0) -> service_pb2.ModelInferRequest:
    """One FP32 input of a declared shape: raw (`raw` bytes) or typed (`values` zeros, the contents present)."""
    request = service_pb2.ModelInferRequest(model_name="multi_input")
    tensor = request.inputs.add(name="input_a", datatype="FP32", shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    else:
        tensor.contents.SetInParent()
        tensor.contents.fp32_contents.extend([0.0] * values)
    return request


def _tfs(shape: list[int], values: int = 0, content: bytes = b"") -> tensor_pb2.TensorProto:
    """A DT_FLOAT TensorProto of a declared shape with `values` float_val entries (or tensor_content)."""
    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims))
    proto.float_val.extend([0.5] * values)
    proto.tensor_content = content
    return proto


def _refused(decode: Callable[[], object], words: str) -> str:
    """Decode, expecting InvalidInputError whose message holds `words`, is short and shows no wrapped size, with
    next to nothing allocated on the way (tracemalloc sees numpy's buffers)."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError) as caught:
            decode()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert words in message, message
    assert len(message) < 600 and not WRAPPED.search(message), message
    assert peak < 1 << 20, f"{peak} bytes allocated to refuse it"
    return message


# -- the codecs, without a server ------------------------------------------------------------------------------


OIP_ABSURD = {
    "typed [2**62, 4], empty contents": (_oip([2**62, 4]), "at most 4096 rows"),
    "raw [2**61, 8], empty raw contents": (_oip([2**61, 8], raw=b""), "at most 4096 rows"),
    "typed 10,000 dimensions of 1": (_oip(MANY_DIMS, values=1), "at most 32"),
    "raw 10,000 dimensions of 1": (_oip(MANY_DIMS, raw=b"\0" * 4), "at most 32"),
    "typed [1, 2**62]": (_oip([1, 2**62]), "at most 40960 elements"),
    "raw [4096, 2**52]": (_oip([4096, 2**52], raw=b""), "at most 40960 elements"),
}


@pytest.mark.parametrize(("request_", "words"), OIP_ABSURD.values(), ids=OIP_ABSURD.keys())
def test_oip_absurd_shapes_are_refused_by_the_limit_they_break(request_, words):
    _refused(lambda: oip_codec.decode_inputs("multi_input", request_, _limits()), words)


@pytest.mark.parametrize("request_", [r for r, _ in OIP_ABSURD.values()], ids=OIP_ABSURD.keys())
def test_oip_absurd_shapes_are_invalid_input_without_the_models_limits(request_):
    """Knowing nothing of the model (as for an input it does not have), sizes still never wrap and rank is bounded."""
    _refused(lambda: oip_codec.decode_inputs("m", request_), "")


def test_oip_sizes_are_exact_integers_in_messages():
    message = _refused(lambda: oip_codec.decode_inputs("m", _oip([2**61, 8], raw=b"")), "needs")
    assert str(2**64 * 4) in message  # 2**61 x 8 elements x 4 bytes, not a product wrapped around at 2**64


TFS_ABSURD = {
    "one value fills [100000000, 10]": (_tfs([100_000_000, 10], values=1), "at most 4096 rows"),
    "[2**62, 4] without values": (_tfs([2**62, 4]), "at most 4096 rows"),
    "10,000 dimensions of 1, one value": (_tfs(MANY_DIMS, values=1), "at most 32"),
    "[2**61, 8] with 4 bytes of tensor_content": (_tfs([2**61, 8], content=b"\0" * 4), "at most 4096 rows"),
    "one value fills [1, 2**40]": (_tfs([1, 2**40], values=1), "at most 40960 elements"),
}


@pytest.mark.parametrize(("proto", "words"), TFS_ABSURD.values(), ids=TFS_ABSURD.keys())
def test_tfserving_absurd_shapes_are_refused_by_the_limit_they_break(proto, words):
    _refused(lambda: tfserving_codec.decode_inputs("multi_input", {"input_a": proto}, _limits()), words)


@pytest.mark.parametrize("proto", [p for p, _ in TFS_ABSURD.values()], ids=TFS_ABSURD.keys())
def test_tfserving_absurd_shapes_are_invalid_input_without_the_models_limits(proto):
    _refused(lambda: tfserving_codec.decode_tensor("m", "x", proto), "")


def test_one_value_fills_a_tensor_only_as_large_as_the_model_takes():
    proto = _tfs([MAX_ROWS, 10], values=1)
    assert tfserving_codec.decode_tensor("multi_input", "input_a", proto, _limits()).shape == (MAX_ROWS, 10)
    _refused(lambda: tfserving_codec.decode_tensor("m", "x", _tfs([1 << 30], values=1)), "one value fills at most")


def test_an_unbatched_model_takes_its_one_shape_at_most():
    message = _refused(lambda: oip_codec.decode_inputs("m", _oip([1000, 10]), _limits(batched=False)), "10 elements")
    assert "no batch dimension" in message


# -- a real server -----------------------------------------------------------------------------------------------


def _peak_rss(server: ServerProcess) -> int:
    """The server's peak resident memory so far (VmHWM, bytes), summed over its serving processes."""
    total = 0
    for pid in server.server_pids:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024
    return total


def _predict(inputs: dict[str, tensor_pb2.TensorProto]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "multi_input"
    for name, proto in inputs.items():
        request.inputs[name].CopyFrom(proto)
    return request


def _normal_predict() -> predict_pb2.PredictRequest:
    return _predict({"input_a": _tfs([1, 10], values=10), "input_b": _tfs([1, 20], values=20)})


def test_a_tiny_broadcast_predict_is_refused_before_it_costs_memory(server):
    """83 bytes declaring 3 billion floats through TF Serving's "one value fills the tensor" rule: refused by the
    row limit from the declared shapes, with the server's peak memory unchanged, while a caller on another
    connection is answered as usual."""
    absurd = _predict({"input_a": _tfs([100_000_000, 10], values=1), "input_b": _tfs([100_000_000, 20], values=1)})
    assert absurd.ByteSize() < 100
    stub = prediction_service_pb2_grpc.PredictionServiceStub(server.channel)
    stub.Predict(_normal_predict(), timeout=30)  # whatever a first Predict loads, loaded before measuring
    with pytest.raises(grpc.RpcError):
        stub.Predict(_predict({"input_a": _tfs([MAX_ROWS + 1, 10], values=1)}), timeout=30)
    before = _peak_rss(server)
    refused = stub.Predict.future(absurd, timeout=120)
    with grpc.insecure_channel(server.target) as channel:
        other = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        assert other.Predict(_normal_predict(), timeout=60).outputs["output"].float_val
    with pytest.raises(grpc.RpcError) as caught:
        refused.result()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(r"at most \d+ rows", caught.value.details()), caught.value.details()
    grown = _peak_rss(server) - before
    assert grown < 32 << 20, f"the server's peak memory grew by {grown >> 20} MiB to refuse an 83-byte request"


def _oip_pair(first: list[int], raw: bool) -> service_pb2.ModelInferRequest:
    """A multi_input request whose input_a declares `first` (with one value) and whose input_b is one good row."""
    request = _oip(first, raw=b"\0" * 4) if raw else _oip(first, values=1)
    tensor = request.inputs.add(name="input_b", datatype="FP32", shape=[1, 20])
    if raw:
        request.raw_input_contents.append(b"\0" * 80)
    else:
        tensor.contents.fp32_contents.extend([0.0] * 20)
    return request


OIP_OVER_THE_WIRE = {
    "typed [2**62, 4], empty contents": (_oip([2**62, 4]), "rows"),
    "raw [2**61, 8], empty raw contents": (_oip([2**61, 8], raw=b""), "rows"),
    "typed 10,000 dimensions of 1": (_oip_pair(MANY_DIMS, raw=False), "dimensions"),
    "raw 10,000 dimensions of 1": (_oip_pair(MANY_DIMS, raw=True), "dimensions"),
    "raw [1, 2**62]": (_oip_pair([1, 2**62], raw=True), "elements"),
}
TFS_OVER_THE_WIRE = {
    "[2**62, 4] without values": (_predict({"input_a": _tfs([2**62, 4])}), "rows"),
    "10,000 dimensions of 1, one value": (_predict({"input_a": _tfs(MANY_DIMS, values=1)}), "dimensions"),
    "[2**61, 8] tensor_content": (_predict({"input_a": _tfs([2**61, 8], content=b"\0" * 4)}), "rows"),
    "one value fills [1, 2**40]": (_predict({"input_a": _tfs([1, 2**40], values=1)}), "elements"),
}


def _internal_count(server: ServerProcess) -> float:
    """Requests answered INTERNAL so far, over every method and model."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(server.metrics_text())
        for sample in family.samples
        if sample.name == "modelserver_requests_total" and sample.labels.get("code") == "INTERNAL"
    )


def test_absurd_shapes_over_the_wire_are_invalid_argument_without_a_traceback(server):
    oip = service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    tfs = prediction_service_pb2_grpc.PredictionServiceStub(server.channel)
    log_before, internal_before, peak_before = len(server.log), _internal_count(server), _peak_rss(server)
    invalid_before = server.metric("modelserver_rejected_requests_total", model="multi_input", reason="invalid")
    calls = [(f"OIP {k}", oip.ModelInfer, r, w) for k, (r, w) in OIP_OVER_THE_WIRE.items()]
    calls += [(f"TF Serving {k}", tfs.Predict, r, w) for k, (r, w) in TFS_OVER_THE_WIRE.items()]
    wrong = []
    for label, method, request, words in calls:
        try:
            method(request, timeout=60)
            wrong.append(f"{label}: OK")
        except grpc.RpcError as error:
            details = error.details() or ""
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT or words not in details or WRAPPED.search(details):
                wrong.append(f"{label}: {error.code().name} {details[:300]}")
    assert not wrong, "\n".join(wrong)
    assert _internal_count(server) == internal_before
    invalid = server.metric("modelserver_rejected_requests_total", model="multi_input", reason="invalid")
    assert invalid - invalid_before == len(calls), "each refusal is counted as invalid, as validation's are"
    time.sleep(0.2)  # the log reader thread's last lines
    assert "Traceback" not in "".join(server.log[log_before:])
    assert _peak_rss(server) - peak_before < 32 << 20
