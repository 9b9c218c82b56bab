"""--workers N (server/workers/supervisor.py) without a server: the setting, the port reserved for the workers,
and the supervisor's scrape of metrics files being created.
tests/integration/test_workers.py runs the workers."""

from __future__ import annotations

import os
import socket

import pytest
from prometheus_client import generate_latest

from harness.server import sample_value
from server.settings import parse_settings
from server.workers.metrics import supervisor_registry
from server.workers.supervisor import reserve_port, worker_count


def test_workers_setting_is_validated_and_zero_means_one_per_core():
    assert parse_settings([], environ={}).workers == 1
    assert parse_settings([], environ={"MODELSERVER_WORKERS": "3"}).workers == 3
    with pytest.raises(SystemExit):
        parse_settings(["--workers", "-1"], environ={})
    assert worker_count(0) == len(os.sched_getaffinity(0)) and worker_count(3) == 3


def test_the_port_is_reserved_for_the_workers_and_a_port_in_use_is_an_error():
    with reserve_port("127.0.0.1", 0) as port:
        assert port > 0
        worker = socket.socket()  # a worker binds the same port with SO_REUSEPORT, as gRPC does
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", port))
        worker.close()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError), reserve_port("127.0.0.1", other.getsockname()[1]):
            pass


def test_a_metrics_file_being_created_does_not_fail_the_scrape(tmp_path):
    """A worker creates each metrics file empty and sizes it just after; a scrape in between skips it (it failed
    with HTTP 500 before, about once in 20 starts of two workers on a busy machine)."""
    (tmp_path / "counter_4242.db").touch()
    (tmp_path / "gauge_livesum_4242.db").touch()
    text = generate_latest(supervisor_registry(tmp_path, dict, lambda: {0: 4242}, lambda: 0)).decode()
    assert sample_value(text, "modelserver_worker_requests_total", worker="0") == 0
    assert sample_value(text, "modelserver_workers") == 0
