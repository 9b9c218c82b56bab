"""When queued rows run: a pure function of the queue's state, the model's measured cost and the clock.

The cost model: one model call of k rows takes a + b*k seconds, fitted online to the executor's own timings (one
moving average per padded size, then a least-squares line through them). The same model answers how long the work
queued now will take: the admission wait estimate and the back-off hint of a full queue.

The policy ('cost'), for a model with a free batch slot and n rows queued, arriving at rate r rows/s:
- n >= max_batch_size: run ("full").
- Waiting w seconds for r*w more rows makes this slot's throughput (n + r*w) / (w + a + b*(n + r*w)), whose
  derivative in w has the sign of r*a - n, whatever w. So waiting pays exactly while r*a > n: while the rows
  expected to arrive within one call's fixed cost outnumber those queued. Otherwise run at once ("idle"): a lone
  caller never waits, since it cannot arrive faster than one call (r <= 1 / (a + b) < 1 / a).
- While it waits, it runs when the oldest row has waited batch_timeout, or arrivals stop (no row for two mean
  gaps) ("waited"), and never later than the earliest queued deadline less one call's time ("deadline").
Policy 'fixed' waits for a full batch or batch_timeout, whatever the cost (and still never past a deadline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Weight of the newest timing of a padded size in its moving average.
TIMING_WEIGHT = 0.2
# Weight of the newest arrival gap in the mean gap per row (see ArrivalRate).
ARRIVAL_WEIGHT = 0.2
# Arrivals have stopped when no row came for this many mean gaps: a wait for more ends.
LULL_GAPS = 2.0


@dataclass
class CostModel:
    """Seconds of one model call as a + b*rows (rows padded), from the calls' measured durations."""

    a: float = 0.0
    b: float = 0.0
    by_size: dict[int, float] = field(default_factory=dict)

    def seconds(self, rows: int) -> float:
        return self.a + self.b * rows

    def observe(self, rows: int, seconds: float) -> None:
        old = self.by_size.get(rows)
        self.by_size[rows] = seconds if old is None else old + TIMING_WEIGHT * (seconds - old)
        self._fit()

    def _fit(self) -> None:
        points = self.by_size
        if len(points) == 1:
            ((rows, seconds),) = points.items()
            self.a, self.b = seconds, 0.0
            return
        n = len(points)
        mean_x = sum(points) / n
        mean_y = sum(points.values()) / n
        sxx = sum((x - mean_x) ** 2 for x in points)
        b = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in points.items()) / sxx)
        a = mean_y - b * mean_x
        if a < 0:  # cost falls to zero rows: keep a line through the smallest size's time instead
            x0 = min(points)
            a, b = 0.0, points[x0] / x0
        self.a, self.b = a, b

    def drain_seconds(self, rows: int, calls: int, max_batch_size: int, slots: int) -> float:
        """Seconds until `rows` queued rows (or `calls` model calls, when rows cannot be joined) have run."""
        if rows == 0 and calls == 0:
            return 0.0
        if calls:
            waves = -(-calls // slots)
            return waves * self.seconds(max(1, rows // calls))
        full, rest = divmod(rows, max_batch_size)
        waves = -(-(full + (1 if rest else 0)) // slots)
        return (waves - 1) * self.seconds(max_batch_size) + self.seconds(rest or max_batch_size)


@dataclass
class ArrivalRate:
    """Rows per second arriving at one model's queue: the mean gap per row, a moving average over arrivals."""

    gap: float = float("inf")  # mean seconds per row
    last: float = float("-inf")

    def arrived(self, now: float, rows: int) -> None:
        if self.last != float("-inf"):
            sample = (now - self.last) / rows
            self.gap = sample if self.gap == float("inf") else self.gap + ARRIVAL_WEIGHT * (sample - self.gap)
        self.last = now

    @property
    def rows_per_second(self) -> float:
        return 0.0 if self.gap in (0.0, float("inf")) else 1.0 / self.gap


@dataclass(frozen=True)
class QueueState:
    rows: int  # queued, not yet running
    oldest: float  # when the oldest queued row arrived
    earliest_deadline: float | None  # the earliest deadline among queued rows
    running: int  # batches in flight
    rate: float  # rows per second arriving
    last_arrival: float


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    batch_timeout: float
    slots: int  # max_batches_in_flight
    fixed: bool = False


@dataclass(frozen=True)
class Decision:
    run: bool
    reason: str = ""  # full, idle, waited or deadline, when it runs
    wake: float | None = None  # when it waits: decide again then (None: on the next arrival or completion)


WAIT_FOR_EVENT = Decision(False)


def decide(state: QueueState, cost: CostModel, now: float, limits: Limits) -> Decision:
    """Run a batch now, or wait (until `wake`, or until something arrives or finishes)."""
    if state.rows == 0 or state.running >= limits.slots:
        return WAIT_FOR_EVENT
    if state.rows >= limits.max_batch_size:
        return Decision(True, "full")
    latest_start = (
        float("inf") if state.earliest_deadline is None else state.earliest_deadline - cost.seconds(state.rows)
    )
    if now >= latest_start:
        return Decision(True, "deadline")
    if not limits.fixed:
        expected = state.rate * cost.a  # rows arriving within one call's fixed cost
        if expected <= state.rows:
            return Decision(True, "idle")
    window_end = state.oldest + limits.batch_timeout
    if not limits.fixed:
        window_end = min(window_end, state.last_arrival + LULL_GAPS / state.rate)
    if now >= window_end:
        return Decision(True, "waited")
    return Decision(False, wake=min(window_end, latest_start))
