"""When queued rows run: a pure function of the queue's state, the model's measured cost and the clock.

The cost model: one model call of k rows takes a + b*k seconds, fitted online to the executor's own timings (one
moving average per padded size timed within the last STALE_SECONDS, then a least-squares line through them: sizes
timed under a past load, when every call looked dearer, leave it). The same model answers how long the work
queued now will take: the deadline check, the back-off hints of a full queue and of admission control, and the
cost shown in ModelConfig.

The policy ('cost'), for a model with a free batch slot and n rows queued, arriving at rate r rows/s, one call
costing a + b*k seconds and each request h seconds of the event loop's CPU (the interpreter both share):
- n >= max_batch_size, or n >= the measured size of most rows per second when a larger size measured worse
  (CostModel.best_size): run that many ("full").
- Waiting w seconds for r*w more rows: the interpreter does (n + r*w)*h of request work, one call (a + b*k) and
  sits idle w*(1 - r*h) (when arrivals do not keep it busy). Rows per interpreter-second,
  (n + r*w) / ((n + r*w)*h + a + b*(n + r*w) + w*(1 - r*h)), has a derivative in w whose sign is r*(a + n*h) - n
  (with b's terms cancelling), whatever w. So waiting pays exactly while r*(a + n*h) > n: while the rows expected
  to arrive outnumber those queued, counting the rows that arrive while the interpreter works on the queued
  ones. Otherwise it runs at once ("idle"). A lone caller never waits: its request work and its call run one
  after the other and its next request cannot come before its answer, so r <= 1 / (a + b + h) and
  r*(a + h) < 1. On an idle server r*h is small and waiting pays only for rows arriving within one call; as
  request work fills the interpreter (r*h near 1) every row expected pays.
- While it waits, it runs when the oldest row has waited batch_timeout, or arrivals stop (no row for two mean
  gaps) ("waited"), and never later than the earliest queued deadline less one call's time ("deadline").
Policy 'fixed' waits for a full batch or batch_timeout, whatever the cost (and still never past a deadline).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Weight of the newest timing of a padded size in its moving average.
TIMING_WEIGHT = 0.1
# A padded size not timed for this long leaves the fit: sizes a past load used (timed while the process was busy)
# must not keep a lone caller waiting for company after that load is gone.
STALE_SECONDS = 1.0
# The smallest batch size that CostModel.best_size may cap batches at.
MIN_CAPPED_SIZE = 16
# Arrivals the arrival rate is measured over, and a pause that starts the measure afresh.
ARRIVAL_WINDOW = 32
ARRIVAL_QUIET = 0.5
# Arrivals have stopped when no row came for this many mean gaps: a wait for more ends.
LULL_GAPS = 2.0


@dataclass
class CostModel:
    """Seconds of one model call as a + b*rows (rows padded), from the calls' measured durations."""

    a: float = 0.0
    b: float = 0.0
    by_size: dict[int, float] = field(default_factory=dict)
    timed_at: dict[int, float] = field(default_factory=dict)  # when each size was last timed (with `now`)
    # Seconds of the event loop's CPU per request (decoding, validating, queueing, answering): the server's
    # Python work that competes with model calls for the interpreter. Measured by the batcher.
    per_request: float = 0.0

    def seconds(self, rows: int) -> float:
        return self.a + self.b * rows

    def best_size(self, largest: int) -> int:
        """The measured batch size of most rows per second, when a larger measured size did worse (a model past its
        compute ceiling: the CNN runs 32-row batches faster per row than 64-row ones); else `largest`. Only sizes of
        MIN_CAPPED_SIZE rows or more count: smaller calls are all fixed cost, and one slow call of a small size (a held
        test call, a preempted thread) must not cap batches that are never measured again."""
        sizes = [rows for rows in self.by_size if rows >= MIN_CAPPED_SIZE]
        if not sizes:
            return largest
        best = max(sizes, key=lambda rows: rows / self.by_size[rows])
        return best if best < max(sizes) else largest

    def observe(self, rows: int, seconds: float, now: float | None = None) -> None:
        """One call of `rows` padded rows took `seconds`. With `now`, sizes last timed more than STALE_SECONDS
        before it are forgotten first: the model describes the load of the last second, not of any earlier one."""
        if now is not None:
            for size in [size for size, at in self.timed_at.items() if now - at > STALE_SECONDS]:
                del self.timed_at[size]
                self.by_size.pop(size, None)  # already gone where a caller cleared the timings
            self.timed_at[rows] = now
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


class ArrivalRate:
    """Rows per second arriving at one model's queue, over its last ARRIVAL_WINDOW arrivals (a window, not a moving
    average of gaps: bursts of lock-step callers and a lone caller's steady pace both read as their true mean)."""

    def __init__(self) -> None:
        self._window: deque[tuple[float, int]] = deque(maxlen=ARRIVAL_WINDOW)  # (time, rows arrived before it)
        self._rows = 0
        self.last = float("-inf")

    def arrived(self, now: float, rows: int) -> None:
        if self._window and now - self.last > ARRIVAL_QUIET:
            self._window.clear()  # a pause this long ends the window: the rate before it says nothing now
        self._window.append((now, self._rows))
        self._rows += rows
        self.last = now

    @property
    def rows_per_second(self) -> float:
        if len(self._window) < 2:
            return 0.0
        (first, rows_before), (last, rows_at_last) = self._window[0], self._window[-1]
        return 0.0 if last == first else (rows_at_last - rows_before) / (last - first)


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
    rows: int = 0  # when it runs: the most rows the batch takes


WAIT_FOR_EVENT = Decision(False)


def decide(state: QueueState, cost: CostModel, now: float, limits: Limits) -> Decision:
    """Run a batch now, or wait (until `wake`, or until something arrives or finishes)."""
    if state.rows == 0 or state.running >= limits.slots:
        return WAIT_FOR_EVENT
    size = limits.max_batch_size if limits.fixed else cost.best_size(limits.max_batch_size)
    if state.rows >= size:
        return Decision(True, "full", rows=size)
    latest_start = (
        float("inf") if state.earliest_deadline is None else state.earliest_deadline - cost.seconds(state.rows)
    )
    if now >= latest_start:
        return Decision(True, "deadline", rows=size)
    if not limits.fixed and state.rate * (cost.a + state.rows * cost.per_request) <= state.rows:
        return Decision(True, "idle", rows=size)
    window_end = state.oldest + limits.batch_timeout
    if not limits.fixed and state.rate > 0:
        window_end = min(window_end, state.last_arrival + LULL_GAPS / state.rate)
    if now >= window_end:
        return Decision(True, "waited", rows=size)
    return Decision(False, wake=min(window_end, latest_start))
