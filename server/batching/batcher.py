"""Dynamic batching (SPEC §4): concurrent requests for one signature of one model version merged into one model
call (each signature has a queue of its own: a batch never mixes signatures).

Each request becomes tasks of at most max_batch_size rows (one task when its rows cannot be joined with others':
batching off, or inputs of variable size), each with its own future, in its version's queue. Whenever a request
arrives, a batch finishes or a wait runs out, the policy (server/batching/policy.py: a pure function of the queue,
the model's measured cost and the clock) says whether a batch runs now.

Every model call, of a lone request or a full batch, batching on or off, goes through one path (Ray Serve's
`_handle_batches` shape): `_start` takes tasks from the queue; `_execute`, on the executor, drops the cancelled
and expired ones (counted there, once), joins and pads the rest to an allowed size, calls the model and checks
that every output has one row per input row; `_finish`, back on the event loop, splits the outputs and resolves
the futures that are still waited for, then asks the policy again. A failing call fails only its own tasks, and
NaN or infinity that a model computed (from finite inputs too large for it) fails only the requests whose rows
hold them: finiteness is checked once per call on the executor, per request only when that check fails.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from server.base import metrics
from server.base.deadlines import CANCEL_NEAR_DEADLINE
from server.base.errors import DeadlineExpiredError, InvalidInputError, OverloadedError
from server.base.tensors import check_finite_outputs
from server.batching.config import BatchingConfig, default_batch_sizes
from server.batching.policy import ArrivalRate, CostModel, Limits, QueueState, decide
from server.runtimes.base import ModelRuntime

__all__ = ["Batcher", "BatchingConfig", "default_batch_sizes"]

log = logging.getLogger(__name__)

_sequence = itertools.count()


@dataclass(eq=False)
class _Task:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float  # on the batcher's clock
    deadline: float | None  # on the batcher's clock
    taken: bool = False


@dataclass
class _Outcome:
    """What a model call did with its tasks (built on the executor, read on the event loop)."""

    live: list[_Task]  # those that reached the model
    expired: list[_Task]  # dropped: their deadline passed while queued (their callers still wait)
    started: float  # on the batcher's clock
    outputs: dict[str, np.ndarray] | None = None
    error: Exception | None = None
    rows: int = 0
    padded: int = 0
    seconds: float = 0.0
    finite: bool = True  # every float output value is finite (checked once per call, off the event loop)


class _ModelMetrics:
    """One model's metric children, looked up once instead of per request."""

    def __init__(self, model: str, signature: str) -> None:
        self.model = model
        self.signature_rows = metrics.SIGNATURE_ROWS.labels(model, signature)
        self.queue_rows = metrics.QUEUE_ROWS.labels(model)
        self.queue_duration = metrics.QUEUE_DURATION.labels(model)
        self.inference = metrics.INFERENCE_DURATION.labels(model)
        self.batch_size = metrics.BATCH_SIZE.labels(model)
        self.padding = metrics.BATCH_PADDING.labels(model)
        self.cancelled = metrics.REJECTED.labels(model, "cancelled")
        self.expired = metrics.REJECTED.labels(model, "deadline")
        self.queue_full = metrics.REJECTED.labels(model, "queue_full")
        self.invalid = metrics.REJECTED.labels(model, "invalid")
        self._batches: dict[str, object] = {}

    def batch_ran(self, reason: str) -> None:
        counter = self._batches.get(reason)
        if counter is None:
            counter = self._batches[reason] = metrics.BATCHES.labels(self.model, reason)
        counter.inc()  # type: ignore[attr-defined]


