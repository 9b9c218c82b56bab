"""The Open Inference Protocol servicer (`inference.GRPCInferenceService`, KServe v2 / Triton): decode, call the
protocol's handler (server/protocols/oip/handlers.py, where every rule of the protocol is), encode. Conversions
live in `server/protocols/oip/codec.py`; validation, batching and metrics are the core's.

Unary RPCs go through `server.grpc.rpc.rpc`. ModelStreamInfer answers every message of the stream on its own, as
it completes (ids tell them apart), with the same status mapping and request metrics per message; an error
is a message on the stream (`error_message`), the stream goes on. Its flow control (what a stream, and all of
them, may hold) is here: it is the transport's.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from server.base.metrics import REQUEST_DURATION, REQUESTS
from server.dataplane.inference import InferenceService
from server.grpc.rpc import Context, MalformedRequest, Servicer, deadline_of, not_offered, rpc
from server.grpc.status import to_status
from server.protocols.common import NO_MODEL, UNKNOWN_MODEL
from server.protocols.oip import codec as oip
from server.protocols.oip.handlers import Method, OipHandlers
from server.registry.manager import ACCEPTING, Phase

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# ModelStreamInfer's flow control: a message is held from the moment its request is read until its answer has been
# handed to gRPC's flow control (the `yield` returned), so a client that stops reading stops being read, and its
# sends wait in HTTP/2 flow control as they would with a server that has no more room.
# Messages one stream holds at most; its reader waits beyond (small messages still pipeline deeply, for batching).
MAX_STREAM_IN_FLIGHT = 1024
# Bytes all the streams of this process hold at most (tensor bytes of each request, then of its answer, plus
# STREAM_MESSAGE_OVERHEAD each): five times what residual_cnn's batch queue may hold (4,096 rows of 3 KB), so
# clients that read are not slowed by it. A stream that holds nothing may still take one message whatever the others
# hold, as a unary call would: streams whose clients never read can fill the budget, not stop other streams.
STREAM_BUFFER_BYTES = 64 * 1024 * 1024
# What a held message costs beyond its tensor bytes (protos, task, coroutine frames, arrays, the batcher's entry:
# 8 KB measured for a one-row request waiting for its batch), so that a window of tiny messages counts too.
STREAM_MESSAGE_OVERHEAD = 8 * 1024
DRAIN_POLL_SECONDS = 0.05


class OipService(Servicer):
    handlers: OipHandlers

    def __init__(self, core: InferenceService, repository_control: bool = False) -> None:
        super().__init__(OipHandlers(core, repository_control))
        self._stream_budget = _StreamBudget(STREAM_BUFFER_BYTES)

    @rpc(Method.ServerLive, lambda self, request: NO_MODEL)
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        return pb.ServerLiveResponse(live=self.handlers.server_live())

    @rpc(Method.ServerReady, lambda self, request: NO_MODEL)
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self.handlers.server_ready())

    @rpc(Method.ModelReady, lambda self, request: self.label(request.name))
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        return pb.ModelReadyResponse(ready=self.handlers.model_ready(request.name, request.version))

    @rpc(Method.ServerMetadata, lambda self, request: NO_MODEL)
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> Any:
        return oip.server_metadata_response(self.handlers.server_metadata())

    @rpc(Method.ModelMetadata, lambda self, request: self.label(request.name))
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        return oip.metadata_response(self.handlers.model_metadata(request.name, request.version))

    @rpc(Method.ModelConfig, lambda self, request: self.label(request.name))
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> Any:
        return pb.ModelConfigResponse(config=self.handlers.model_config(request.name, request.version))

    @rpc(Method.ModelStatistics, lambda self, request: self.label(request.name) if request.name else NO_MODEL)
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> Any:
        return oip.statistics_response(self.handlers.model_statistics(request.name, request.version))

    @rpc(Method.ModelInfer, lambda self, request: self.label(request.model_name))
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> Any:
        return await self._infer(request, deadline_of(context))

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        return oip.encode_response(await self.handlers.infer(oip.infer_request(request), deadline))

    @rpc(Method.RepositoryIndex, lambda self, request: NO_MODEL)
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> Any:
        return oip.index_response(self.handlers.repository_index(request.repository_name, request.ready))

    @rpc(Method.RepositoryModelLoad, lambda self, request: self.label(request.model_name))
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Context) -> Any:
        await self.handlers.repository_load(request.repository_name, request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc(Method.RepositoryModelUnload, lambda self, request: self.label(request.model_name))
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: Context) -> Any:
        await self.handlers.repository_unload(request.repository_name, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # Extensions we do not offer: a clear UNIMPLEMENTED instead of gRPC's "Method not found!".
    SystemSharedMemoryStatus = not_offered(Method.SystemSharedMemoryStatus)
    SystemSharedMemoryRegister = not_offered(Method.SystemSharedMemoryRegister)
    SystemSharedMemoryUnregister = not_offered(Method.SystemSharedMemoryUnregister)
    CudaSharedMemoryStatus = not_offered(Method.CudaSharedMemoryStatus)
    CudaSharedMemoryRegister = not_offered(Method.CudaSharedMemoryRegister)
    CudaSharedMemoryUnregister = not_offered(Method.CudaSharedMemoryUnregister)
    TraceSetting = not_offered(Method.TraceSetting)
    LogSettings = not_offered(Method.LogSettings)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest | MalformedRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Many requests over one call: each is answered when it completes, so they batch with each other.

        A message is held from its reading until its answer is sent, within the stream's window and the
        server-wide budget (STREAM_BUFFER_BYTES); beyond them the stream is not read, so a client that does not
        read its answers is not read either, and holds a bounded amount of memory.

        The stream ends when the client is done sending and every answer is out. When the server drains, it
        stops reading, answers what it has read, and ends the stream with UNAVAILABLE (retry elsewhere) rather
        than leaving it for the listener's close to cancel.
        """
        deadline = deadline_of(context)
        window = _StreamWindow(self._stream_budget)
        answers: asyncio.Queue[Any] = asyncio.Queue()  # (answer, bytes held for it); at most the window's
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest | MalformedRequest, size: int) -> None:
            response = await self._stream_one(request, deadline)
            answers.put_nowait((response, window.resize(size, _held_bytes(response))))

        async def read() -> None:
            async for request in requests:
                size = _held_bytes(request)
                await window.admit(size)
                task = asyncio.create_task(answer(request, size))
                pending.add(task)
                task.add_done_callback(pending.discard)
                del request
                await window.room()  # the next message is read only when the stream may hold it

        async def read_then_finish() -> bool:
            """Read until the client is done or the server drains; wait for the answers; True when draining."""
            reading, draining = asyncio.create_task(read()), asyncio.create_task(self._draining())
            try:
                await asyncio.wait({reading, draining}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                reading.cancel()
                draining.cancel()
            await asyncio.wait({reading, draining})  # a cancelled task is done only once it has run its cancellation
            await asyncio.gather(*pending, return_exceptions=True)
            if reading.cancelled():
                return True
            reading.result()  # a broken stream (not merely ended) raises here, and gRPC ends the call with it
            return False

        finishing = asyncio.create_task(read_then_finish())
        finishing.add_done_callback(answers.put_nowait)  # the task itself is the last item
        try:
            while not isinstance(item := await answers.get(), asyncio.Task):
                response, size = item
                del item
                # grpc.aio resumes this generator once gRPC has taken the message within the client's flow-control
                # window: a client that does not read keeps the message held here, and its stream unread.
                yield response
                del response
                window.release(size)
            if item.result():
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down: every request read from this stream was answered; "
                    "send the others on a new stream (elsewhere)",
                )
        finally:
            finishing.cancel()
            for task in list(pending):
                task.cancel()
            window.close()

    async def _draining(self) -> None:
        """Returns once the server stops taking new requests (polled: streams are few, and 50 ms is early enough)."""
        while self.handlers.core.phase is Phase.STARTING or self.handlers.core.phase in ACCEPTING:
            await asyncio.sleep(DRAIN_POLL_SECONDS)

    async def _stream_one(
        self, request: pb.ModelInferRequest | MalformedRequest, deadline: float | None
    ) -> pb.ModelStreamInferResponse:
        """One stream message, mapped and counted exactly as a unary ModelInfer would be."""
        started = time.perf_counter()
        code, label = grpc.StatusCode.OK, UNKNOWN_MODEL
        try:
            if isinstance(request, MalformedRequest):
                raise request.error()
            label = self.label(request.model_name)
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as error:
            code, message = to_status(error)
            echo = pb.ModelInferResponse()
            if isinstance(request, pb.ModelInferRequest):
                echo = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
            return pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}", infer_response=echo)
        finally:
            REQUESTS.labels(label, Method.ModelStreamInfer, code.name, "grpc").inc()
            REQUEST_DURATION.labels(label, Method.ModelStreamInfer, "grpc").observe(time.perf_counter() - started)


