"""ModelStreamInfer clients that never read their answers hold a bounded part of the server's memory (issue 21 §4):
the accounting itself, without a server. What a stream takes it gives back, whatever way the stream ends.
tests/integration/test_stream_backpressure.py floods a real server.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from server.grpc.oip import (
    STREAM_MESSAGE_OVERHEAD,
    _held_bytes,
    _StreamBudget,
    _StreamWindow,
)

ECHO = "echo"
WIDTH = 51_200  # float32 values per row: one-row requests of 200 KB
MESSAGE_BYTES = WIDTH * 4


def _request(request_id: str, value: float = 0.5) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=ECHO, id=request_id)
    request.inputs.add(name="values", datatype="FP32", shape=[1, WIDTH])
    request.raw_input_contents.append(np.full((1, WIDTH), value, np.float32).tobytes())
    return request


def test_a_stream_holding_nothing_always_reads_whatever_the_budget():
    async def scenario() -> None:
        budget = _StreamBudget(100)
        hog, stream = _StreamWindow(budget), _StreamWindow(budget)
        await hog.admit(100)  # a stream that never reads fills the budget
        await stream.admit(70)  # holds nothing: taken though the budget is full, as a unary call would be
        assert budget.held == 170
        waiting = asyncio.create_task(stream.admit(10))  # holds something: waits for the budget
        await asyncio.sleep(0)
        assert not waiting.done()
        stream.release(stream.resize(70, 20))  # its answer (smaller) was sent: it holds nothing, and reads on
        await waiting
        assert budget.held == 110
        for window in (hog, stream, stream):  # closing twice gives back once
            window.close()
        assert budget.held == 0

    asyncio.run(scenario())


def test_the_budget_is_granted_in_order():
    """A large message waiting for the budget is not passed over by smaller ones behind it."""

    async def scenario() -> None:
        budget = _StreamBudget(100)
        a, b, c = _StreamWindow(budget), _StreamWindow(budget), _StreamWindow(budget)
        for window in (a, b, c):
            await window.admit(1)
        await a.admit(97)
        large, small = asyncio.create_task(b.admit(50)), asyncio.create_task(c.admit(10))
        await asyncio.sleep(0)
        a.resize(97, 77)  # 20 bytes free: the small one would fit, but the large one is first
        await asyncio.sleep(0)
        assert not large.done() and not small.done()
        a.release(77)
        await asyncio.gather(large, small)
        assert budget.held == 63
        for window in (a, b, c):
            window.close()
        assert budget.held == 0

    asyncio.run(scenario())


def test_a_reader_cancelled_while_waiting_leaves_nothing_taken():
    async def scenario() -> None:
        budget = _StreamBudget(100)
        hog, stream = _StreamWindow(budget), _StreamWindow(budget)
        await hog.admit(100)
        await stream.admit(5)
        waiting = asyncio.create_task(stream.admit(50))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        hog.release(100)  # the cancelled take is skipped, not granted
        assert budget.held == 5
        late = _StreamWindow(budget)
        await late.admit(1)
        await late.admit(90)  # the budget's queue is empty again: taken at once
        stream.close()
        late.close()
        hog.close()
        assert budget.held == 0

    asyncio.run(scenario())


def test_held_bytes_count_tensor_contents_raw_and_typed():
    raw = _request("r")
    assert _held_bytes(raw) == MESSAGE_BYTES + STREAM_MESSAGE_OVERHEAD
    typed = pb.ModelInferRequest(model_name=ECHO)
    typed.inputs.add(name="a", datatype="FP64", shape=[3]).contents.fp64_contents.extend([1.0, 2.0, 3.0])
    typed.inputs.add(name="b", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"abc", b"de"])
    assert _held_bytes(typed) == 3 * 8 + 5 + STREAM_MESSAGE_OVERHEAD
    answer = pb.ModelStreamInferResponse(error_message="NOT_FOUND: x")
    answer.infer_response.raw_output_contents.append(b"\0" * 400)
    assert _held_bytes(answer) == 400 + len("NOT_FOUND: x") + STREAM_MESSAGE_OVERHEAD
