"""The Open Inference Protocol servicer (`inference.GRPCInferenceService`, KServe v2 / Triton): decode, hand to
the core, encode. Conversions live in `server/protocols/oip/codec.py`; validation, batching and metrics are the core's.

Unary RPCs go through `server.grpc.rpc.rpc`. ModelStreamInfer answers every message of the stream on its own, as
it completes (ids tell them apart), with the same status mapping and request metrics per message; an error
is a message on the stream (`error_message`), the stream goes on. The protocol's extensions that we do not
offer (shared memory, trace and log settings) answer UNIMPLEMENTED naming the extension and what to do instead,
rather than gRPC's bare "Method not found!". The model-repository extension is the model manager's
(server/registry/manager.py): RepositoryIndex always, RepositoryModelLoad/Unload when --repository-control is on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from importlib import metadata as package_metadata
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from server.base.errors import InvalidInputError, ModelNotFoundError, NotAllowedError, quoted
from server.base.metrics import REQUEST_DURATION, REQUESTS
from server.dataplane.inference import InferenceService, ModelMetadata
from server.grpc.rpc import MalformedRequest, deadline_of, rpc
from server.grpc.status import to_status
from server.protocols.oip import codec as oip
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
# The extensions ServerMetadata lists, in Triton's names.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
# A version's state in RepositoryIndex, in Triton's words (registry/manager.py State -> Triton's ModelReadyState).
_INDEX_STATES = {
    "start": "LOADING",
    "loading": "LOADING",
    "available": "READY",
    "unloading": "UNLOADING",
    "failed": "UNAVAILABLE",
}


@contextlib.contextmanager
def _triton_words() -> Iterator[None]:
    """An unknown model or version in Triton's words ("Request for unknown model", which its clients look for),
    followed by ours (what exists)."""
    try:
        yield
    except ModelNotFoundError as error:
        raise ModelNotFoundError(f"Request for unknown model: {error}") from None


def _not_offered(method: str, extension: str, instead: str) -> Callable[..., Awaitable[Any]]:
    """A handler for an RPC of a protocol extension we do not offer: UNIMPLEMENTED, naming the extension, what to
    do instead and the extensions we do offer (counted like every other call)."""
    message = (
        f"{method} belongs to the '{extension}' extension of the Open Inference Protocol, which this server does "
        f"not offer: {instead}. Extensions offered: {', '.join(EXTENSIONS)} (see ServerMetadata)"
    )

    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        REQUESTS.labels("", method, grpc.StatusCode.UNIMPLEMENTED.name).inc()
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    handler.__name__ = method
    return handler


_SYSTEM_SHM = ("system_shared_memory", "send tensors in the request (raw_input_contents or typed contents)")
_CUDA_SHM = ("cuda_shared_memory", "send tensors in the request (raw_input_contents or typed contents)")
_TRACE = ("trace", "the server's metrics are on its Prometheus /metrics port")
_LOGGING = ("logging", "the log level is set when the server starts")


def _server_version() -> str:
    try:
        return package_metadata.version("modelserver")
    except package_metadata.PackageNotFoundError:
        return "unknown"


class OipService:
    def __init__(self, core: InferenceService, repository_control: bool = False) -> None:
        self._core = core
        self._repository_control = repository_control
        self._version = _server_version()
        self._stream_budget = _StreamBudget(STREAM_BUFFER_BYTES)

    def _label(self, name: str) -> str:
        """A metric label for a caller-supplied model name: unknown names share one label."""
        return name if self._core.is_known(name) else "unknown"

    @rpc("ServerLive", lambda self, request: "")
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady", lambda self, request: "")
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self._core.manager.server_ready())

    @rpc("ModelReady", lambda self, request: self._label(request.name))
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        """False for a model that is loading, failed to load, draining, or unknown (as Triton answers)."""
        version = oip.parse_version(request.name, request.version)
        return pb.ModelReadyResponse(ready=self._core.is_ready(request.name, version))

    @rpc("ServerMetadata", lambda self, request: "")
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="modelserver", version=self._version, extensions=list(EXTENSIONS))

    @rpc("ModelMetadata", lambda self, request: self._label(request.name))
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        with _triton_words():
            meta = self._core.metadata(request.name, oip.parse_version(request.name, request.version))
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=[str(meta.version)],
            platform=meta.platform,
            inputs=oip.tensor_metadata(meta.inputs, meta.batched),
            outputs=oip.tensor_metadata(meta.outputs, meta.batched),
        )

    @rpc("ModelConfig", lambda self, request: self._label(request.name))
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> Any:
        with _triton_words():
            meta = self._core.metadata(request.name, oip.parse_version(request.name, request.version))
        b = meta.batching
        config = oip.model_config(
            meta.name,
            meta.inputs,
            meta.outputs,
            b.max_batch_size if meta.batched else 0,
            # The longest a request waits for company (an upper bound under the 'cost' policy).
            (b.allowed_batch_sizes, b.batch_timeout) if b.enabled else None,
            _batching_parameters(meta) if b.enabled else {},
        )
        return pb.ModelConfigResponse(config=config)

    @rpc("ModelStatistics", lambda self, request: self._label(request.name) if request.name else "")
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext) -> Any:
        """Counts and times per model; an empty name asks for every loaded model."""
        names = [request.name] if request.name else self._core.model_names()
        response = pb.ModelStatisticsResponse()
        for name in names:
            with _triton_words():
                version = self._core.resolve(name, oip.parse_version(name, request.version)).version
                s = self._core.statistics(name)
            stats = response.model_stats.add(
                name=name,
                version=str(version),
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
            )
            # Triton counts queue and compute per request (perf_analyzer checks that the counts agree): a request's
            # compute is its time in the core less its time queued; the batches are execution_count.
            infer = stats.inference_stats
            infer.success.MergeFrom(pb.StatisticDuration(count=s.success_count, ns=s.success_ns))
            infer.fail.MergeFrom(pb.StatisticDuration(count=s.fail_count, ns=s.fail_ns))
            infer.queue.MergeFrom(pb.StatisticDuration(count=s.success_count, ns=min(s.queue_ns, s.success_ns)))
            compute = pb.StatisticDuration(count=s.success_count, ns=max(0, s.success_ns - s.queue_ns))
            infer.compute_infer.MergeFrom(compute)
            infer.compute_input.MergeFrom(pb.StatisticDuration(count=s.success_count))
            infer.compute_output.MergeFrom(pb.StatisticDuration(count=s.success_count))
        return response

    @rpc("ModelInfer", lambda self, request: self._label(request.model_name))
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._infer(request, deadline_of(context))

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        name = request.model_name
        version = oip.parse_version(name, request.model_version)
        oip.check_parameters(f"model {quoted(name)}", request.parameters, oip.REQUEST_PARAMETERS)
        timeout = oip.timeout_seconds(request)
        if timeout is not None:
            deadline = min(d for d in (deadline, time.monotonic() + timeout) if d is not None)
        with _triton_words():
            runtime = self._core.resolve(name, version)
        oip.check_datatypes(name, runtime.inputs, request)
        outputs = oip.requested_outputs(name, runtime.outputs, request)
        classes = oip.classification_counts(name, runtime.outputs, request)
        inputs = self._core.decode(runtime, lambda limits: oip.decode_inputs(name, request, limits))
        result = await self._core.infer(name, runtime.version, inputs, deadline)
        return oip.encode_response(request, name, result.version, result.outputs, outputs, classes, runtime.batched)

    @rpc("RepositoryIndex", lambda self, request: "")
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> Any:
        """Every version of every model with its state (READY, LOADING, UNLOADING, UNAVAILABLE with the load
        error); `ready`: only the versions that serve now."""
        self._check_repository(request.repository_name)
        models = []
        for summary in self._core.list_models():
            if not summary.version_states and not request.ready:
                models.append(pb.RepositoryIndexResponse.ModelIndex(
                    name=summary.name, state="UNAVAILABLE", reason=summary.error or summary.state))  # fmt: skip
            for version, state, error in summary.version_states:
                ready = state == "available" and self._core.is_ready(summary.name, version)
                if request.ready and not ready:
                    continue
                models.append(
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=summary.name,
                        version=str(version),
                        state="READY" if ready else ("UNAVAILABLE" if state == "available" else _INDEX_STATES[state]),
                        reason=error,
                    )
                )
        return pb.RepositoryIndexResponse(models=models)

    @rpc("RepositoryModelLoad", lambda self, request: self._label(request.model_name))
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        """Load (or reload) the model's versions from the repository now, as its version policy says."""
        self._check_control("RepositoryModelLoad", request.repository_name)
        if request.parameters:
            raise InvalidInputError(
                f"RepositoryModelLoad parameters {sorted(request.parameters)} are not supported: the model is loaded "
                "from its folder in the repository (put its files there first)"
            )
        with _triton_words():
            await self._core.manager.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload", lambda self, request: self._label(request.model_name))
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        """Retire every version of the model (requests already accepted finish); it stays unloaded, repository
        polling included, until a RepositoryModelLoad."""
        self._check_control("RepositoryModelUnload", request.repository_name)
        with _triton_words():
            await self._core.manager.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _check_repository(self, name: str) -> None:
        if name:
            raise InvalidInputError(
                f"unknown repository {quoted(name)}: this server has one model repository; leave repository_name empty"
            )

    def _check_control(self, method: str, repository_name: str) -> None:
        if not self._repository_control:
            raise NotAllowedError(
                f"{method} is switched off: start the server with --repository-control true to load and unload "
                "models through the Open Inference Protocol (new versions in the repository are loaded anyway, "
                "see --repository-poll-seconds)"
            )
        self._check_repository(repository_name)

    # Extensions we do not offer: a clear UNIMPLEMENTED instead of gRPC's "Method not found!".
    SystemSharedMemoryStatus = _not_offered("SystemSharedMemoryStatus", *_SYSTEM_SHM)
    SystemSharedMemoryRegister = _not_offered("SystemSharedMemoryRegister", *_SYSTEM_SHM)
    SystemSharedMemoryUnregister = _not_offered("SystemSharedMemoryUnregister", *_SYSTEM_SHM)
    CudaSharedMemoryStatus = _not_offered("CudaSharedMemoryStatus", *_CUDA_SHM)
    CudaSharedMemoryRegister = _not_offered("CudaSharedMemoryRegister", *_CUDA_SHM)
    CudaSharedMemoryUnregister = _not_offered("CudaSharedMemoryUnregister", *_CUDA_SHM)
    TraceSetting = _not_offered("TraceSetting", *_TRACE)
    LogSettings = _not_offered("LogSettings", *_LOGGING)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest | MalformedRequest], context: grpc.aio.ServicerContext
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
        while self._core.phase is Phase.STARTING or self._core.phase in ACCEPTING:
            await asyncio.sleep(DRAIN_POLL_SECONDS)

    async def _stream_one(
        self, request: pb.ModelInferRequest | MalformedRequest, deadline: float | None
    ) -> pb.ModelStreamInferResponse:
        """One stream message, mapped and counted exactly as a unary ModelInfer would be."""
        started = time.perf_counter()
        code, label = grpc.StatusCode.OK, "unknown"
        try:
            if isinstance(request, MalformedRequest):
                raise request.error()
            label = self._label(request.model_name)
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
            REQUESTS.labels(label, "ModelStreamInfer", code.name).inc()
            REQUEST_DURATION.labels(label, "ModelStreamInfer").observe(time.perf_counter() - started)


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


def _batching_parameters(meta: ModelMetadata) -> dict[str, str]:
    """What the batcher decides from, as ModelConfig parameters: the policy, and once the version has run, its
    measured call cost (fixed + per row, what the 'cost' policy and the back-off hints use) and the time the work
    queued now will take."""
    parameters = {"batch_policy": meta.batching.policy}
    if meta.cost is not None and meta.cost.by_size:
        parameters |= {
            "batch_cost_fixed_ms": f"{meta.cost.a * 1000:.3f}",
            "batch_cost_per_row_ms": f"{meta.cost.b * 1000:.4f}",
            "queue_wait_ms": f"{meta.queue_wait * 1000:.1f}",
        }
    return parameters
