"""The batcher, in-process on the real multi_input SavedModel: batches form by size, by timeout and when idle;
rows never mix; the queue is bounded; cancelled and expired work never reaches the model; failures stay local.

Batching is made deterministic by holding model calls behind a gate (an event), huge timeouts and a manual
clock, never by sleeping and measuring.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from server.base.errors import (
    DeadlineExpiredError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    UnavailableError,
)
from server.batching.batcher import Batcher, BatchingConfig, default_batch_sizes
from server.dataplane.admission import AdmissionControl
from server.dataplane.inference import InferenceService
from server.grpc.status import to_status
from server.registry.manager import ModelManager, Phase
from server.registry.repository import export_saved_model
from server.registry.version_policy import VersionPolicy
from server.runtimes.base import ModelRuntime
from server.runtimes.savedmodel import SavedModelRuntime

MODEL = "multi_input"


class GatedRuntime:
    """The real runtime, recording the rows of every model call and holding calls while the gate is closed."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.name, self.version, self.inputs, self.outputs = MODEL, 1, runtime.inputs, runtime.outputs
        self.batched = runtime.batched
        self.signature_name = runtime.signature_name
        self.key = (MODEL, 1, runtime.signature_name)
        self.signatures = {runtime.signature_name: self}
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_next = False
        self.scalar_outputs = False

    def predict(self, inputs):
        self.calls.append(next(iter(inputs.values())).shape[0])
        self.started.set()
        assert self.gate.wait(30), "gate never opened"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected device fault")
        outputs = self.runtime.predict(inputs)
        if self.scalar_outputs:  # a user's model whose output is not one row per input row
            return {name: value.sum() for name, value in outputs.items()}
        return outputs


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def real_runtime(tmp_path_factory, keras_models) -> ModelRuntime:
    path = tmp_path_factory.mktemp("batching") / MODEL / "1"
    export_saved_model(keras_models[MODEL], path, seed=1234)
    return SavedModelRuntime(MODEL, 1, path, "/device:CPU:0")


@pytest.fixture
def runtime(real_runtime) -> Iterator[GatedRuntime]:
    """Its gate opened again after the test, failed or not: no executor thread stays held in a model call."""
    gated = GatedRuntime(real_runtime)
    yield gated
    gated.gate.set()


@pytest.fixture(scope="module")
def executor():
    with ThreadPoolExecutor(4) as pool:
        yield pool


def rows_of(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_a": rng.random((n, 10), dtype=np.float32), "input_b": rng.random((n, 20), dtype=np.float32)}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": MODEL, **labels}) or 0.0


def make_batcher(executor, clock=None, **settings) -> Batcher:
    config = BatchingConfig(**settings)
    assert not config.problems()
    return Batcher(executor, lambda model: config, **({"clock": clock} if clock else {}))


