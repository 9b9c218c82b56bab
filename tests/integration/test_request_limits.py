"""Declared shapes cost nothing to send: a few bytes can declare [2**62, 4], 10,000 dimensions, or one value that
"fills" a billion elements. Every limit (rank, rows, elements, bytes) is checked from the declared shape, in
Python integers, before anything is allocated, and is INVALID_ARGUMENT naming the limit, never INTERNAL.

Over the wire, to a real server; tests/unit/test_request_limits.py decodes the same shapes without one."""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from harness.server import ServerProcess
from tests.helpers.absurd_shapes import MANY_DIMS, MAX_ROWS, WRAPPED, oip_input, tfs_tensor


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
    return _predict({"input_a": tfs_tensor([1, 10], values=10), "input_b": tfs_tensor([1, 20], values=20)})


def test_a_tiny_broadcast_predict_is_refused_before_it_costs_memory(server):
    """83 bytes declaring 3 billion floats through TF Serving's "one value fills the tensor" rule: refused by the
    row limit from the declared shapes, with the server's peak memory unchanged, while a caller on another
    connection is answered as usual."""
    absurd = _predict(
        {"input_a": tfs_tensor([100_000_000, 10], values=1), "input_b": tfs_tensor([100_000_000, 20], values=1)}
    )
    assert absurd.ByteSize() < 100
    stub = prediction_service_pb2_grpc.PredictionServiceStub(server.channel)
    stub.Predict(_normal_predict(), timeout=30)  # whatever a first Predict loads, loaded before measuring
    with pytest.raises(grpc.RpcError):
        stub.Predict(_predict({"input_a": tfs_tensor([MAX_ROWS + 1, 10], values=1)}), timeout=30)
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
    request = oip_input(first, raw=b"\0" * 4) if raw else oip_input(first, values=1)
    tensor = request.inputs.add(name="input_b", datatype="FP32", shape=[1, 20])
    if raw:
        request.raw_input_contents.append(b"\0" * 80)
    else:
        tensor.contents.fp32_contents.extend([0.0] * 20)
    return request


OIP_OVER_THE_WIRE = {
    "typed [2**62, 4], empty contents": (oip_input([2**62, 4]), "rows"),
    "raw [2**61, 8], empty raw contents": (oip_input([2**61, 8], raw=b""), "rows"),
    "typed 10,000 dimensions of 1": (_oip_pair(MANY_DIMS, raw=False), "dimensions"),
    "raw 10,000 dimensions of 1": (_oip_pair(MANY_DIMS, raw=True), "dimensions"),
    "raw [1, 2**62]": (_oip_pair([1, 2**62], raw=True), "elements"),
}
TFS_OVER_THE_WIRE = {
    "[2**62, 4] without values": (_predict({"input_a": tfs_tensor([2**62, 4])}), "rows"),
    "10,000 dimensions of 1, one value": (_predict({"input_a": tfs_tensor(MANY_DIMS, values=1)}), "dimensions"),
    "[2**61, 8] tensor_content": (_predict({"input_a": tfs_tensor([2**61, 8], content=b"\0" * 4)}), "rows"),
    "one value fills [1, 2**40]": (_predict({"input_a": tfs_tensor([1, 2**40], values=1)}), "elements"),
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
