"""nginx's own answers (deploy/nginx/nginx.conf), with a real nginx (Debian's) in front of a real server:
- overload is refused at the edge: beyond the concurrency cap (`limit_conn`), calls get RESOURCE_EXHAUSTED with a
  back-off message from nginx at once and never reach the server;
- those answers, and "no replica reachable", are gRPC "Trailers-Only" responses (HTTP 200, grpc-status in the one
  HEADERS frame, which ends the stream): what every gRPC implementation reads as the status. A `return 204`
  answer is read as UNKNOWN by grpc-go and grpc-java, which check the HTTP status first; that is checked here on
  the wire, frame by frame, since those clients are not installed.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from harness.deploy_native import NGINX_CONFIG, NginxProcess, free_port, wait_until
from harness.server import ServerProcess, serving
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from tests.helpers.models import keras_outputs, random_inputs

CAP = int(re.search(r"limit_conn modelserver_calls (\d+);", NGINX_CONFIG.read_text()).group(1))
EXTRA = 8


@pytest.fixture
def held_server(model_repository: Path) -> Iterator[ServerProcess]:
    with serving(model_repository, holds=True) as server:
        yield server


def test_calls_over_the_cap_get_resource_exhausted_from_nginx_and_never_reach_the_server(
    held_server, tmp_path, keras_models
):
    nginx = NginxProcess(tmp_path, [held_server.target])
    channel = grpc.insecure_channel(nginx.target)
    try:
        inputs = random_inputs(keras_models["multi_input"], 1, seed=2)
        request = pb.PredictMultiInputRequest(input_a=inputs["input_a"].ravel().tolist(),
                                              input_b=inputs["input_b"].ravel().tolist())  # fmt: skip
        predict = pb_grpc.ModelServiceStub(channel).PredictMultiInput
        held_server.hold()
        admitted = [predict.future(request, timeout=120) for _ in range(CAP)]
        wait_until(
            lambda: held_server.metric("modelserver_inflight_requests", model="multi_input") == CAP,
            120,
            f"{CAP} calls held in the server",
            interval=0.05,
        )
        refused = [predict.future(request, timeout=120) for _ in range(EXTRA)]
        for call in refused:
            error = call.exception(timeout=60)
            assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "back off and retry" in error.details()
        # Refused by nginx, not by the server: it still holds exactly the admitted calls and answered none.
        assert held_server.metric("modelserver_inflight_requests", model="multi_input") == CAP
        assert held_server.metric("modelserver_requests_total", model="multi_input", method="typed.PredictMultiInput",
                                  code="RESOURCE_EXHAUSTED") == 0  # fmt: skip
        held_server.release()
        expected = keras_outputs(keras_models["multi_input"], inputs)["output"]
        for call in admitted:
            np.testing.assert_allclose(np.reshape(call.result(timeout=120).output, (-1, 1)), expected, atol=1e-5)
        assert nginx.access_counts()[("200", "")] == EXTRA  # nginx's own answers, HTTP 200 without an upstream
        assert nginx.errors() == [], nginx.errors()[:5]
    finally:
        held_server.release()
        channel.close()
        nginx.stop()


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header field as an HPACK literal without indexing, new name, no Huffman coding (all lengths < 127)."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _read_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "nginx closed the connection"
            data += chunk
        return data

    header = exactly(9)
    length = int.from_bytes(header[:3], "big")
    return header[3], header[4], int.from_bytes(header[5:9], "big") & 0x7FFFFFFF, exactly(length)


def test_no_replica_reachable_is_a_trailers_only_unavailable(tmp_path):
    """A closed upstream port: nginx answers itself. On the wire its answer must be one HEADERS frame with :status
    200 and END_STREAM (grpc-status inside), no DATA frame; through the Python client, UNAVAILABLE."""
    nginx = NginxProcess(tmp_path, [f"127.0.0.1:{free_port()}"])
    try:
        with grpc.insecure_channel(nginx.target) as channel:
            call = channel.unary_unary("/modelserver.v1.ModelService/ListModels")
            with pytest.raises(grpc.RpcError) as raised:
                call(b"", timeout=30)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert raised.value.details() == "no modelserver replica reachable"

        with socket.create_connection(("127.0.0.1", nginx.port), timeout=30) as sock:
            headers = b"".join([
                b"\x83",  # :method POST (HPACK static table)
                b"\x86",  # :scheme http
                b"\x04" + bytes([len(b"/modelserver.v1.ModelService/ListModels")])
                + b"/modelserver.v1.ModelService/ListModels",  # :path, name from the static table
                b"\x01" + bytes([len(nginx.target)]) + nginx.target.encode(),  # :authority
                _hpack_literal(b"content-type", b"application/grpc"),
                _hpack_literal(b"te", b"trailers"),
            ])  # fmt: skip
            sock.sendall(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                + _frame(0x4, 0, 0, b"")  # SETTINGS
                + _frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
                + _frame(0x0, 0x1, 1, b"\x00\x00\x00\x00\x00")  # DATA: one empty message, END_STREAM
            )
            stream_frames = []
            while not stream_frames or not stream_frames[-1][1] & 0x1:  # until END_STREAM on stream 1
                kind, flags, stream, payload = _read_frame(sock)
                if kind == 0x4 and not flags & 0x1:
                    sock.sendall(_frame(0x4, 0x1, 0, b""))  # acknowledge nginx's SETTINGS
                assert kind != 0x3, "nginx reset the stream"
                if stream == 1:
                    stream_frames.append((kind, flags, payload))
        assert len(stream_frames) == 1, [(kind, flags) for kind, flags, _ in stream_frames]
        kind, flags, payload = stream_frames[0]
        assert kind == 0x1 and flags & 0x1, (kind, flags)  # one HEADERS frame that ends the stream
        assert payload[0] == 0x88, payload[:8]  # :status 200, indexed (0x89 would be 204)
    finally:
        nginx.stop()
