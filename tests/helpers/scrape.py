"""Reading a server's /metrics in tests: one scrape read by name and labels, and bounded waits on scrapes."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from harness.server import ServerProcess


class Metrics:
    """One scrape of the server's metrics, read by name and labels."""

    def __init__(self, server: ServerProcess) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(server.metrics_text())
            for sample in family.samples
        ]

    def __call__(self, name: str, **labels: str) -> float:
        """The samples with this name and labels, summed over the labels not given (such as `transport`)."""
        return sum(
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def requests(self, model: str, method: str, code: str) -> float:
        return self("modelserver_requests_total", model=model, method=method, code=code)

    def calls(self, model: str, method: str) -> float:
        """Every finished call, whatever its code."""
        return sum(
            value
            for name, labels, value in self.samples
            if name == "modelserver_requests_total" and labels.get("model") == model and labels.get("method") == method
        )

    def rejected(self, model: str, reason: str) -> float:
        return self("modelserver_rejected_requests_total", model=model, reason=reason)

    def in_flight(self, model: str) -> float:
        return self("modelserver_inflight_requests", model=model)


def wait_until(server: ServerProcess, condition: Callable[[Metrics], bool], what: str, timeout: float = 120) -> Metrics:
    """Scrape until `condition` holds (bounded); returns the scrape that satisfied it."""
    deadline = time.monotonic() + timeout
    while True:
        scrape = Metrics(server)
        if condition(scrape):
            return scrape
        assert server.process.poll() is None, f"the server exited:\n{server.log_text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
