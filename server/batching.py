"""Dynamic batching (SPEC §4): concurrent requests for one model merged into one model call.

Each request becomes one or more tasks of at most max_batch_size rows, each with its own future. One
loop per model forms batches: a batch runs when it holds max_batch_size rows, when its oldest task has
waited batch_timeout, or, under the "idle" policy, when the model has no batch running and the oldest task
has waited the model's learned wait: none for a lone caller (who runs at once, without even queueing),
growing under concurrent load so that batches fill (Batcher._adapt_window). A batch is padded up to the next
allowed size, so the model only ever sees shapes warmed up before SERVING; padding rows are dropped
from the results. Cancelled and expired tasks are dropped before a batch runs, the queue is bounded in
rows, and a failing batch fails only its own tasks.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from server import metrics
from server.errors import DeadlineExpiredError, InvalidInputError, OverloadedError
from server.runtime import ModelRuntime

log = logging.getLogger(__name__)

Policy = Literal["eager", "idle", "fixed"]
# The "idle" policy's first wait (seconds) once an idle model finds requests arriving together; see
# Batcher._adapt_window.
MIN_WINDOW = 0.0002
# Batches of fewer requests say nothing about lock-step callers: two arrivals close together happen by chance.
CYCLE_MIN_REQUESTS = 3
# A caller's cancellation this close to its deadline is the deadline: the client's clock started before ours.
CANCEL_NEAR_DEADLINE = 0.05


def default_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below max_batch_size, and max_batch_size itself."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return (*sizes, max_batch_size)


@dataclass(frozen=True)
class BatchingConfig:
    """One model's batching settings."""

    enabled: bool = True
    max_batch_size: int = 64
    batch_timeout: float = 0.01
    max_queued_rows: int = 4096
    policy: Policy = "idle"
    max_batches_in_flight: int = 2
    allowed_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.allowed_batch_sizes:
            object.__setattr__(self, "allowed_batch_sizes", default_batch_sizes(self.max_batch_size))

    def problems(self) -> list[str]:
        found = []
        if self.max_batch_size < 1:
            found.append(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_timeout < 0:
            found.append(f"batch_timeout must be >= 0 seconds, got {self.batch_timeout}")
        if self.max_queued_rows < self.max_batch_size:
            found.append(f"max_queued_rows ({self.max_queued_rows}) must be >= max_batch_size ({self.max_batch_size})")
        if self.policy not in ("eager", "idle", "fixed"):
            found.append(f"policy must be 'eager', 'idle' or 'fixed', got {self.policy!r}")
        if self.max_batches_in_flight < 1:
            found.append(f"max_batches_in_flight must be >= 1, got {self.max_batches_in_flight}")
        sizes = self.allowed_batch_sizes
        if list(sizes) != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != self.max_batch_size:
            found.append(
                f"allowed_batch_sizes must be increasing, positive and end with max_batch_size "
                f"({self.max_batch_size}), got {list(sizes)}"
            )
        return found

    def padded_size(self, rows: int) -> int:
        return self.allowed_batch_sizes[bisect.bisect_left(self.allowed_batch_sizes, rows)]


@dataclass
class _Task:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float
    deadline: float | None  # on the batcher's clock
    request: object  # shared by the chunks of one split request


class _ModelMetrics:
    """One model's metric children, looked up once instead of per request."""

    def __init__(self, model: str) -> None:
        self.queue_rows = metrics.QUEUE_ROWS.labels(model)
        self.queue_duration = metrics.QUEUE_DURATION.labels(model)
        self.inference = metrics.INFERENCE_DURATION.labels(model)
        self.batch_size = metrics.BATCH_SIZE.labels(model)
        self.padding = metrics.BATCH_PADDING.labels(model)
        self.cancelled = metrics.REJECTED.labels(model, "cancelled")
        self.expired = metrics.REJECTED.labels(model, "deadline")
        self.queue_full = metrics.REJECTED.labels(model, "queue_full")


@dataclass
class _ModelQueue:
    """One model's pending tasks and the loop that batches them."""

    runtime: ModelRuntime
    metrics: _ModelMetrics
    batchable: bool  # rows of different requests can be concatenated (no input of variable size)
    tasks: deque[_Task] = field(default_factory=deque)
    rows: int = 0
    unbatched: int = 0  # requests queued or running alone (batching off): one model call each
    running: int = 0
    window: float = 0.0  # seconds an idle model waits for more requests (learned, see Batcher._adapt_window)
    batch_seconds: float = 0.0  # moving average of one model call's duration, for the queue's wait estimate
    last_batch_requests: int = 0  # requests in the latest batch: the size of one cycle of closed-loop callers
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    loop_task: asyncio.Task[None] | None = None

    def wait_estimate(self, config: BatchingConfig) -> float:
        """Seconds until the rows queued now have run: their batches, max_batches_in_flight at a time."""
        calls = -(-self.rows // config.max_batch_size) if config.enabled and self.batchable else self.unbatched
        return -(-calls // config.max_batches_in_flight) * self.batch_seconds

    def observe_batch(self, seconds: float) -> None:
        """Fold one model call's duration into the average (called on the executor; a float store is atomic)."""
        self.batch_seconds = seconds if self.batch_seconds == 0.0 else 0.9 * self.batch_seconds + 0.1 * seconds


class Batcher:
    """A Runner (see server.inference) that batches requests per model; create it inside the running loop."""

    def __init__(
        self,
        executor: Executor,
        config_for: Callable[[str], BatchingConfig],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._executor = executor
        # Settings are fixed for the server's life; building them per request cost a dataclass every call.
        self.config = functools.cache(config_for)
        self._clock = clock
        self._queues: dict[tuple[str, int], _ModelQueue] = {}

    def warm_up(self, runtime: ModelRuntime) -> None:
        """Run every allowed batch size once (blocking), so no request pays for a first call of a shape."""
        config = self.config(runtime.name)
        sizes = config.allowed_batch_sizes if config.enabled and _batchable(runtime) else (1,)
        for size in sizes:
            runtime.warm_up(size)
        log.info("warmed up %s at batch sizes %s", runtime.name, ", ".join(map(str, sizes)))

    async def retire(self, runtime: ModelRuntime) -> None:
        """A retired model version (server/manager.py): once nothing is queued or running on it, its batch loop
        ends and its queue is forgotten. Called when no request holds the version any more."""
        queue = self._queues.get((runtime.name, runtime.version))
        if queue is None:
            return
        while queue.tasks or queue.running:
            queue.changed.set()
            await asyncio.sleep(0.01)
        del self._queues[(runtime.name, runtime.version)]
        if queue.loop_task is not None:
            queue.loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await queue.loop_task

    async def run(
        self, runtime: ModelRuntime, inputs: Mapping[str, np.ndarray], rows: int, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        config = self.config(runtime.name)
        queue = self._queue(runtime)
        if rows > config.max_queued_rows:
            metrics.REJECTED.labels(runtime.name, "invalid").inc()
            raise InvalidInputError(
                f"model '{runtime.name}' takes at most {config.max_queued_rows} rows per request, got {rows}; "
                "split the request"
            )
        if queue.rows + rows > config.max_queued_rows:
            queue.metrics.queue_full.inc()
            raise OverloadedError(
                f"model '{runtime.name}' queue is full ({queue.rows} of {config.max_queued_rows} rows queued); "
                f"back off and retry in about {_ms(queue.wait_estimate(config))} ms"
            )
        now = self._clock()
        if deadline is not None and now >= deadline:
            queue.metrics.expired.inc()
            raise DeadlineExpiredError(f"model '{runtime.name}': the deadline passed before the request was queued")
        if deadline is not None and queue.rows and now + queue.wait_estimate(config) > deadline:
            # Queued, it would only expire behind the work ahead of it: refuse it now, while the caller can still
            # go elsewhere, instead of letting it take a queue slot to die in.
            queue.metrics.expired.inc()
            raise OverloadedError(
                f"model '{runtime.name}' cannot answer within the deadline: about {_ms(queue.wait_estimate(config))} "
                f"ms of work is queued ahead and {_ms(deadline - now)} ms remain; back off and retry, or set a "
                "longer deadline"
            )
        if not (config.enabled and queue.batchable):
            return await self._run_alone(queue, inputs, rows, deadline)
        if (
            config.policy in ("eager", "idle")
            and queue.running == 0
            and not queue.tasks
            and queue.window == 0.0
            and rows <= config.max_batch_size
        ):
            return await self._run_now(queue, config, inputs, rows, deadline)
        loop = asyncio.get_running_loop()
        step = config.max_batch_size
        request = object()
        tasks = [
            _Task({k: v[start : start + step] for k, v in inputs.items()}, min(step, rows - start),
                  loop.create_future(), now, deadline, request)
            for start in range(0, rows, step)
        ]  # fmt: skip
        queue.tasks.extend(tasks)
        queue.rows += rows
        queue.metrics.queue_rows.set(queue.rows)
        queue.changed.set()
        try:
            if len(tasks) == 1:
                return await tasks[0].future
            parts = await asyncio.gather(*(t.future for t in tasks))
        except BaseException:
            for task in tasks:
                task.future.cancel()  # a chunk not yet batched is dropped; a running one finishes unobserved
            raise
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    async def _run_now(
        self,
        queue: _ModelQueue,
        config: BatchingConfig,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        deadline: float | None,
    ) -> dict[str, np.ndarray]:
        """A lone request on an idle model is a batch by itself, run at once without queueing (no latency tax)."""
        padded = config.padded_size(rows)
        queue.metrics.queue_duration.observe(0.0)
        job = self._executor.submit(
            _execute, queue.runtime, queue.metrics, [inputs], padded, deadline, self._clock, queue.observe_batch
        )
        call = asyncio.wrap_future(job)
        queue.running += 1
        # The model call is over only when the executor says so, even if this caller is cancelled first.
        call.add_done_callback(functools.partial(_end_run_now, queue))
        try:
            outputs = await asyncio.shield(call)
        except asyncio.CancelledError:
            if job.cancel():  # True only while it waits for a thread: then it never reaches the model
                self._count_dropped(queue, deadline)
            raise
        queue.metrics.batch_size.observe(rows)
        queue.metrics.padding.inc(padded - rows)
        return outputs if padded == rows else {name: value[:rows] for name, value in outputs.items()}

    async def _run_alone(
        self, queue: _ModelQueue, inputs: Mapping[str, np.ndarray], rows: int, deadline: float | None
    ) -> dict[str, np.ndarray]:
        """Batching off (or inputs of variable size): the request is its own model call, still bounded by
        max_queued_rows and still dropped if its deadline passed while it waited for a thread."""
        runtime, model_metrics, clock = queue.runtime, queue.metrics, self._clock

        def call() -> dict[str, np.ndarray]:
            if deadline is not None and clock() >= deadline:
                model_metrics.expired.inc()
                raise DeadlineExpiredError(f"model '{runtime.name}': the deadline passed while queued")
            started = time.perf_counter()
            outputs = runtime.predict(inputs)
            elapsed = time.perf_counter() - started
            model_metrics.inference.observe(elapsed)
            queue.observe_batch(elapsed)
            model_metrics.batch_size.observe(rows)
            return outputs

        queue.rows += rows
        queue.unbatched += 1
        queue.metrics.queue_rows.set(queue.rows)
        job = self._executor.submit(call)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            if job.cancel():  # True only while it waits for a thread: then it never reaches the model
                self._count_dropped(queue, deadline)
            raise
        finally:
            queue.rows -= rows
            queue.unbatched -= 1
            queue.metrics.queue_rows.set(queue.rows)

    def _count_dropped(self, queue: _ModelQueue, deadline: float | None) -> None:
        """A request its caller gave up on before it reached the model: by its deadline, or cancelled."""
        expired = deadline is not None and self._clock() >= deadline - CANCEL_NEAR_DEADLINE
        (queue.metrics.expired if expired else queue.metrics.cancelled).inc()

    def _queue(self, runtime: ModelRuntime) -> _ModelQueue:
        key = (runtime.name, runtime.version)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _ModelQueue(runtime, _ModelMetrics(runtime.name), _batchable(runtime))
            queue.loop_task = asyncio.get_running_loop().create_task(self._batch_loop(queue))
            queue.loop_task.add_done_callback(_log_failure)
        return queue

    async def _batch_loop(self, queue: _ModelQueue) -> None:
        config = self.config(queue.runtime.name)
        while True:
            queue.changed.clear()
            if queue.tasks and queue.running < config.max_batches_in_flight and config.policy == "eager":
                # No timer: a free slot takes what is queued, after one turn of the event loop so that the requests
                # of the current burst (already received, their handlers ready to run) join this batch.
                await asyncio.sleep(0)
                self._dispatch(queue, config)
                continue
            if queue.tasks and queue.running < config.max_batches_in_flight:
                now = self._clock()
                idle = config.policy == "idle" and queue.running == 0
                ready_at = queue.tasks[0].enqueued + (
                    min(queue.window, config.batch_timeout) if idle else config.batch_timeout
                )
                # The previous batch's callers are all back (closed-loop clients move in lock-step): waiting out the
                # rest of the window would only delay every one of them.
                cycle_back = (
                    idle
                    and queue.last_batch_requests >= CYCLE_MIN_REQUESTS
                    and _requests_at_least(queue.tasks, queue.last_batch_requests)
                )
                full = queue.rows >= config.max_batch_size
                if full or now >= ready_at or cycle_back:
                    if idle and not (full and not cycle_back):  # a full queue says nothing about waiting
                        self._adapt_window(queue, config, paid_off=cycle_back)
                    self._dispatch(queue, config)
                    continue
                timeout: float | None = ready_at - now
            else:
                timeout = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.changed.wait(), timeout)

    @staticmethod
    def _adapt_window(queue: _ModelQueue, config: BatchingConfig, paid_off: bool) -> None:
        """Learn how long an idle model waits for company. Waiting paid off when the previous batch's callers came
        back together (closed-loop clients in lock-step): wait longer (up to batch_timeout), since fewer, larger
        model calls save the server CPU per request. A window that ran out
        means arrivals that do not follow our answers (an open loop, a lone caller): halve it, down to none, so
        that moderate load pays no latency for waiting."""
        if paid_off:
            queue.window = min(config.batch_timeout, max(2 * queue.window, MIN_WINDOW))
        else:
            queue.window = queue.window / 2 if queue.window > MIN_WINDOW else 0.0

    def _take_batch(self, queue: _ModelQueue, config: BatchingConfig) -> list[_Task]:
        """Pop up to max_batch_size rows of live tasks; drop cancelled and expired ones on the way."""
        name = queue.runtime.name
        batch: list[_Task] = []
        rows = 0
        now = self._clock()
        while queue.tasks and rows + queue.tasks[0].rows <= config.max_batch_size:
            task = queue.tasks.popleft()
            queue.rows -= task.rows
            if task.future.done():  # cancelled by its caller, or by gRPC when its deadline passed
                expired = task.deadline is not None and now >= task.deadline - CANCEL_NEAR_DEADLINE
                (queue.metrics.expired if expired else queue.metrics.cancelled).inc()
                continue
            if task.deadline is not None and now >= task.deadline:
                queue.metrics.expired.inc()
                task.future.set_exception(DeadlineExpiredError(f"model '{name}': the deadline passed while queued"))
                continue
            queue.metrics.queue_duration.observe(now - task.enqueued)
            batch.append(task)
            rows += task.rows
        queue.metrics.queue_rows.set(queue.rows)
        return batch

    def _dispatch(self, queue: _ModelQueue, config: BatchingConfig) -> None:
        """Start a batch on the executor; its completion callback hands each task its own rows."""
        batch = self._take_batch(queue, config)
        if not batch:
            return
        queue.last_batch_requests = len({id(t.request) for t in batch})
        rows = sum(t.rows for t in batch)
        padded = config.padded_size(rows)
        deadlines = [t.deadline for t in batch]
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, _execute, queue.runtime, queue.metrics, [t.inputs for t in batch], padded, latest,
                self._clock, queue.observe_batch,
            )  # fmt: skip
        except RuntimeError as error:  # the executor is shut down: fail this batch, keep the loop alive
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(error)
            return
        queue.running += 1
        future.add_done_callback(functools.partial(self._finish_batch, queue, batch, rows, padded))

    @staticmethod
    def _finish_batch(
        queue: _ModelQueue, batch: list[_Task], rows: int, padded: int, future: asyncio.Future[dict[str, np.ndarray]]
    ) -> None:
        queue.running -= 1
        if queue.tasks:
            queue.changed.set()  # the batch loop may start the next batch now
        try:
            if future.cancelled():
                raise asyncio.CancelledError("the executor shut down before the batch ran")
            outputs = future.result()
            offset = 0
            for task in batch:
                if not task.future.done():
                    task.future.set_result({k: v[offset : offset + task.rows] for k, v in outputs.items()})
                offset += task.rows
            queue.metrics.batch_size.observe(rows)
            queue.metrics.padding.inc(padded - rows)
        except BaseException as error:
            if isinstance(error, DeadlineExpiredError):
                queue.metrics.expired.inc(len(batch))
            else:
                log.error("batch of %d rows for model %s failed", rows, queue.runtime.name, exc_info=error)
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(error)


def _end_run_now(queue: _ModelQueue, call: asyncio.Future[dict[str, np.ndarray]]) -> None:
    queue.running -= 1
    if queue.tasks:
        queue.changed.set()  # requests that arrived meanwhile run next
    # Retrieved here, so a failure after its caller left is not reported as unhandled.
    if not call.cancelled() and isinstance(call.exception(), DeadlineExpiredError):
        queue.metrics.expired.inc()


def _requests_at_least(tasks: deque[_Task], count: int) -> bool:
    """Whether the queue holds chunks of at least `count` different requests (a split request is one)."""
    seen: set[int] = set()
    for task in tasks:
        seen.add(id(task.request))
        if len(seen) >= count:
            return True
    return False


def _batchable(runtime: ModelRuntime) -> bool:
    """Rows of different requests can be joined: the model has a batch dimension and inputs of fixed size."""
    return runtime.batched and all(spec.values_per_row is not None for spec in runtime.inputs.values())


def _execute(
    runtime: ModelRuntime,
    metrics_: _ModelMetrics,
    parts: list[Mapping[str, np.ndarray]],
    padded: int,
    deadline: float | None,
    clock: Callable[[], float],
    observe: Callable[[float], None],
) -> dict[str, np.ndarray]:
    """On the executor: join the tasks' rows, pad to an allowed size and call the model (off the event loop,
    so preparing this batch overlaps the event loop's work on the next one). A batch whose every deadline
    passed while it waited for a thread is not run."""
    if deadline is not None and clock() >= deadline:
        raise DeadlineExpiredError(f"model '{runtime.name}': the deadline passed while queued")
    inputs = {
        name: _pad(np.concatenate([p[name] for p in parts]) if len(parts) > 1 else parts[0][name], padded)
        for name in runtime.inputs
    }
    started = time.perf_counter()
    outputs = runtime.predict(inputs)
    metrics_.inference.observe(time.perf_counter() - started)
    observe(time.perf_counter() - started)
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != padded:
            raise ValueError(
                f"model '{runtime.name}' output '{name}' has shape {value.shape}; batching needs one row per "
                f"input row ({padded}) first; switch batching off for this model"
            )
    return outputs


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _pad(array: np.ndarray, rows: int) -> np.ndarray:
    """Pad with copies of the last row (always a valid input, unlike zeros for some models)."""
    missing = rows - array.shape[0]
    if missing == 0:
        return array
    return np.concatenate([array, np.broadcast_to(array[-1:], (missing, *array.shape[1:]))])


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("batching task failed", exc_info=task.exception())
