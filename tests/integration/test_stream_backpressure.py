"""ModelStreamInfer clients that never read their answers hold a bounded part of the server's memory (issue 21 §4).

A stream's messages are held from the reading of a request until its answer has been handed to gRPC within the
client's flow-control window, within the stream's window and a server-wide byte budget; beyond them the server
stops reading, and the client's sends wait in HTTP/2 flow control. The model here echoes its 200 KB input, so that
answers weigh what requests weigh, and answers that no one reads are what piles up when nothing bounds them.

Nothing waits a fixed time: the flood is measured once the server has read everything it will (its answered and
in-flight counts and the clients' completed sends stop moving, a call through its event loop in between), and the
peak is the kernel's high-water mark of the server's resident memory (VmHWM), not a sample.

The accounting itself, without a server: tests/unit/test_stream_backpressure.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from harness.server import ServerProcess, sample_value, serving
from server.grpc.oip import STREAM_BUFFER_BYTES

MIB = 1 << 20
ECHO = "echo"
WIDTH = 51_200  # float32 values per row: one-row requests and answers of 200 KB
MESSAGE_BYTES = WIDTH * 4
STREAMS = 200
PER_STREAM = 20  # 200 x 20 x 200 KB = 800 MB offered, several times what the server may hold
CHANNELS = 4  # connections the streams share, as a few clients would
# What the server's memory may grow by: the budget's bytes, held as requests, arrays and answers while batches run
# (2.2 times the budget measured), and per stream what the budget does not count: the message a stream may always
# hold and one read while the budget is full, the answer being sent (as a message, serialized and in gRPC) and the
# HTTP/2 receive window (4.8 messages measured). Without the bound the flood holds 800 MB of answers, and gRPC's
# own receive buffers take up to 4 MB per stream before the server reads.
BOUND = 3 * STREAM_BUFFER_BYTES + STREAMS * 6 * MESSAGE_BYTES
SETTLE_POLLS = 3  # consecutive polls without progress that mean the server reads no more
POLL_SECONDS = 0.5
FLOOD_LIMIT_SECONDS = 300  # a bound on the test's time only: past it the flood is measured as it is


def _build_echo(path: Path) -> None:
    """A Keras model whose output is its input: its answers weigh what its requests weigh."""
    import keras

    values = keras.Input((WIDTH,), dtype="float32", name="values")
    model = keras.Model(values, keras.layers.Identity(name="echo")(values))
    path.parent.mkdir(parents=True)
    model.save(path)


@pytest.fixture(scope="module")
def echo_server(
    server: ServerProcess, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server of its own (a flood must not weigh on the shared one): the built-in models, copied, and `echo`."""
    repository = tmp_path_factory.mktemp("echo_repository")
    for model in ("multi_input", "shared_layer", "residual_cnn"):
        shutil.copytree(model_repository / model, repository / model)
    _build_echo(repository / ECHO / "1" / "model.keras")
    with serving(repository) as process:
        yield process


def _status(pid: int, field: str) -> int:
    """A memory figure of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    """Reset the process's VmHWM to its current resident size (Linux >= 4.0); where that is refused the peak
    stays the process's lifetime peak, which only overstates the growth."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def _request(request_id: str, value: float = 0.5) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=ECHO, id=request_id)
    request.inputs.add(name="values", datatype="FP32", shape=[1, WIDTH])
    request.raw_input_contents.append(np.full((1, WIDTH), value, np.float32).tobytes())
    return request


def _echoed(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32)


def _counts(server: ServerProcess) -> tuple[float, float]:
    """Stream messages the server has answered, and echo requests it is computing now."""
    text = server.metrics_text()
    answered = sum(
        sample_value(text, "modelserver_requests_total", model=ECHO, method="oip.ModelStreamInfer", code=code)
        for code in ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED")
    )
    return answered, sample_value(text, "modelserver_inflight_requests", model=ECHO)


