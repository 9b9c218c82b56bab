"""The batching policy as a pure function of (queue state, cost model, clock): no server, no threads, no sleeping.
A manual clock is just the `now` passed in; closed-loop callers are simulated event by event against the cost
model, so "throughput" here is the policy's modelled throughput, never a timing of this machine."""

from __future__ import annotations

import heapq

import pytest

from server.batching.policy import STALE_SECONDS, ArrivalRate, CostModel, Limits, QueueState, decide

LIMITS = Limits(max_batch_size=64, batch_timeout=0.01, slots=2)


def cost_model(a: float = 0.0005, b: float = 0.00001) -> CostModel:
    cost = CostModel()
    for rows in (1, 8, 64):
        cost.observe(rows, a + b * rows)
    return cost


def state(rows: int, now: float, rate: float, running: int = 0, deadline: float | None = None) -> QueueState:
    return QueueState(rows=rows, oldest=now, earliest_deadline=deadline, running=running, rate=rate, last_arrival=now)


def test_the_cost_model_fits_a_line_through_the_measured_sizes_and_follows_changes():
    cost = cost_model(0.0005, 0.00001)
    assert cost.a == pytest.approx(0.0005) and cost.b == pytest.approx(0.00001)
    assert cost.seconds(32) == pytest.approx(0.0005 + 32 * 0.00001)
    for _ in range(50):  # the machine got slower: every size now takes twice as long
        for rows in (1, 8, 64):
            cost.observe(rows, 2 * (0.0005 + 0.00001 * rows))
    assert cost.a == pytest.approx(0.001, rel=0.02) and cost.b == pytest.approx(0.00002, rel=0.02)
    single = CostModel()
    single.observe(1, 0.003)
    assert (single.a, single.b) == (0.003, 0.0)


def test_the_arrival_rate_follows_the_gaps_between_rows():
    rate = ArrivalRate()
    assert rate.rows_per_second == 0.0  # nothing known: no row is expected
    for i in range(100):
        rate.arrived(i * 0.001, 2)
    assert rate.rows_per_second == pytest.approx(2000)
    for cycle in range(10):  # lock-step callers: bursts of 8 rows 0.1 ms apart, every 4 ms
        for i in range(8):
            rate.arrived(1.0 + cycle * 0.004 + i * 0.0001, 1)
    assert 1500 < rate.rows_per_second < 2500
    rate.arrived(2.0, 1)  # a second of silence: the rate is unknown again
    assert rate.rows_per_second == 0.0


@pytest.mark.parametrize("fixed", [False, True])
def test_a_full_batch_never_waits(fixed):
    limits = Limits(64, 1000.0, 2, fixed=fixed)
    for rate in (0.0, 1e3, 1e6, 1e9):
        decision = decide(state(64, 5.0, rate), cost_model(), 5.0, limits)
        assert decision.run and decision.reason == "full"


def test_a_lone_request_never_waits():
    """A lone caller cannot send its next request before its last one's call is over: its rate is at most one row
    per call time, whatever that time is."""
    for a, b, h in ((0.0001, 0.0, 0.0), (0.0005, 0.00001, 0.0004), (0.01, 0.001, 0.0001), (2.0, 0.0, 0.5)):
        cost = cost_model(a, b)
        cost.per_request = h
        fastest = 1 / (cost.seconds(1) + h)  # one row per call and per request handled, nothing else
        for rate in (0.0, 0.1 * fastest, 0.5 * fastest, fastest):
            decision = decide(state(1, 7.0, rate), cost, 7.0, Limits(64, 1000.0, 2))
            assert decision.run and decision.reason == "idle", (a, b, h, rate)


def test_a_lone_caller_after_a_heavy_load_never_waits():
    """Under load, calls are timed while the process is busy (and look several times dearer than they are). Once
    the load is gone, those timings must not make the lone caller that remains wait for company that never comes:
    sizes not timed for STALE_SECONDS leave the model, which then describes the calls being made now."""
    cost = CostModel()
    for i in range(200):  # a second of heavy load: big batches at 4 ms, small ones at 3 ms (a busy process)
        now = i * 0.005
        cost.observe(64, 0.004, now=now)
        cost.observe(16, 0.0035, now=now)
        cost.observe(1, 0.003, now=now)
    cost.per_request = 0.0004
    assert cost.a > 0.0025
    now = 1.0 + STALE_SECONDS + 0.5  # the load stopped; a lone caller's calls take 0.4 ms each
    for i in range(30):
        cost.observe(1, 0.0004, now=now + i * 0.001)
    assert set(cost.by_size) == {1} and cost.a == pytest.approx(0.0004, rel=0.1)
    lone_rate = 1 / (0.0004 + cost.per_request)  # its next request comes only after its answer
    decision = decide(state(1, now, lone_rate), cost, now, LIMITS)
    assert decision.run and decision.reason == "idle"
    without_forgetting = CostModel()  # the same timings without a clock: the load's sizes stay in the fit
    for size, seconds in ((64, 0.004), (16, 0.0035), (1, 0.0004)):
        without_forgetting.observe(size, seconds)
    without_forgetting.per_request = cost.per_request
    assert not decide(state(1, now, lone_rate), without_forgetting, now, LIMITS).run  # the tax this prevents