@dataclass
class _ModelQueue:
    """One model version's pending tasks, what runs of it, and what its calls cost."""

    runtime: ModelRuntime
    metrics: _ModelMetrics
    joinable: bool  # rows of different requests may be joined and padded (batching on, inputs of fixed size)
    limits: Limits
    tasks: deque[_Task] = field(default_factory=deque)
    deadlines: list[tuple[float, int, _Task]] = field(default_factory=list)  # heap of queued tasks' deadlines
    rows: int = 0  # queued, not yet taken
    running: int = 0  # model calls started and not finished
    running_rows: int = 0
    cost: CostModel = field(default_factory=CostModel)
    arrivals: ArrivalRate = field(default_factory=ArrivalRate)
    timer: asyncio.TimerHandle | None = None
    timer_wake: float = 0.0  # the moment (batcher's clock) the timer was set for

    def state(self) -> QueueState:
        while self.deadlines and self.deadlines[0][2].taken:
            heapq.heappop(self.deadlines)
        return QueueState(
            rows=self.rows,
            oldest=self.tasks[0].enqueued if self.tasks else 0.0,
            earliest_deadline=self.deadlines[0][0] if self.deadlines else None,
            running=self.running,
            rate=self.arrivals.rows_per_second,
            last_arrival=self.arrivals.last,
        )

    def wait_estimate(self, extra_rows: int = 0) -> float:
        """Seconds until the rows queued now (and `extra_rows` more) have run, from the cost model."""
        limits = self.limits
        if self.joinable:
            return self.cost.drain_seconds(self.rows + extra_rows, 0, limits.max_batch_size, limits.slots)
        calls = len(self.tasks) + self.running + (1 if extra_rows else 0)
        return self.cost.drain_seconds(self.rows + self.running_rows + extra_rows, calls, 1, limits.slots)


