"""Checks of a load-test result that hold whatever the run (tests/unit/test_loadtest.py and
tests/integration/test_loadtest.py)."""

from __future__ import annotations

import pytest

from clients.loadtest import CLIENT_OVERLOAD, LoadTestResult


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
