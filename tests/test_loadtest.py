"""The load-test tool against a real server: counts add up on both sides, errors are classified by status code.

Nothing here asserts on timing; the runs are a few dozen requests so that they stay short on 2 cores.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clients.cli import main as cli_main
from clients.client import TYPED_MODELS
from clients.loadtest import CLIENT_OVERLOAD, LoadTestConfig, LoadTestResult, build_request, run_loadtest
from tests.helpers.server import REPO_ROOT, ServerProcess


def served(server: ServerProcess, model: str, code: str = "OK") -> float:
    return server.metric("modelserver_requests_total", model=model, method=TYPED_MODELS[model].method, code=code)


def run(server: ServerProcess, model: str, **settings: object) -> LoadTestResult:
    return asyncio.run(run_loadtest(LoadTestConfig(target=server.target, model=model, **settings)))


def assert_consistent(result: LoadTestResult) -> None:
    assert result.ok + sum(result.errors.values()) == result.requests
    if result.ok:
        lat = result.latency_ms
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert result.rows_per_s == pytest.approx(result.throughput_rps * result.rows_per_request)
    else:
        assert all(value is None for value in result.latency_ms.values())
    # Latency per status code: every sent call under its code (calls not sent have none), OK included from the send.
    sent = {code for code in result.errors if code != CLIENT_OVERLOAD}
    assert set(result.error_latency_ms_by_code) == sent
    assert set(result.latency_from_send_ms_by_code) == sent | ({"OK"} if result.ok else set())
    if result.mode == "open":
        assert result.send_lag_ms["p50"] is not None and result.send_lag_ms["p50"] >= 0
    else:
        assert all(value is None for value in result.send_lag_ms.values())


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


def test_a_silent_server_hits_the_deadline_and_the_open_loop_cap() -> None:
    """A socket that never answers: the calls in flight end at their deadline, the rest are not sent. All ten are
    due within 10 ms, long before the first two calls' 3 s deadline frees a slot."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        config = LoadTestConfig(
            target=target, model="multi_input", rate=1000, requests=10, max_outstanding=2, timeout=3
        )
        result = asyncio.run(run_loadtest(config))
    assert result.ok == 0 and result.requests == 10
    assert result.errors[CLIENT_OVERLOAD] == 8
    assert set(result.errors) <= {CLIENT_OVERLOAD, "DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert_consistent(result)
    # The two calls sent ended at their deadline, not before: timed from their send, per code.
    ended = result.latency_from_send_ms_by_code.get("DEADLINE_EXCEEDED")
    assert ended is None or ended["p50"] >= 2900, ended


def test_progress_is_written_to_the_given_stream(server: ServerProcess) -> None:
    stream = io.StringIO()
    run(server, "multi_input", concurrency=1, requests=3, progress=stream)
    assert "3 done" in stream.getvalue() and "0 errors" in stream.getvalue()


def test_request_is_built_once_with_the_models_shapes() -> None:
    request = build_request("residual_cnn", rows=3, version=2, seed=7)
    assert len(request.image) == 3 * 28 * 28 and request.version == 2
    assert build_request("residual_cnn", 3, 2, 7) == request  # seeded: the same rows every run
    request = build_request("multi_input", rows=4)
    assert (len(request.input_a), len(request.input_b)) == (40, 80)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"concurrency": 2},
        {"requests": 2},
        {"concurrency": 2, "rate": 5.0, "requests": 2},
        {"concurrency": 2, "requests": 2, "duration": 1.0},
        {"concurrency": 0, "requests": 2},
        {"rate": -1.0, "requests": 2},
        {"concurrency": 2, "requests": 2, "rows_per_request": 0},
        {"concurrency": 2, "requests": 2, "warmup": -1.0},
    ],
)
def test_bad_settings_are_refused(settings: dict) -> None:
    with pytest.raises(ValueError):
        LoadTestConfig(target="127.0.0.1:1", model="multi_input", **settings)


def test_unknown_model_is_refused() -> None:
    with pytest.raises(ValueError, match="model must be one of"):
        LoadTestConfig(target="127.0.0.1:1", model="nope", concurrency=1, requests=1)


@pytest.mark.parametrize(
    "argv",
    [
        ["loadtest", "multi_input", "--concurrency", "2"],
        ["loadtest", "multi_input", "--requests", "2"],
        ["loadtest", "multi_input", "--concurrency", "2", "--rate", "5", "--requests", "2"],
        ["loadtest", "unknown_model", "--concurrency", "2", "--requests", "2"],
        ["loadtest", "multi_input", "--concurrency", "two", "--requests", "2"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2


def test_cli_bad_values_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["loadtest", "multi_input", "--concurrency", "0", "--requests", "2"]) == 2
    assert "concurrency must be > 0" in capsys.readouterr().err


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