async def settle() -> None:
    """Let every ready task run up to its next real wait (requests reach the queue)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_default_batch_sizes():
    assert default_batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert default_batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert default_batch_sizes(1) == (1,)
    assert BatchingConfig(max_batch_size=8).padded_size(3) == 4


def test_concurrent_requests_each_get_their_own_rows_across_splits_and_padding(executor, runtime, real_runtime):
    sizes = [1, 3, 2, 13, 1, 5, 8, 1, 20, 2, 7, 1]
    requests = [rows_of(n, seed=i) for i, n in enumerate(sizes)]
    count, total = sample("modelserver_batch_size_rows_count"), sample("modelserver_batch_size_rows_sum")
    padding = sample("modelserver_batch_padding_rows_total")

    async def scenario():
        batcher = make_batcher(executor, max_batch_size=8, batch_timeout=0.01, policy="fixed")
        return await asyncio.gather(*(batcher.run(runtime, x, len(x["input_a"])) for x in requests))

    results = asyncio.run(scenario())
    for inputs, result in zip(requests, results, strict=True):
        np.testing.assert_allclose(result["output"], real_runtime.predict(inputs)["output"], atol=1e-6)
        assert result["output"].shape == (len(inputs["input_a"]), 1)
    assert all(call in (1, 2, 4, 8) for call in runtime.calls), runtime.calls  # padded to allowed sizes
    assert sum(sizes) <= sum(runtime.calls) and len(runtime.calls) < len(sizes) + 4  # merged, not one per chunk
    # The histogram saw every executed batch, with the real (unpadded) rows.
    assert sample("modelserver_batch_size_rows_count") - count == len(runtime.calls)
    assert sample("modelserver_batch_size_rows_sum") - total == sum(sizes)
    assert sample("modelserver_batch_padding_rows_total") - padding == sum(runtime.calls) - sum(sizes)


def test_large_request_is_split_in_order(executor, runtime, real_runtime):
    inputs = rows_of(20, seed=5)

    async def scenario():
        batcher = make_batcher(executor, max_batch_size=8, batch_timeout=1000, policy="cost")
        return await batcher.run(runtime, inputs, 20)

    result = asyncio.run(scenario())
    assert runtime.calls == [8, 8, 4]
    np.testing.assert_allclose(result["output"], real_runtime.predict(inputs)["output"], atol=1e-6)


def test_batch_forms_by_size_without_waiting_for_the_timeout(executor, runtime):
    async def scenario():
        # A fixed wait of 1000 s: only reaching max_batch_size can start this batch.
        batcher = make_batcher(executor, max_batch_size=4, batch_timeout=1000, policy="fixed")
        return await asyncio.gather(*(batcher.run(runtime, rows_of(1, seed=i), 1) for i in range(4)))

    assert len(asyncio.run(scenario())) == 4
    assert runtime.calls == [4]


def test_batch_forms_by_timeout_when_not_full(executor, runtime):
    async def scenario():
        batcher = make_batcher(executor, max_batch_size=64, batch_timeout=0.01, policy="fixed")
        return await asyncio.gather(*(batcher.run(runtime, rows_of(1, seed=i), 1) for i in range(3)))

    assert len(asyncio.run(scenario())) == 3
    assert runtime.calls == [4]  # 3 rows padded to 4: the batch ran before it was full


def test_a_lone_request_runs_at_once_and_what_queues_while_the_model_is_busy_runs_together(executor, runtime):
    async def scenario():
        # A huge timeout that must never be waited out: a lone caller, then a free slot, never wait for it.
        batcher = make_batcher(executor, max_batch_size=64, batch_timeout=1000, policy="cost", max_batches_in_flight=1)
        await batcher.run(runtime, rows_of(1, seed=0), 1)  # idle model: runs at once
        runtime.gate.clear()
        runtime.started.clear()
        first = asyncio.create_task(batcher.run(runtime, rows_of(2, seed=1), 2))
        assert await asyncio.to_thread(runtime.started.wait, 10)
        queued = [asyncio.create_task(batcher.run(runtime, rows_of(1, seed=i), 1)) for i in range(5)]
        await settle()
        assert runtime.calls == [1, 2], "a request ran while the only batch slot was taken"
        runtime.gate.set()  # the slot frees: the 5 queued rows go together, padded to 8, without waiting
        return await asyncio.wait_for(asyncio.gather(first, *queued), 30)

    results = asyncio.run(scenario())
    assert runtime.calls == [1, 2, 8]
    expected = runtime.runtime.predict(rows_of(1, seed=3))["output"]
    np.testing.assert_allclose(results[4]["output"], expected, atol=1e-6)  # rows of seed 3 came back to their caller


def test_full_queue_sheds_load_at_once_and_the_rest_still_succeed(executor, runtime):
    """Fails fast when the bound breaks: a request that queues instead of being refused is seen as not done after
    settle(), and the gate always opens again, so nothing waits for the suite's timeout."""
    rejected = sample("modelserver_rejected_requests_total", reason="queue_full")

    async def scenario():
        batcher = make_batcher(executor, max_batch_size=4, max_queued_rows=8, max_batches_in_flight=1)
        runtime.gate.clear()
        try:
            running = asyncio.create_task(batcher.run(runtime, rows_of(4, seed=0), 4))
            assert await asyncio.to_thread(runtime.started.wait, 10), "the first batch never reached the model"
            queued = [asyncio.create_task(batcher.run(runtime, rows_of(4, seed=i), 4)) for i in (1, 2)]
            await settle()
            assert not any(task.done() for task in queued), "8 rows fit the queue: they must wait, not fail"
            extra = asyncio.create_task(batcher.run(runtime, rows_of(1, seed=3), 1))
            await settle()
            assert extra.done(), "a request beyond max_queued_rows was queued instead of refused at once"
            with pytest.raises(OverloadedError, match=r"queue is full \(8 of 8 rows queued\)"):
                extra.result()
        finally:
            runtime.gate.set()
        return await asyncio.wait_for(asyncio.gather(running, *queued), 30)

    assert [r["output"].shape for r in asyncio.run(scenario())] == [(4, 1)] * 3
    assert runtime.calls == [4, 4, 4]
    assert sample("modelserver_rejected_requests_total", reason="queue_full") - rejected == 1