def test_waiting_only_while_the_rows_expected_within_one_call_outnumber_those_queued():
    cost = cost_model(0.001, 0.0)  # one call costs 1 ms whatever its rows
    busy = 8000.0  # rows/s: 8 rows arrive within one call's fixed cost
    assert decide(state(4, 0.0, busy), cost, 0.0, LIMITS).run is False
    assert decide(state(8, 0.0, busy), cost, 0.0, LIMITS).reason == "idle"
    # As request work fills the interpreter (0.1 ms per request at 8000 rows/s: 80 %), rows are worth more.
    cost.per_request = 0.0001
    assert decide(state(39, 0.0, busy), cost, 0.0, LIMITS).run is False
    assert decide(state(40, 0.0, busy), cost, 0.0, LIMITS).reason == "idle"
    waiting = decide(state(4, 0.0, busy), cost, 0.0, LIMITS)
    assert waiting.wake is not None and 0 < waiting.wake <= LIMITS.batch_timeout
    # No slot free: nothing runs, and the next completion (not a timer) decides again.
    assert decide(state(8, 0.0, busy, running=2), cost, 0.0, LIMITS).run is False


def test_a_wait_ends_at_the_timeout_or_when_arrivals_stop():
    cost = cost_model(0.001, 0.0)
    queued = QueueState(rows=4, oldest=0.0, earliest_deadline=None, running=0, rate=8000.0, last_arrival=0.0)
    wake = decide(queued, cost, 0.0, LIMITS).wake
    assert wake is not None
    assert decide(queued, cost, wake, LIMITS).reason == "waited"  # no row came for two mean gaps
    steady = QueueState(rows=4, oldest=0.0, earliest_deadline=None, running=0, rate=8000.0, last_arrival=0.0099)
    assert decide(steady, cost, 0.0099, LIMITS).run is False
    assert decide(steady, cost, LIMITS.batch_timeout, LIMITS).reason == "waited"  # never past batch_timeout


@pytest.mark.parametrize("fixed", [False, True])
def test_waiting_never_overruns_a_queued_deadline(fixed):
    """At every instant, either the batch runs, or the wake-up comes no later than the latest start that still
    meets the earliest deadline (the deadline less one call of the queued rows)."""
    limits = Limits(64, 1000.0, 2, fixed=fixed)
    cost = cost_model(0.002, 0.0001)
    deadline = 0.05
    latest_start = deadline - cost.seconds(3)
    now = 0.0
    while now < deadline:
        queued = QueueState(rows=3, oldest=0.0, earliest_deadline=deadline, running=0, rate=1e6, last_arrival=now)
        decision = decide(queued, cost, now, limits)
        if decision.run:
            assert now >= latest_start - 1e-12 or decision.reason != "deadline"
            break
        assert decision.wake is not None and decision.wake <= latest_start + 1e-12
        now = decision.wake
    assert decision.run and decision.reason == "deadline"
    assert now <= latest_start + 1e-12


def closed_loop(callers: int, cost: CostModel, limits: Limits, think: float = 0.0003, horizon: float = 1.0) -> float:
    """Rows/s that `callers` closed-loop callers of 1-row requests get, each sending its next request `think`
    seconds after its answer, with model calls taking what the cost model says. Event by event, on a manual clock:
    the policy decides at every arrival, completion and wake-up it asked for."""
    events: list[tuple[float, int, str, int]] = []  # (time, order, kind, rows)
    order = 0

    def at(time: float, kind: str, rows: int = 0) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (time, order, kind, rows))

    for i in range(callers):
        at(i * think / callers, "arrive", 1)
    queue: list[float] = []  # arrival times of queued rows
    rate = ArrivalRate()
    running = done = 0
    warm_up = horizon / 4
    while events:
        now, _, kind, rows = heapq.heappop(events)
        if now > horizon:
            break
        if kind == "arrive":
            queue.append(now)
            rate.arrived(now, 1)
        elif kind == "done":
            running -= 1
            done += rows if now >= warm_up else 0
            for _ in range(rows):
                at(now + think, "arrive", 1)
        while True:
            queued = QueueState(len(queue), queue[0] if queue else 0.0, None, running, rate.rows_per_second, rate.last)
            decision = decide(queued, cost, now, limits)
            if not decision.run:
                if decision.wake is not None:
                    at(decision.wake, "wake")
                break
            taken, queue = queue[: limits.max_batch_size], queue[limits.max_batch_size :]
            running += 1
            at(now + cost.seconds(len(taken)), "done", len(taken))
    return done / (horizon - warm_up)


@pytest.mark.parametrize(("a", "b"), [(0.0005, 0.00001), (0.001, 0.0), (0.0003, 0.00005)])
def test_more_callers_never_lower_the_modelled_throughput(a, b):
    cost = cost_model(a, b)
    throughputs = [closed_loop(c, cost, LIMITS) for c in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    for fewer, more in zip(throughputs, throughputs[1:], strict=False):
        assert more >= fewer * 0.99, throughputs
    # And batching pays: 256 callers get many times what one does.
    assert throughputs[-1] > 5 * throughputs[0], throughputs


def test_batches_stop_at_the_size_of_most_rows_per_second_once_a_larger_one_measured_worse():
    cost = CostModel()
    for rows, seconds in ((1, 0.001), (8, 0.002), (32, 0.004)):  # 8,000 rows/s at 32
        cost.observe(rows, seconds)
    assert decide(state(64, 0.0, 0.0), cost, 0.0, LIMITS).rows == 64  # larger sizes not measured yet: try them
    cost.observe(64, 0.010)  # 6,400 rows/s: past the ceiling
    decision = decide(state(64, 0.0, 0.0), cost, 0.0, LIMITS)
    assert decision.run and decision.reason == "full" and decision.rows == 32
    assert decide(state(64, 0.0, 0.0), cost, 0.0, Limits(64, 0.01, 2, fixed=True)).rows == 64
