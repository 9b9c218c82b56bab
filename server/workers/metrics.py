"""The supervisor's /metrics with --workers N: one scrape shows the whole server.

Each worker writes its metrics to prometheus_client's multiprocess files; MultiProcessCollector sums them
(gauges as their `multiprocess_mode` says). The process collectors only see their own process, so the
supervisor reports them summed over itself and every running worker, under the same names, and adds what only
it knows: how many workers run and how many requests each one answered (one HTTP/2 connection stays on one
worker, so an uneven spread shows here).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

# Bytes at the start of a metrics file that say how much of it is used: a shorter file is being created.
HEADER_BYTES = 8
# Family names (a counter's without _total) of the process collector's figures that add up across processes.
SUMMED = ("process_virtual_memory_bytes", "process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds")
COUNTERS = ("process_cpu_seconds",)


def _process_figures(pid: int) -> dict[str, float]:
    """The process collector's values for one process; empty when it has gone."""
    return {f.name: f.samples[0].value for f in ProcessCollector(pid=lambda: pid, registry=None).collect()}


class ServerProcesses(Collector):
    """Process figures summed over the supervisor and its running workers, and requests answered per worker.

    `running` gives the pids of the running workers by worker index; `started` every pid a worker ever had;
    `serving` how many workers have loaded their models (every worker serves once all have)."""

    def __init__(
        self,
        path: Path,
        running: Callable[[], Mapping[int, int]],
        started: Callable[[], Mapping[int, int]],
        serving: Callable[[], int],
        supervisor: Callable[[], int] = os.getpid,
    ):
        self._path = path
        self._running = running
        self._started = started
        self._serving = serving
        self._supervisor = supervisor

    def collect(self) -> Iterable[Metric]:
        running = dict(self._running())
        figures = [_process_figures(pid) for pid in (self._supervisor(), *running.values())]
        for name in SUMMED:
            family = CounterMetricFamily if name in COUNTERS else GaugeMetricFamily
            help_text = f"{name.removeprefix('process_')} summed over the supervisor and its running workers."
            yield family(name, help_text, value=sum(f.get(name, 0.0) for f in figures))
        own = figures[0]
        if "process_start_time_seconds" in own:
            yield GaugeMetricFamily(
                "process_start_time_seconds", "Start time of the supervisor since unix epoch in seconds.",
                value=own["process_start_time_seconds"],
            )  # fmt: skip
        if "process_max_fds" in own:
            yield GaugeMetricFamily("process_max_fds", "Maximum open file descriptors per process.",
                                    value=own["process_max_fds"])  # fmt: skip
        yield GaugeMetricFamily("modelserver_workers", "Worker processes running.", value=len(running))
        yield GaugeMetricFamily(
            "modelserver_workers_serving",
            "Workers that have loaded their models (the server serves once all have).",
            value=self._serving(),
        )
        per_worker = CounterMetricFamily(
            "modelserver_worker_requests",
            "RPCs answered by each worker (modelserver_requests_total of that worker alone).",
            labels=["worker"],
        )
        for index, pid in sorted(self._started().items()):
            per_worker.add_metric([str(index)], self._worker_requests(pid))
        yield per_worker

    def _worker_requests(self, pid: int) -> float:
        counters = self._path / f"counter_{pid}.db"
        if not _readable(counters):
            return 0.0
        return sum(
            s.value
            for metric in MultiProcessCollector.merge([str(counters)])  # type: ignore[no-untyped-call]  # unannotated
            if metric.name == "modelserver_requests"
            for s in metric.samples
            if s.name == "modelserver_requests_total"
        )


def _readable(path: Path) -> bool:
    """Whether a worker's metrics file can be read now. prometheus_client creates a file empty and sizes it just
    after; reading it in between raises (struct.error), which failed the whole scrape with HTTP 500 (seen about once
    in 20 starts of two workers on a busy machine: each worker creates a file when it first uses a kind of metric).
    Such a file holds nothing yet, so it is skipped."""
    try:
        return path.stat().st_size >= HEADER_BYTES
    except FileNotFoundError:  # removed by mark_process_dead since it was listed
        return False


class _WorkersCollector(MultiProcessCollector):
    """MultiProcessCollector, without the files that are being created at this instant (`_readable`)."""

    def __init__(self, registry: CollectorRegistry, path: Path) -> None:
        self._folder = path
        super().__init__(registry, path=str(path))  # type: ignore[no-untyped-call]  # unannotated

    def collect(self) -> Iterable[Metric]:
        files = [str(f) for f in self._folder.glob("*.db") if _readable(f)]
        metrics: Iterable[Metric] = self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]  # unannotated
        return metrics


def supervisor_registry(
    path: Path,
    running: Callable[[], Mapping[int, int]],
    started: Callable[[], Mapping[int, int]],
    serving: Callable[[], int],
    supervisor: Callable[[], int] = os.getpid,
) -> CollectorRegistry:
    """The registry of the whole server's /metrics (served by the supervisor, or by each worker on the REST port)."""
    registry = CollectorRegistry()
    _WorkersCollector(registry, path)
    registry.register(ServerProcesses(path, running, started, serving, supervisor))
    return registry


# The supervisor's table of its workers, in the metrics folder, for workers that serve /metrics themselves.
WORKERS_TABLE = "workers.json"


def write_workers_table(path: Path, running: Mapping[int, int], started: Mapping[int, int], serving: int) -> None:
    """Write what only the supervisor knows (atomically: a reader sees the whole table or the previous one)."""
    table = {"supervisor": os.getpid(), "running": running, "started": started, "serving": serving}
    staging = path / f".{WORKERS_TABLE}.tmp"
    staging.write_text(json.dumps(table))
    staging.replace(path / WORKERS_TABLE)


def worker_registry(path: Path) -> CollectorRegistry:
    """The whole server's /metrics as a worker serves it: every worker's metrics files, and the supervisor's table."""

    def table() -> dict[str, Any]:
        try:
            found: dict[str, Any] = json.loads((path / WORKERS_TABLE).read_text())
            return found
        except (FileNotFoundError, ValueError):
            return {"supervisor": os.getppid(), "running": {}, "started": {}, "serving": 0}

    def by_index(key: str) -> dict[int, int]:
        return {int(index): pid for index, pid in table()[key].items()}

    return supervisor_registry(
        path,
        lambda: by_index("running"),
        lambda: by_index("started"),
        lambda: int(table()["serving"]),
        lambda: int(table()["supervisor"]),
    )