def test_request_larger_than_the_queue_is_invalid(executor, runtime):
    async def scenario():
        batcher = make_batcher(executor, max_batch_size=4, max_queued_rows=8)
        await batcher.run(runtime, rows_of(9, seed=0), 9)

    with pytest.raises(InvalidInputError, match="at most 8 rows per request, got 9"):
        asyncio.run(scenario())
    assert runtime.calls == []


def test_cancelled_and_expired_requests_never_reach_the_model(executor, runtime):
    clock = ManualClock()
    cancelled, expired = (sample("modelserver_rejected_requests_total", reason=r) for r in ("cancelled", "deadline"))

    async def scenario():
        batcher = make_batcher(executor, clock=clock, max_batch_size=8, max_batches_in_flight=1)
        runtime.gate.clear()
        running = asyncio.create_task(batcher.run(runtime, rows_of(1, seed=0), 1))
        await asyncio.to_thread(runtime.started.wait, 10)
        doomed = asyncio.create_task(batcher.run(runtime, rows_of(2, seed=1), 2))
        late = asyncio.create_task(batcher.run(runtime, rows_of(3, seed=2), 3, deadline=clock.now + 5))
        kept = asyncio.create_task(batcher.run(runtime, rows_of(4, seed=3), 4, deadline=clock.now + 60))
        await settle()
        doomed.cancel()
        clock.now += 10  # past late's deadline, not kept's
        runtime.gate.set()
        await running
        with pytest.raises(asyncio.CancelledError):
            await doomed
        with pytest.raises(DeadlineExpiredError, match="deadline passed while queued"):
            await late
        return await kept

    assert asyncio.run(scenario())["output"].shape == (4, 1)
    assert runtime.calls == [1, 4]  # neither the cancelled 2 rows nor the expired 3 were computed
    assert sample("modelserver_rejected_requests_total", reason="cancelled") - cancelled == 1
    assert sample("modelserver_rejected_requests_total", reason="deadline") - expired == 1


def test_a_failing_batch_fails_only_its_own_requests(executor, runtime, real_runtime):
    async def scenario():
        batcher = make_batcher(executor, max_batch_size=8, max_batches_in_flight=1)
        runtime.gate.clear()
        first = asyncio.create_task(batcher.run(runtime, rows_of(1, seed=0), 1))
        await asyncio.to_thread(runtime.started.wait, 10)
        runtime.fail_next = True
        runtime.gate.set()
        with pytest.raises(RuntimeError, match="injected device fault"):
            await first
        second = rows_of(3, seed=1)
        return second, await batcher.run(runtime, second, 3)

    inputs, result = asyncio.run(scenario())
    np.testing.assert_allclose(result["output"], real_runtime.predict(inputs)["output"], atol=1e-6)
    assert runtime.calls == [1, 4]