# Bytes per value of each typed-contents field (BYTES values are counted by their lengths).
_CONTENT_ITEM_BYTES = {
    "bool_contents": 1,
    "int_contents": 4,
    "uint_contents": 4,
    "fp32_contents": 4,
    "int64_contents": 8,
    "uint64_contents": 8,
    "fp64_contents": 8,
}


def _held_bytes(message: pb.ModelInferRequest | pb.ModelStreamInferResponse | MalformedRequest) -> int:
    """What a stream message holds, as the stream's flow control counts it: its tensor bytes plus
    STREAM_MESSAGE_OVERHEAD. Not ByteSize(), which serializes the message (0.5 ms for 200 KB of raw contents)."""
    if isinstance(message, MalformedRequest):
        return message.size + STREAM_MESSAGE_OVERHEAD
    if isinstance(message, pb.ModelStreamInferResponse):
        response = message.infer_response
        return sum(map(len, response.raw_output_contents)) + len(message.error_message) + STREAM_MESSAGE_OVERHEAD
    size = sum(map(len, message.raw_input_contents)) + STREAM_MESSAGE_OVERHEAD
    for tensor in message.inputs:
        if tensor.HasField("contents"):
            contents = tensor.contents
            size += sum(len(getattr(contents, name)) * item for name, item in _CONTENT_ITEM_BYTES.items())
            size += sum(map(len, contents.bytes_contents))
    return size


