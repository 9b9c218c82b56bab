"""Triton's perf_analyzer, unmodified, completes short runs against our server (unary and --streaming).

The binary comes from the tritonclient 2.41.1 wheel, outside our venv (`make perf-analyzer`, which `make test`
tries first); without it this test is skipped and says so.
"""

from __future__ import annotations

import subprocess

import pytest

from bench import perf_analyzer

pytestmark = pytest.mark.skipif(
    not perf_analyzer.binary().is_file(), reason="perf_analyzer not installed: run `make perf-analyzer`"
)


@pytest.mark.parametrize("mode", [[], ["--streaming"]], ids=["unary", "streaming"])
def test_perf_analyzer_completes_a_short_run_without_errors(server, mode):
    method = "oip.ModelStreamInfer" if mode else "oip.ModelInfer"
    codes = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL", "UNAVAILABLE")
    before = {code: server.metric("modelserver_requests_total", model="residual_cnn", method=method, code=code)
              for code in codes}  # fmt: skip
    run = subprocess.run(
        [str(perf_analyzer.binary()), "-m", "residual_cnn", "-i", "grpc", "-u", server.target, "-b", "2",
         "--concurrency-range", "2", "--measurement-interval", "500", "--stability-percentage", "1000",
         "--max-trials", "3", "--input-data", "zero", *mode],
        env=perf_analyzer.environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "error" not in (run.stdout + run.stderr).lower()
    assert "Server:" in run.stdout and "Inferences/Second vs. Client Average Batch Latency" in run.stdout
    after = {code: server.metric("modelserver_requests_total", model="residual_cnn", method=method, code=code)
             for code in codes}  # fmt: skip
    assert after["OK"] > before["OK"]
    assert {code: after[code] - before[code] for code in codes[1:]} == dict.fromkeys(codes[1:], 0)