def test_nan_a_model_computes_fails_only_the_request_whose_rows_hold_it(executor, runtime, real_runtime):
    """Finiteness is checked once per model call; when that check fails, each request of the batch is checked on its
    own rows: the request that overflowed fails naming its own row, the others in the same call are answered."""
    normal = rows_of(2, seed=3)
    extreme = {"input_a": np.full((2, 10), 3.4e38, np.float32), "input_b": np.full((2, 20), 3.4e38, np.float32)}
    extreme["input_a"][0], extreme["input_b"][0] = 0.5, 0.5  # its row 0 is fine, its row 1 overflows the model

    async def scenario():
        # One batch slot and a timeout never waited out: what queues while the model is busy runs together at once.
        batcher = make_batcher(executor, max_batch_size=8, batch_timeout=1000, policy="cost", max_batches_in_flight=1)
        runtime.gate.clear()
        lone = asyncio.create_task(batcher.run(runtime, rows_of(1, seed=9), 1))
        assert await asyncio.to_thread(runtime.started.wait, 10)
        together = [asyncio.create_task(batcher.run(runtime, x, 2)) for x in (normal, extreme)]
        await settle()
        runtime.gate.set()
        await asyncio.wait_for(lone, 30)
        return await asyncio.wait_for(asyncio.gather(*together, return_exceptions=True), 30)

    answered, refused = asyncio.run(scenario())
    assert runtime.calls == [1, 4], runtime.calls  # both in one call
    np.testing.assert_allclose(answered["output"], real_runtime.predict(normal)["output"], atol=1e-6)
    assert isinstance(refused, InvalidInputError), refused
    assert "output 'output'" in str(refused) and "row 1" in str(refused), str(refused)


def test_batching_off_runs_each_request_alone(executor, runtime):
    async def scenario():
        batcher = make_batcher(executor, enabled=False)
        return await asyncio.gather(*(batcher.run(runtime, rows_of(n, seed=n), n) for n in (1, 3, 2)))

    assert [r["output"].shape[0] for r in asyncio.run(scenario())] == [1, 3, 2]
    assert sorted(runtime.calls) == [1, 2, 3]