class _StreamBudget:
    """The bytes that all streams of the process may hold at once (STREAM_BUFFER_BYTES), granted first come, first
    served, so that a large message is not passed over forever by small ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._queue: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def take(self, size: int) -> asyncio.Future[None] | None:
        """Take `size` bytes: None when taken now, else a future done once they are (cancel it to give up)."""
        self._grant()  # first drop the queue's head if it was given up
        if not self._queue and self._fits(size):
            self.held += size
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((size, future))
        return future

    def grant(self, size: int, future: asyncio.Future[None]) -> None:
        """Grant a queued `take` now, out of turn, whatever is held (its stream holds nothing else)."""
        if not future.done():
            self.held += size
            future.set_result(None)
            self._grant()

    def force(self, size: int) -> None:
        """Take `size` bytes (or give them back, when negative) whatever is held: a message already there."""
        self.held += size
        if size < 0:
            self._grant()

    def give(self, size: int) -> None:
        self.force(-size)

    def _fits(self, size: int) -> bool:
        return self.held + size <= self.limit

    def _grant(self) -> None:
        """Grant queued takes in order while they fit; skip those granted out of turn or given up."""
        while self._queue and (self._queue[0][1].done() or self._fits(self._queue[0][0])):
            size, future = self._queue.popleft()
            if not future.done():
                self.held += size
                future.set_result(None)


class _StreamWindow:
    """What one stream holds: messages read whose answers have not been sent yet, within MAX_STREAM_IN_FLIGHT
    messages and the server-wide budget, whose bytes it takes and gives back."""

    def __init__(self, budget: _StreamBudget, limit: int = MAX_STREAM_IN_FLIGHT) -> None:
        self._budget = budget
        self._limit = limit
        self._count = 0
        self._bytes = 0
        self._closed = False
        self._changed = asyncio.Event()
        self._waiting: tuple[int, asyncio.Future[None]] | None = None  # the take that the reader waits for

    async def room(self) -> None:
        """Return once the stream may hold one more message."""
        while self._count >= self._limit:
            self._changed.clear()
            await self._changed.wait()

    async def admit(self, size: int) -> None:
        """Hold a message just read: at once when the budget has room or the stream holds nothing (as a unary call,
        whatever the others hold), else once either is so. A message larger than the whole budget waits for the
        stream to hold nothing, never in the budget's queue, which it would block."""
        if not self._count:
            self._budget.force(size)
        elif (future := self._budget.take(size) if size <= self._budget.limit else self._never()) is not None:
            self._waiting = (size, future)
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._budget.give(size)  # granted, but the reader is gone
                raise
            finally:
                self._waiting = None
        if self._closed:  # the stream ended while the reader waited: it is about to be cancelled
            self._budget.give(size)
            return
        self._count += 1
        self._bytes += size

    @staticmethod
    def _never() -> asyncio.Future[None]:
        """A take that only `grant` completes: the stream's turn to hold one message whatever the budget."""
        return asyncio.get_running_loop().create_future()

    def resize(self, old: int, new: int) -> int:
        """A held message now holds `new` bytes instead of `old` (its answer replaced its request); returns `new`."""
        if not self._closed:
            self._bytes += new - old
            self._budget.force(new - old)
        return new

    def release(self, size: int) -> None:
        """A message's answer was sent: the stream and the budget have room for another."""
        if self._closed:
            return
        self._count -= 1
        self._bytes -= size
        self._budget.give(size)
        self._changed.set()
        if self._count == 0 and self._waiting is not None:
            self._budget.grant(*self._waiting)

    def close(self) -> None:
        """The stream ended: give back everything it held (idempotent)."""
        if not self._closed:
            self._closed = True
            self._budget.give(self._bytes)
            self._count = self._bytes = 0