class Batcher:
    """A Runner (see server.dataplane.inference) that batches requests per model version; create it inside the running
    loop."""

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
        self._queues: dict[tuple[str, int, str], _ModelQueue] = {}
        self._loop_cpu = _LoopCpu()

    def warm_up(self, runtime: ModelRuntime) -> None:
        """Run every allowed batch size once (blocking), so no request pays for a first call of a shape."""
        config = self.config(runtime.name)
        for signature in runtime.signatures.values():  # each signature is a graph of its own
            sizes = config.allowed_batch_sizes if config.enabled and _batchable(signature) else (1,)
            for size in sizes:
                signature.warm_up(size)
            named = "" if signature is runtime else f" signature {signature.signature_name}"
            log.info("warmed up %s%s at batch sizes %s", runtime.name, named, ", ".join(map(str, sizes)))

    async def retire(self, runtime: ModelRuntime) -> None:
        """A retired model version (registry/manager.py): once nothing is queued or running on it, the queue of each
        of its signatures stops (no timer left) and is forgotten. Called when no request holds the version any more."""
        for signature in list(runtime.signatures.values()):
            queue = self._queues.get(signature.key)
            if queue is None:
                continue
            while queue.tasks or queue.running:
                self._pump(queue)
                await asyncio.sleep(0.01)
            del self._queues[signature.key]
            if queue.timer is not None:
                queue.timer.cancel()
                queue.timer = None

    def wait_estimate(self, runtime: ModelRuntime) -> float:
        """Seconds until the work queued now for this version has run (0 when nothing is queued)."""
        queue = self._queues.get(runtime.key)
        return 0.0 if queue is None else queue.wait_estimate()

    def seconds_per_call(self) -> float | None:
        """What one more 1-row call costs the server now, from the cost models: its share of a full batch (what
        runs under overload) plus its request work, for the costliest model measured (None before any call was
        timed). Admission control's back-off hint (server/dataplane/admission.py)."""
        costs = []
        for queue in self._queues.values():
            if queue.cost.by_size:
                size = queue.cost.best_size(queue.limits.max_batch_size) if queue.joinable else 1
                costs.append(queue.cost.seconds(size) / size + queue.cost.per_request)
        return max(costs, default=None)

    def cost_model(self, runtime: ModelRuntime) -> CostModel | None:
        queue = self._queues.get(runtime.key)
        return None if queue is None else queue.cost

    async def run(
        self, runtime: ModelRuntime, inputs: Mapping[str, np.ndarray], rows: int, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        config = self.config(runtime.name)
        queue = self._queue(runtime, config)
        if rows > config.max_queued_rows:
            queue.metrics.invalid.inc()
            raise InvalidInputError(
                f"model '{runtime.name}' takes at most {config.max_queued_rows} rows per request, got {rows}; "
                "split the request"
            )
        waiting = queue.rows if queue.joinable else queue.rows + queue.running_rows
        if waiting + rows > config.max_queued_rows:
            queue.metrics.queue_full.inc()
            raise OverloadedError(
                f"model '{runtime.name}' queue is full ({waiting} of {config.max_queued_rows} rows queued); "
                f"back off and retry in about {_ms(queue.wait_estimate())} ms"
            )
        now = self._clock()
        if deadline is not None:
            if now >= deadline:
                queue.metrics.expired.inc()
                raise DeadlineExpiredError(f"model '{runtime.name}': the deadline passed before the request was queued")
            if waiting and now + queue.wait_estimate(rows) > deadline:
                # Queued, it would only expire behind the work ahead of it: refuse it now, while the caller can
                # still go elsewhere, instead of letting it take a queue slot to die in.
                queue.metrics.expired.inc()
                raise OverloadedError(
                    f"model '{runtime.name}' cannot answer within the deadline: about {_ms(queue.wait_estimate())} "
                    f"ms of work is queued ahead and {_ms(deadline - now)} ms remain; back off and retry, or set a "
                    "longer deadline"
                )
        loop = asyncio.get_running_loop()
        step = config.max_batch_size if queue.joinable else rows
        if rows <= step:
            tasks = [_Task(inputs, rows, loop.create_future(), now, deadline)]
        else:
            tasks = [
                _Task({k: v[start : start + step] for k, v in inputs.items()}, min(step, rows - start),
                      loop.create_future(), now, deadline)
                for start in range(0, rows, step)
            ]  # fmt: skip
        queue.tasks.extend(tasks)
        queue.rows += rows
        if deadline is not None:
            for task in tasks:
                heapq.heappush(queue.deadlines, (deadline, next(_sequence), task))
        queue.arrivals.arrived(now, rows)
        if self._loop_cpu.request():
            for each in self._queues.values():
                each.cost.per_request = self._loop_cpu.per_request
        queue.metrics.queue_rows.inc(rows)  # the model's gauge: every version and signature queue adds its own
        self._pump(queue)
        try:
            if len(tasks) == 1:
                return await tasks[0].future
            parts = await asyncio.gather(*(t.future for t in tasks))
        except BaseException:
            for task in tasks:
                task.future.cancel()  # a chunk not yet run is dropped; a running one finishes unobserved
            raise
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _queue(self, runtime: ModelRuntime, config: BatchingConfig) -> _ModelQueue:
        key = runtime.key
        queue = self._queues.get(key)
        if queue is None:
            limits = Limits(config.max_batch_size, config.batch_timeout, config.max_batches_in_flight,
                            fixed=config.policy == "fixed")  # fmt: skip
            joinable = config.enabled and _batchable(runtime)
            queue = self._queues[key] = _ModelQueue(
                runtime, _ModelMetrics(runtime.name, runtime.signature_name), joinable, limits
            )
        return queue

    def _pump(self, queue: _ModelQueue) -> None:
        """Start every batch the policy says should run now; else set a timer for when it says to look again.

        A timer already set for the same moment or earlier is kept (when it fires, the policy is asked again): under
        load every arrival asks, and the answer moves a little later each time. Replacing the timer per arrival cost
        a TimerHandle, a cancelled one left in the loop's heap, and microseconds each (issue 25)."""
        if not queue.joinable:  # each request is its own call, at once: the executor's threads queue them
            while queue.tasks:
                self._start(queue, 0, "unbatched")
            return
        while True:
            if not queue.rows or queue.running >= queue.limits.slots:
                return  # what decide() answers first (wait for an arrival or a call's end), without its inputs
            now = self._clock()
            decision = decide(queue.state(), queue.cost, now, queue.limits)
            if decision.run:
                self._start(queue, decision.rows, decision.reason)
                continue
            if queue.timer is not None and (decision.wake is None or queue.timer_wake <= decision.wake):
                return  # it fires first and asks again: early is harmless, late is not
            if queue.timer is not None:
                queue.timer.cancel()
                queue.timer = None
            if decision.wake is not None:
                delay = max(0.0, decision.wake - now)
                queue.timer = asyncio.get_running_loop().call_later(delay, self._on_timer, queue)
                queue.timer_wake = decision.wake
            return

    def _on_timer(self, queue: _ModelQueue) -> None:
        queue.timer = None  # it has fired: the next wake needs a timer of its own
        self._pump(queue)

    def _start(self, queue: _ModelQueue, max_rows: int, reason: str) -> None:
        """Take the next tasks, up to `max_rows` rows (one task at least), and run them as one model call."""
        batch: list[_Task] = []
        rows = 0
        while queue.tasks and (not batch or rows + queue.tasks[0].rows <= max_rows):
            task = queue.tasks.popleft()
            task.taken = True
            batch.append(task)
            rows += task.rows
        queue.rows -= rows
        queue.metrics.queue_rows.dec(rows)
        padded_size = self.config(queue.runtime.name).padded_size if queue.joinable else None
        try:
            call = asyncio.get_running_loop().run_in_executor(
                self._executor, _execute, queue.runtime, batch, padded_size, self._clock, queue.metrics
            )
        except RuntimeError as error:  # the executor is shut down: fail this batch, keep the queue working
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(error)
            return
        queue.running += 1
        queue.running_rows += rows
        call.add_done_callback(functools.partial(self._finish, queue, batch, rows, reason, time.perf_counter()))

    def _finish(
        self,
        queue: _ModelQueue,
        batch: list[_Task],
        rows: int,
        reason: str,
        started: float,
        call: asyncio.Future[_Outcome],
    ) -> None:
        """Back on the event loop: hand each live task its own rows (or the call's error), then look again.

        The cost model learns the call's time as the event loop sees it, from `_start` to here: the model call,
        and the waits for a thread, for the GIL and for the loop's turn that a busy process adds to it. Under
        load that time grows, and with it the rows worth waiting for; a lone caller still never waits, since its
        next request cannot come before this answer."""
        queue.running -= 1
        queue.running_rows -= rows
        try:
            outcome = call.result()
        except BaseException as error:  # the executor shut down before the call ran
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(error)
        else:
            if _resolve(queue, outcome, reason):
                queue.cost.observe(outcome.padded, time.perf_counter() - started, now=self._clock())
        if queue.tasks:
            self._pump(queue)


class _LoopCpu:
    """The event loop thread's CPU time per request, over windows of SAMPLE_REQUESTS requests (all models) without
    a pause: a gap of IDLE_GAP between two requests starts the window afresh, so that idle work (timers, health
    checks, loading) is not charged to requests."""

    SAMPLE_REQUESTS = 64
    IDLE_GAP = 0.05

    def __init__(self) -> None:
        self.per_request = 0.0
        self._requests = 0
        self._cpu = 0.0
        self._last = float("-inf")

    def request(self) -> bool:
        """Count one request (on the loop thread); True when the estimate was just updated."""
        wall = time.monotonic()
        idle, self._last = wall - self._last > self.IDLE_GAP, wall
        if idle:
            self._cpu, self._requests = time.thread_time(), 0
            return False
        self._requests += 1
        if self._requests < self.SAMPLE_REQUESTS:
            return False
        cpu = time.thread_time()
        sample = (cpu - self._cpu) / self._requests
        self._cpu, self._requests = cpu, 0
        self.per_request = sample if self.per_request == 0.0 else self.per_request + 0.2 * (sample - self.per_request)
        return True


def _resolve(queue: _ModelQueue, outcome: _Outcome, reason: str) -> bool:
    """Resolve the tasks' futures from the call's outcome; True when the model ran and answered."""
    name = queue.runtime.name
    for task in outcome.expired:
        if not task.future.done():
            task.future.set_exception(DeadlineExpiredError(f"model '{name}': the deadline passed while queued"))
    if not outcome.live:
        return False
    if outcome.error is not None:
        log.error("batch of %d rows for model %s failed", outcome.rows, name, exc_info=outcome.error)
        for task in outcome.live:
            if not task.future.done():
                task.future.set_exception(outcome.error)
        return False
    assert outcome.outputs is not None
    model_metrics = queue.metrics
    model_metrics.batch_ran(reason)
    model_metrics.batch_size.observe(outcome.rows)
    model_metrics.signature_rows.inc(outcome.rows)
    model_metrics.padding.inc(outcome.padded - outcome.rows)
    model_metrics.inference.observe(outcome.seconds)
    if len(outcome.live) == 1 and outcome.padded == outcome.rows and outcome.finite:
        task = outcome.live[0]
        model_metrics.queue_duration.observe(outcome.started - task.enqueued)
        if not task.future.done():
            task.future.set_result(outcome.outputs)
        return True
    offset = 0
    for task in outcome.live:
        model_metrics.queue_duration.observe(outcome.started - task.enqueued)
        if not task.future.done():
            rows = {k: v[offset : offset + task.rows] for k, v in outcome.outputs.items()}
            try:
                if not outcome.finite:  # only the requests whose own rows overflowed fail
                    check_finite_outputs(name, rows)
            except InvalidInputError as error:
                task.future.set_exception(error)
            else:
                task.future.set_result(rows)
        offset += task.rows
    return True


def _execute(
    runtime: ModelRuntime,
    batch: list[_Task],
    padded_size: Callable[[int], int] | None,
    clock: Callable[[], float],
    model_metrics: _ModelMetrics,
) -> _Outcome:
    """On the executor: drop the tasks nobody waits for or whose deadline passed (counted here, once), join and pad
    the rest (`padded_size` None: one task, never padded), call the model, check that every output has one row per
    input row. Off the event loop, so preparing this call overlaps the event loop's work on the next."""
    now = clock()
    live: list[_Task] = []
    expired: list[_Task] = []
    for task in batch:
        if task.future.done():  # cancelled by its caller, or by gRPC when its deadline passed
            near_deadline = task.deadline is not None and now >= task.deadline - CANCEL_NEAR_DEADLINE
            (model_metrics.expired if near_deadline else model_metrics.cancelled).inc()
        elif task.deadline is not None and now >= task.deadline:
            model_metrics.expired.inc()
            expired.append(task)
        else:
            live.append(task)
    outcome = _Outcome(live, expired, now)
    if not live:
        return outcome
    rows = sum(task.rows for task in live)
    padded = rows if padded_size is None else padded_size(rows)
    outcome.rows, outcome.padded = rows, padded
    if len(live) == 1 and padded == rows:
        inputs = live[0].inputs
    else:
        inputs = {
            name: _pad(
                np.concatenate([t.inputs[name] for t in live]) if len(live) > 1 else live[0].inputs[name], padded
            )
            for name in runtime.inputs
        }
    try:
        started = time.perf_counter()
        outputs = runtime.predict(inputs)
        outcome.seconds = time.perf_counter() - started
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != padded:
                advice = "; switch batching off for this model" if padded_size is not None else ""
                raise ValueError(
                    f"model '{runtime.name}' output '{name}' has shape {value.shape}; batching needs one row per "
                    f"input row ({padded}) first{advice}"
                )
        outcome.outputs = outputs
        outcome.finite = all(value.dtype.kind != "f" or np.isfinite(value).all() for value in outputs.values())
    except Exception as error:
        outcome.error = error
    return outcome


def _batchable(runtime: ModelRuntime) -> bool:
    """Rows of different requests can be joined: the model has a batch dimension and inputs of fixed size."""
    return runtime.batched and all(spec.values_per_row is not None for spec in runtime.inputs.values())


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _pad(array: np.ndarray, rows: int) -> np.ndarray:
    """Pad with copies of the last row (always a valid input, unlike zeros for some models)."""
    missing = rows - array.shape[0]
    if missing == 0:
        return array
    return np.concatenate([array, np.broadcast_to(array[-1:], (missing, *array.shape[1:]))])