def test_invalid_requests_never_enter_the_queue(executor, runtime):
    invalid = sample("modelserver_rejected_requests_total", reason="invalid")

    async def scenario():
        batcher = make_batcher(executor, max_batch_size=8)
        manager = ModelManager(Path("unused"), load=None, retire_queue=batcher.retire,
                               policy_for=lambda name: VersionPolicy("latest"))  # fmt: skip
        manager.add_available(runtime)
        manager.set_phase(Phase.SERVING)
        core = InferenceService(manager, batcher, batcher.config)
        with pytest.raises(InvalidInputError):
            await core.infer(
                MODEL, 0, {"input_a": np.zeros((2, 10), np.float32), "input_b": np.zeros((3, 20), np.float32)}
            )
        with pytest.raises(InvalidInputError):
            await core.infer_flat(MODEL, 0, {"input_a": np.zeros(7, np.float32), "input_b": np.zeros(20, np.float32)})
        return await core.infer(MODEL, 0, rows_of(2, seed=0))

    assert asyncio.run(scenario()).outputs["output"].shape == (2, 1)
    assert runtime.calls == [2]
    assert sample("modelserver_rejected_requests_total", reason="invalid") - invalid == 2


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInputError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (OverloadedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExpiredError("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_error_to_status_map(error, code):
    assert to_status(error)[0] == code


def test_a_model_whose_outputs_are_not_per_row_fails_its_batch_instead_of_hanging(executor, runtime):
    runtime.scalar_outputs = True

    async def scenario():
        batcher = make_batcher(executor, max_batch_size=8, batch_timeout=0.01, policy="fixed")
        calls = [batcher.run(runtime, rows_of(1, seed=i), 1) for i in range(3)]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)

    results = asyncio.run(scenario())
    assert all(isinstance(r, ValueError) and "batching needs one row per input row" in str(r) for r in results)


def test_cancelling_a_lone_request_does_not_free_the_model_before_its_call_ends(executor, runtime):
    async def scenario():
        batcher = make_batcher(executor, max_batch_size=8, max_batches_in_flight=1)
        runtime.gate.clear()
        lone = asyncio.create_task(batcher.run(runtime, rows_of(1, seed=0), 1))
        await asyncio.to_thread(runtime.started.wait, 10)
        lone.cancel()
        follower = asyncio.create_task(batcher.run(runtime, rows_of(2, seed=1), 2))
        await asyncio.sleep(0.05)
        assert runtime.calls == [1], "the model is still busy with the cancelled call: the next one must wait"
        runtime.gate.set()
        return await follower

    assert asyncio.run(scenario())["output"].shape == (2, 1)
    assert runtime.calls == [1, 2]


def test_batching_off_still_bounds_the_queue(executor, runtime):
    async def scenario():
        batcher = make_batcher(executor, enabled=False, max_batch_size=4, max_queued_rows=4)
        runtime.gate.clear()
        held = asyncio.create_task(batcher.run(runtime, rows_of(4, seed=0), 4))
        await asyncio.to_thread(runtime.started.wait, 10)
        with pytest.raises(OverloadedError, match=r"queue is full \(4 of 4 rows queued\)"):
            await batcher.run(runtime, rows_of(1, seed=1), 1)
        runtime.gate.set()
        return await held

    assert asyncio.run(scenario())["output"].shape == (4, 1)


def test_a_lone_caller_sending_split_requests_never_waits(executor, runtime):
    clock = ManualClock()  # stands still: any wait would end only at the lull, after its real-time timer

    async def scenario():
        batcher = make_batcher(executor, clock=clock, max_batch_size=8, batch_timeout=1000, policy="cost")
        for _ in range(3):
            await asyncio.wait_for(batcher.run(runtime, rows_of(20, seed=0), 20), 10)  # three chunks, one caller
            await asyncio.wait_for(batcher.run(runtime, rows_of(1, seed=1), 1), 10)

    asyncio.run(scenario())
    assert runtime.calls.count(1) == 3


def test_a_lone_request_that_expires_waiting_for_a_thread_never_reaches_the_model(runtime):
    clock = ManualClock()
    expired = sample("modelserver_rejected_requests_total", reason="deadline")

    async def scenario(one_thread):
        busy = make_batcher(one_thread, clock=clock, enabled=False)
        lone = make_batcher(one_thread, clock=clock)
        runtime.gate.clear()
        holder = asyncio.create_task(busy.run(runtime, rows_of(1, seed=0), 1))
        await asyncio.to_thread(runtime.started.wait, 10)
        late = asyncio.create_task(lone.run(runtime, rows_of(2, seed=1), 2, deadline=clock.now + 5))
        await settle()
        clock.now += 10  # it expires while the only thread is busy
        runtime.gate.set()
        await holder
        with pytest.raises(DeadlineExpiredError):
            await late

    with ThreadPoolExecutor(1) as one_thread:
        asyncio.run(scenario(one_thread))
    assert runtime.calls == [1]
    assert sample("modelserver_rejected_requests_total", reason="deadline") - expired == 1


class WarmUpRecorder:
    """Only what Batcher.warm_up reads: a name, the input specs, whether it is batched, and warm_up(rows), recorded."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.name, self.inputs, self.batched = MODEL, runtime.inputs, runtime.batched
        self.signatures = {runtime.signature_name: self}
        self.warmed: list[int] = []

    def warm_up(self, rows: int) -> None:
        self.warmed.append(rows)


@pytest.mark.parametrize(
    ("settings", "sizes"),
    [
        ({"max_batch_size": 64}, [1, 2, 4, 8, 16, 32, 64]),
        ({"max_batch_size": 32, "allowed_batch_sizes": (1, 8, 32)}, [1, 8, 32]),
        ({"enabled": False}, [1]),  # unbatched: every request is its own shape; only one warm-up call
    ],
)
def test_warm_up_runs_and_logs_every_allowed_batch_size(executor, real_runtime, caplog, settings, sizes):
    """The log line the server test reads (test_api) says exactly which sizes were run."""
    recorder = WarmUpRecorder(real_runtime)
    with caplog.at_level("INFO", logger="server.batching.batcher"):
        make_batcher(executor, **settings).warm_up(recorder)
    assert recorder.warmed == sizes
    assert f"warmed up {MODEL} at batch sizes {', '.join(map(str, sizes))}" in caplog.messages


def test_an_unbatched_request_cancelled_while_waiting_for_a_thread_is_counted(runtime):
    cancelled = sample("modelserver_rejected_requests_total", reason="cancelled")

    async def scenario(one_thread):
        busy = make_batcher(one_thread, enabled=False)
        runtime.gate.clear()
        try:
            holder = asyncio.create_task(busy.run(runtime, rows_of(1, seed=0), 1))
            assert await asyncio.to_thread(runtime.started.wait, 10)
            waiting = asyncio.create_task(busy.run(runtime, rows_of(2, seed=1), 2))
            await settle()
            waiting.cancel()
            await settle()
        finally:
            runtime.gate.set()
        await asyncio.wait_for(holder, 30)

    with ThreadPoolExecutor(1) as one_thread:
        asyncio.run(scenario(one_thread))
    assert runtime.calls == [1]  # the cancelled request never reached the model
    assert sample("modelserver_rejected_requests_total", reason="cancelled") - cancelled == 1


def test_a_lone_request_cancelled_while_waiting_for_a_thread_never_runs_and_is_counted(runtime):
    cancelled = sample("modelserver_rejected_requests_total", reason="cancelled")
    release = threading.Event()

    async def scenario(one_thread):
        batcher = make_batcher(one_thread, max_batch_size=8, batch_timeout=1000, policy="cost")
        one_thread.submit(release.wait, 30)  # the only thread is busy elsewhere (another model's call)
        try:
            lone = asyncio.create_task(batcher.run(runtime, rows_of(1, seed=0), 1))  # idle model: the fast path
            await settle()
            lone.cancel()
            await settle()
        finally:
            release.set()
        with pytest.raises(asyncio.CancelledError):
            await lone

    with ThreadPoolExecutor(1) as one_thread:
        asyncio.run(scenario(one_thread))
    assert runtime.calls == []  # the cancelled request never reached the model
    assert sample("modelserver_rejected_requests_total", reason="cancelled") - cancelled == 1


def test_every_model_call_goes_through_one_path_and_counts_why_it_ran(executor, runtime):
    """Lone, full, waited-out and unbatched calls alike: each is one model call, counted under its reason, and its
    rows come back to their callers."""
    reasons = ("idle", "full", "waited", "unbatched")
    before = {r: sample("modelserver_batches_total", reason=r) for r in reasons}

    async def scenario():
        cost = make_batcher(executor, max_batch_size=4, batch_timeout=1000, max_batches_in_flight=1)
        await cost.run(runtime, rows_of(1, seed=0), 1)  # idle model, lone caller: runs at once
        runtime.gate.clear()
        runtime.started.clear()
        held = asyncio.create_task(cost.run(runtime, rows_of(1, seed=1), 1))
        assert await asyncio.to_thread(runtime.started.wait, 10)
        queued = [asyncio.create_task(cost.run(runtime, rows_of(1, seed=i), 1)) for i in range(2, 6)]
        await settle()
        runtime.gate.set()  # the slot frees with 4 rows queued: a full batch
        await asyncio.wait_for(asyncio.gather(held, *queued), 30)
        fixed = make_batcher(executor, max_batch_size=64, batch_timeout=0.001, policy="fixed")
        await asyncio.wait_for(fixed.run(runtime, rows_of(3, seed=6), 3), 30)  # waits out the window
        off = make_batcher(executor, enabled=False)
        await asyncio.wait_for(off.run(runtime, rows_of(2, seed=7), 2), 30)

    asyncio.run(scenario())
    assert runtime.calls == [1, 1, 4, 4, 2]
    assert {r: sample("modelserver_batches_total", reason=r) - before[r] for r in reasons} == {
        "idle": 2,
        "full": 1,
        "waited": 1,
        "unbatched": 1,
    }


def test_the_cost_policy_waits_for_rows_it_expects_and_never_past_a_deadline(executor, runtime):
    """With calls measured at 10 ms and rows arriving every 0.1 ms, a free slot waits for the rows expected (on a
    manual clock that only the test moves); it runs once arrivals stop, and a queued deadline cuts the wait short."""
    clock = ManualClock()
    waited, deadline = (sample("modelserver_batches_total", reason=r) for r in ("waited", "deadline"))

    async def scenario():
        batcher = make_batcher(executor, clock=clock, max_batch_size=64, batch_timeout=1.0)
        await batcher.run(runtime, rows_of(1, seed=0), 1)
        cost = batcher.cost_model(runtime)
        cost.by_size.clear()
        cost.observe(1, 0.010)  # one call: 10 ms
        burst = []
        for i in range(3):
            clock.now += 0.0001
            burst.append(asyncio.create_task(batcher.run(runtime, rows_of(1, seed=10 + i), 1)))
            await settle()
        await asyncio.sleep(0.05)
        assert runtime.calls == [1], "100 rows are expected within one call: three must wait for them"
        clock.now += 0.001  # no row for ten mean gaps: arrivals stopped
        await asyncio.wait_for(asyncio.gather(*burst), 10)
        assert runtime.calls == [1, 4]
        cost.by_size.clear()
        cost.observe(1, 0.010)
        first_deadline = clock.now + 0.0001 + 0.0105
        for i in range(3):
            clock.now += 0.0001
            burst[i] = asyncio.create_task(
                batcher.run(runtime, rows_of(1, seed=20 + i), 1, deadline=clock.now + 0.0105)
            )
            await settle()
        await asyncio.sleep(0.05)
        assert runtime.calls == [1, 4]
        clock.now = first_deadline - 0.010  # the first deadline less one call's 10 ms: no later start meets it
        await asyncio.wait_for(asyncio.gather(*burst), 10)

    asyncio.run(scenario())
    assert runtime.calls == [1, 4, 4]
    assert sample("modelserver_batches_total", reason="waited") - waited == 1
    assert sample("modelserver_batches_total", reason="deadline") - deadline == 1


def test_admission_back_off_hint_comes_from_the_cost_model(executor, runtime):
    """A refusal by admission control says how long to back off: the calls beyond the limit times what one call
    costs now (its share of a full batch plus its request work), from the batcher's cost model; a fixed guess only
    before any model call has been timed."""

    async def scenario():
        batcher = make_batcher(executor, max_batch_size=64)
        admission = AdmissionControl(100, seconds_per_call=batcher.seconds_per_call)
        admission.outstanding = 300
        with pytest.raises(OverloadedError, match="about 100 ms"):
            admission.check(admitted=20)  # nothing measured yet
        await batcher.run(runtime, rows_of(1, seed=0), 1)
        cost = batcher.cost_model(runtime)
        cost.by_size.clear()
        cost.observe(64, 0.064)  # a full batch: 1 ms per row
        cost.per_request = 0.0002
        assert batcher.seconds_per_call() == pytest.approx(0.0012)
        with pytest.raises(OverloadedError, match=r"300 requests are outstanding \(limit 100\).*about 240 ms"):
            admission.check(admitted=20)  # 200 calls beyond the limit x 1.2 ms
        admission.check(admitted=10)  # fewer than keep_busy admitted: the models must not starve

    asyncio.run(scenario())
