"""The load-test tool against a real server: counts add up on both sides, errors are classified by status code, over
gRPC and over the HTTP port (the REST protocols against `modelserver_requests_total{transport="http"}`).
tests/unit/test_loadtest.py tests what needs no server.

Nothing here asserts on timing; the runs are a few dozen requests so that they stay short on 2 cores.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients.client import TYPED_MODELS
from clients.loadtest import CLIENT_OVERLOAD, LoadTestConfig, LoadTestResult, run_loadtest
from harness.server import REPO_ROOT, ServerProcess
from tests.helpers.loadtest import assert_consistent


def served(server: ServerProcess, model: str, code: str = "OK") -> float:
    return server.metric(
        "modelserver_requests_total", model=model, method=f"typed.{TYPED_MODELS[model].method}", code=code
    )


def run(server: ServerProcess, model: str, **settings: object) -> LoadTestResult:
    return asyncio.run(run_loadtest(LoadTestConfig(target=server.target, model=model, **settings)))


def test_closed_loop_count_matches_the_servers_counter(server: ServerProcess) -> None:
    before = served(server, "multi_input")
    result = run(server, "multi_input", concurrency=4, requests=30, rows_per_request=3)
    assert (result.mode, result.requests, result.ok, result.errors) == ("closed", 30, 30, {})
    assert served(server, "multi_input") - before == 30
    assert_consistent(result)


def test_closed_loop_over_several_channels(server: ServerProcess) -> None:
    before = served(server, "shared_layer")
    result = run(server, "shared_layer", concurrency=4, requests=12, channels=2)
    assert (result.requests, result.ok, result.errors) == (12, 12, {})
    assert served(server, "shared_layer") - before == 12


def test_closed_loop_by_duration_stops_and_counts_in_flight_requests(server: ServerProcess) -> None:
    before = served(server, "shared_layer")
    result = run(server, "shared_layer", concurrency=3, duration=0.3)
    assert result.requests >= 3 and result.ok == result.requests and result.errors == {}
    assert served(server, "shared_layer") - before == result.ok
    assert_consistent(result)


def test_errors_are_counted_by_status_code(server: ServerProcess) -> None:
    before_ok, before_missing = served(server, "shared_layer"), served(server, "shared_layer", "NOT_FOUND")
    result = run(server, "shared_layer", concurrency=2, requests=10, version=999)
    assert (result.requests, result.ok, result.errors) == (10, 0, {"NOT_FOUND": 10})
    assert served(server, "shared_layer", "NOT_FOUND") - before_missing == 10
    assert served(server, "shared_layer") == before_ok
    assert result.throughput_rps == 0
    assert_consistent(result)


def test_warmup_requests_are_sent_but_not_counted(server: ServerProcess) -> None:
    before = served(server, "multi_input")
    result = run(server, "multi_input", concurrency=2, requests=10, warmup=0.2)
    assert (result.requests, result.ok) == (10, 10)
    assert served(server, "multi_input") - before >= 10 + 2  # each warm-up caller sent at least one
    assert_consistent(result)


def test_open_loop_by_count(server: ServerProcess) -> None:
    before = served(server, "residual_cnn")
    result = run(server, "residual_cnn", rate=200, requests=20, rows_per_request=2)
    assert (result.mode, result.requests, result.ok, result.errors) == ("open", 20, 20, {})
    assert served(server, "residual_cnn") - before == 20
    assert_consistent(result)


def test_open_loop_by_duration_sends_the_scheduled_number(server: ServerProcess) -> None:
    result = run(server, "multi_input", rate=40, duration=0.5)  # sends at 0, 25, ..., 475 ms
    assert (result.requests, result.ok) == (20, 20)
    assert_consistent(result)


def test_open_loop_counts_what_it_could_not_send(server: ServerProcess) -> None:
    before = served(server, "residual_cnn")
    result = run(server, "residual_cnn", rate=5000, requests=30, rows_per_request=8, max_outstanding=1)
    assert set(result.errors) <= {CLIENT_OVERLOAD}
    assert result.requests == 30 and result.ok >= 1  # the first one always goes out
    assert served(server, "residual_cnn") - before == result.ok
    assert_consistent(result)


def test_progress_is_written_to_the_given_stream(server: ServerProcess) -> None:
    stream = io.StringIO()
    run(server, "multi_input", concurrency=1, requests=3, progress=stream)
    assert "3 done" in stream.getvalue() and "0 errors" in stream.getvalue()


def test_cli_end_to_end(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    before = served(server, "multi_input")
    command = [sys.executable, "-m", "clients", "--target", server.target, "loadtest", "multi_input"]
    command += ["--concurrency", "2", "--requests", "20", "--json", str(out), "--no-progress"]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "p99" in completed.stdout and "throughput" in completed.stdout
    assert completed.stderr == ""  # --no-progress
    summary = json.loads(out.read_text())
    assert (summary["model"], summary["mode"], summary["concurrency"], summary["rate"]) == (
        "multi_input",
        "closed",
        2,
        None,
    )
    assert (summary["requests"], summary["ok"], summary["errors"], summary["rows_per_request"]) == (20, 20, {}, 1)
    assert set(summary["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
    assert summary["throughput_rps"] > 0 and summary["duration_s"] > 0
    assert served(server, "multi_input") - before == 20


# -- the REST protocols: the same counts on the HTTP port -------------------------------------------------------------

REST_METHODS = {"rest-oip-json": "oip.ModelInfer", "rest-oip-binary": "oip.ModelInfer", "rest-tfserving": "tfs.Predict"}


def served_http(server: ServerProcess, model: str, protocol: str, code: str = "OK") -> float:
    return server.metric(
        "modelserver_requests_total", model=model, method=REST_METHODS[protocol], code=code, transport="http"
    )


def run_rest(server: ServerProcess, model: str, protocol: str, **settings: object) -> LoadTestResult:
    config = LoadTestConfig(
        target=server.target, http_target=server.http_url, model=model, protocol=protocol, **settings
    )
    return asyncio.run(run_loadtest(config))


@pytest.mark.parametrize("protocol", sorted(REST_METHODS))
def test_rest_closed_loop_count_matches_the_servers_http_counter(server: ServerProcess, protocol: str) -> None:
    before = served_http(server, "multi_input", protocol)
    result = run_rest(server, "multi_input", protocol, concurrency=4, requests=30, rows_per_request=3)
    assert (result.mode, result.requests, result.ok, result.errors) == ("closed", 30, 30, {})
    assert (result.protocol, result.target) == (protocol, server.http_url)
    assert served_http(server, "multi_input", protocol) - before == 30
    assert_consistent(result)


@pytest.mark.parametrize("protocol", sorted(REST_METHODS))
def test_rest_open_loop_count_matches_the_servers_http_counter(server: ServerProcess, protocol: str) -> None:
    before = served_http(server, "residual_cnn", protocol)
    result = run_rest(server, "residual_cnn", protocol, rate=200, requests=20, rows_per_request=2)
    assert (result.mode, result.requests, result.ok, result.errors) == ("open", 20, 20, {})
    assert served_http(server, "residual_cnn", protocol) - before == 20
    assert_consistent(result)


@pytest.mark.parametrize("protocol", ["rest-oip-binary", "rest-tfserving"])
def test_rest_refusals_are_counted_by_code_on_both_sides(server: ServerProcess, protocol: str) -> None:
    """More rows than a request may carry (--max-queued-rows, 4096 by default): 400 on the wire, INVALID_ARGUMENT in
    both counts; nothing counted as served."""
    before_ok, before_invalid = (served_http(server, "shared_layer", protocol, c) for c in ("OK", "INVALID_ARGUMENT"))
    result = run_rest(server, "shared_layer", protocol, concurrency=2, requests=4, rows_per_request=4097)
    assert (result.requests, result.ok, result.errors) == (4, 0, {"INVALID_ARGUMENT": 4})
    assert served_http(server, "shared_layer", protocol, "INVALID_ARGUMENT") - before_invalid == 4
    assert served_http(server, "shared_layer", protocol) == before_ok
    assert_consistent(result)


def test_rest_cli_end_to_end(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    before = served_http(server, "shared_layer", "rest-oip-binary")
    command = [sys.executable, "-m", "clients", "--http-target", server.http_url, "loadtest", "shared_layer"]
    command += ["--protocol", "rest-oip-binary", "--concurrency", "2", "--requests", "20", "--json", str(out)]
    completed = subprocess.run(command + ["--no-progress"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(out.read_text())
    assert (summary["protocol"], summary["requests"], summary["ok"], summary["errors"]) == (
        "rest-oip-binary",
        20,
        20,
        {},
    )
    assert served_http(server, "shared_layer", "rest-oip-binary") - before == 20
