"""A real Prometheus (Debian's) scraping a real server with deploy/prometheus/prometheus.yml adapted to loopback,
and every query of the Grafana dashboard run against it after real traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.loadtest import LoadTestConfig, run_loadtest
from harness.deploy_native import DASHBOARD, PrometheusProcess, prometheus_config_for_loopback, wait_until
from harness.server import REPO_ROOT, ServerProcess

# Grafana's variables as one replica's dashboard would resolve them; the model is the one the traffic used.
VARIABLES = {"$model": "multi_input", "$instance": ".*", "$__rate_interval": "1m"}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _resolve(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusProcess]:
    """Prometheus scraping the session's server, after concurrent traffic (batches) and a few invalid calls."""
    config = prometheus_config_for_loopback([f"127.0.0.1:{server.metrics_port}"])
    process = PrometheusProcess(tmp_path_factory.mktemp("prometheus"), config)
    try:
        wait_until(lambda: process.query('up{job="modelserver"} == 1'), 60, "the server's target to be up")
        # A counter's series starts at its first value: make the series exist in Prometheus first, so that the
        # load below shows as an increase.
        first = asyncio.run(
            run_loadtest(LoadTestConfig(target=server.target, model="multi_input", concurrency=1, requests=20))
        )
        assert first.ok == 20, first.errors
        wait_until(lambda: process.query('modelserver_batch_size_rows_count{model="multi_input"}'), 60, "series")
        load = LoadTestConfig(target=server.target, model="multi_input", concurrency=16, duration=4)
        result = asyncio.run(run_loadtest(load))
        assert result.ok > 0 and result.errors == {}, result.errors
        # Scrapes after the traffic give rate() its increase.
        wait_until(
            lambda: process.query('sum(rate(modelserver_requests_total{model="multi_input", code="OK"}[1m])) > 0'),
            60,
            "the traffic to show up in rate()",
        )
        yield process
    finally:
        process.stop()


def test_the_server_target_is_up(prometheus: PrometheusProcess, server: ServerProcess) -> None:
    targets = prometheus.api("targets")["activeTargets"]
    ours = [t for t in targets if t["labels"]["job"] == "modelserver"]
    assert [(t["labels"]["instance"], t["health"]) for t in ours] == [(f"127.0.0.1:{server.metrics_port}", "up")]
    assert ours[0]["labels"]["service"] == "modelserver"  # the relabelling of the shipped config


def test_every_dashboard_query_runs(prometheus: PrometheusProcess) -> None:
    queries = [(p["title"], t["expr"]) for p in _panels() for t in p["targets"]]
    assert len(queries) >= 15
    now = time.time()
    for title, expr in queries:
        try:  # each raises with Prometheus' own error message on a bad query
            prometheus.query(_resolve(expr))
            prometheus.api("query_range", query=_resolve(expr), start=str(now - 120), end=str(now), step="5")
        except AssertionError as error:
            raise AssertionError(f"panel {title!r}: {error}") from error


def test_template_variables_list_the_models_and_replicas(prometheus: PrometheusProcess, server: ServerProcess) -> None:
    for variable in _dashboard()["templating"]["list"]:
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"]).groups()
        values = set(prometheus.api(f"label/{label}/values", **{"match[]": metric}))
        expected = {
            "model": {"multi_input", "shared_layer", "residual_cnn"},
            "instance": {f"127.0.0.1:{server.metrics_port}"},
        }
        assert values == expected[label]


def _series(prometheus: PrometheusProcess, panel_title: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """legend format -> [(labels, value)] of every target of the panel, as an instant query now."""
    panel = next(p for p in _panels() if p["title"] == panel_title)
    return {
        target["legendFormat"]: [
            (sample["metric"], float(sample["value"][1])) for sample in prometheus.query(_resolve(target["expr"]))
        ]
        for target in panel["targets"]
    }


def test_core_panels_return_data(prometheus: PrometheusProcess) -> None:
    """The traffic sent by the fixture shows: its request rate, its latency quantiles, its rows per batch.

    The session's server also served other tests, whose series may be there at rate 0; only ours are checked.
    """
    ours = {"method": "typed.PredictMultiInput", "code": "OK"}
    rates = _series(prometheus, "Request rate by method and code")["{{method}} {{code}}"]
    assert [v for labels, v in rates if labels == ours][0] > 0, rates
    latency = _series(prometheus, "Latency p50 / p99 by method")
    p50, p99 = (
        [v for labels, v in latency[f"{q} {{{{method}}}}"] if labels["method"] == ours["method"]][0]
        for q in ("p50", "p99")
    )
    assert 0 < p50 <= p99 < 10, (p50, p99)
    rows = _series(prometheus, "Rows per batch")["rows per batch"]
    assert len(rows) == 1 and rows[0][1] >= 1, rows  # a batch holds at least one row; more under 16 callers


def test_every_metric_the_dashboard_names_is_exposed_by_a_live_server(server: ServerProcess) -> None:
    exposed = set()
    for family in text_string_to_metric_families(server.metrics_text()):
        exposed |= {sample.name for sample in family.samples}
    exprs = " ".join(t["expr"] for p in _panels() for t in p["targets"])
    exprs += " ".join(v["query"]["query"] for v in _dashboard()["templating"]["list"])
    named = set(re.findall(r"\b((?:modelserver|process)_\w+)", exprs))
    assert {"modelserver_batch_size_rows_sum", "modelserver_queue_rows", "process_resident_memory_bytes"} <= named
    assert named - exposed == set()


def test_docker_health_check_command_passes_against_a_serving_server(server: ServerProcess) -> None:
    """The Dockerfile's HEALTHCHECK command itself, run by a shell with the port variable the image sets."""
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    shell_command = json.loads(re.search(r"^\s+CMD (\[.*\])$", dockerfile, re.MULTILINE).group(1))[-1]
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # `python` is the venv's, as in the image
    env = {**os.environ, "PATH": path, "MODELSERVER_GRPC_PORT": str(server.port)}
    result = subprocess.run(["/bin/sh", "-c", shell_command], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr
    env["MODELSERVER_GRPC_PORT"] = "1"  # nothing listens there: unhealthy
    assert subprocess.run(["/bin/sh", "-c", shell_command], cwd=REPO_ROOT, env=env, capture_output=True).returncode == 1


def test_dashboard_json_has_one_row_per_model() -> None:
    dashboard = _dashboard()
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r.get("repeat") for r in rows] == [None, "model"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"model", "instance"}
    assert all(t["datasource"]["uid"] == "prometheus" for p in _panels() for t in p["targets"])