async def _flood(server: ServerProcess) -> int:
    """Open STREAMS streams that each send PER_STREAM requests and never read; return, once the server reads no
    more, how many sends completed. Every stream is cancelled and every channel closed on the way out."""
    # One connection per channel. gRPC's own receive window (4 MB per stream by default) would take that much of the
    # answers into this process before the server has to hold any; at 64 KB, the server is what holds them.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
    channels = [grpc.aio.insecure_channel(server.target, options=options) for _ in range(CHANNELS)]
    calls = [pb_grpc.GRPCInferenceServiceStub(channels[i % CHANNELS]).ModelStreamInfer() for i in range(STREAMS)]
    sent = [0] * STREAMS
    request = _request("flood")

    async def send(index: int) -> None:
        for _ in range(PER_STREAM):
            await calls[index].write(request)
            sent[index] += 1

    senders = [asyncio.create_task(send(i)) for i in range(STREAMS)]
    live = pb_grpc.GRPCInferenceServiceStub(channels[0])
    try:
        started, last, quiet = time.monotonic(), None, 0
        while quiet < SETTLE_POLLS and time.monotonic() - started < FLOOD_LIMIT_SECONDS:
            await asyncio.sleep(POLL_SECONDS)
            # The server's event loop answers a call between two readings: a quiet reading is not a stalled loop.
            await live.ServerLive(pb.ServerLiveRequest(), timeout=60)
            answered, computing = await asyncio.to_thread(_counts, server)
            now = (sum(sent), answered)
            everything = now == (STREAMS * PER_STREAM,) * 2  # read and answered it all: nothing bounded it
            quiet = quiet + 1 if everything or (now == last and computing == 0) else 0
            last = now
        return sum(sent)
    finally:
        for call in calls:
            call.cancel()
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        for channel in channels:
            await channel.close()


async def _unread_stream(server: ServerProcess, count: int, deadline: float) -> int:
    """One stream that sends `count` requests and never reads: how many sends completed (all, or as many as the
    server read before `deadline`)."""
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        sent = 0
        try:
            for i in range(count):
                await asyncio.wait_for(call.write(_request(f"u{i}")), max(0.0, deadline - time.monotonic()))
                sent += 1
        except TimeoutError:
            pass
        finally:
            call.cancel()
        return sent


def test_streams_that_never_read_hold_bounded_memory(echo_server):
    """200 streams offer 800 MB of requests and never read an answer: the server stops reading them, and its
    memory grows by less than BOUND (it grew by 1.3 GB, every request read and every answer queued)."""
    pid = echo_server.server_pids[0]
    stub = pb_grpc.GRPCInferenceServiceStub(echo_server.channel)
    stub.ModelInfer(_request("warm-up"), timeout=60)  # the model's first call (graph tracing) before measuring
    before = _status(pid, "VmRSS")
    _reset_peak(pid)

    sent = asyncio.run(_flood(echo_server))

    growth = _status(pid, "VmHWM") - before
    offered = STREAMS * PER_STREAM
    assert sent < offered, f"the server read all {offered} requests of streams that never read their answers"
    assert growth < BOUND, (
        f"{STREAMS} streams that never read grew the server's memory by {growth / MIB:.0f} MiB (bound "
        f"{BOUND / MIB:.0f} MiB; {sent} of {offered} requests of {MESSAGE_BYTES // 1024} KB read)"
    )


def test_after_the_flood_the_server_serves_calls_and_reading_streams(echo_server):
    """Runs after the flood (same server): cancelled streams gave back what they held, so a unary call, a stream
    that reads (every answer, for its request, in request order when sent one at a time) and a new stream's full
    window all work."""
    stub = pb_grpc.GRPCInferenceServiceStub(echo_server.channel)
    response = stub.ModelInfer(_request("unary", 1.5), timeout=60)
    assert response.id == "unary" and np.all(_echoed(response) == 1.5)

    # Pipelined: every request answered once, with its own values (answers come as they complete).
    requests = [_request(f"p{i}", float(i)) for i in range(50)]
    answers = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter(requests), timeout=120)}
    assert sorted(answers) == sorted(r.id for r in requests)
    for i in range(50):
        assert not answers[f"p{i}"].error_message and np.all(_echoed(answers[f"p{i}"].infer_response) == i)

    # One at a time: the answers arrive in request order.
    replies: list[str] = []
    with contextlib.closing(_PingPong(stub)) as stream:
        for i in range(20):
            reply = stream.call(_request(f"s{i}", float(i)))
            assert not reply.error_message and np.all(_echoed(reply.infer_response) == i)
            replies.append(reply.infer_response.id)
    assert replies == [f"s{i}" for i in range(20)]

    # The flood's budget came back: a new stream that does not read is read well past the one message that a
    # stream may always hold (40 x 200 KB, far within the budget).
    sent = asyncio.run(_unread_stream(echo_server, 40, time.monotonic() + 120))
    assert sent == 40, f"a new unread stream got only {sent} of 40 requests read: the budget was not given back"


class _PingPong:
    """A ModelStreamInfer stream driven one request, one answer at a time."""

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        self._requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        self._responses = stub.ModelStreamInfer(iter(self._requests.get, None), timeout=120)

    def call(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        self._requests.put(request)
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()
