"""The load-test tool without a server: its settings and requests, its command line's usage errors, and a socket
that never answers. tests/integration/test_loadtest.py runs it against a real server.

Nothing here asserts on timing.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from clients.cli import main as cli_main
from clients.loadtest import CLIENT_OVERLOAD, LoadTestConfig, build_request, run_loadtest
from tests.helpers.loadtest import assert_consistent


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
