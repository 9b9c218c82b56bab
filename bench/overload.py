"""Overload at the edge and at the bare server (README, "Overload"): the capacity from a closed loop at c=64, then
open loops at 2x and 4x it from the project's load tester, through the compose stack's nginx (its shipped
configuration, concurrency cap included) and straight to the server. Every call is counted on the client side;
the server's own counts show which calls reached Python. Prints JSON (also written to bench/results/).

Per run: refusal latency (RESOURCE_EXHAUSTED) p50/p99, admitted (OK) p50/p99 against the unloaded p99, each from
the schedule and from the actual send, errors by code, calls that reached the server, the server's own p50/p99 for
the calls it answered, nginx's own time per call (its access log), and the recovery time (from the end of the
overload until a probe on its own connection is answered within 3x the unloaded c=1 p99). Before the nginx runs,
a sweep of closed loops through nginx without its cap shows the concurrency that cap should be.

Usage: python -m bench.overload [--seconds 8] [--factors 2 4] [--variants nginx bare bare-streams]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.run import load, log, machine  # noqa: E402
from clients.loadtest import percentiles_ms  # noqa: E402
from harness.deploy_native import NGINX_CONFIG, NginxProcess  # noqa: E402
from harness.server import ServerProcess, scrape, serving  # noqa: E402
from modelserver.v1 import modelserver_pb2 as pb  # noqa: E402

MODEL = "multi_input"
REQUEST = pb.PredictMultiInputRequest(input_a=[0.25] * 10, input_b=[0.5] * 20)
CLIENT_TIMEOUT_S = 5.0

# What each variant runs: extra server arguments, and whether the load goes through nginx.
VARIANTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "nginx": ((), True),  # the compose stack: deploy/nginx/nginx.conf in front of one server with its defaults
    "bare": ((), False),  # the server alone, its defaults (admission control at --max-concurrent-rpcs 1024)
    "bare-streams": (("--max-concurrent-streams", "128"), False),  # the server alone, 128 calls per connection
}


def _server_counts(server: ServerProcess) -> tuple[dict[str, float], dict[float, float]]:
    """(calls answered by code, cumulative request-duration buckets) for the model's typed method."""
    codes: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(scrape(server.metrics_port)):
        for s in family.samples:
            if s.labels.get("model") != MODEL or s.labels.get("method") != "typed.PredictMultiInput":
                continue
            if s.name == "modelserver_requests_total":
                codes[s.labels["code"]] = codes.get(s.labels["code"], 0.0) + s.value
            elif s.name == "modelserver_request_duration_seconds_bucket":
                bound = float(s.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + s.value
    return codes, buckets


def _histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over the increase between two scrapes (linear within a bucket), in ms."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return lower * 1000
            return (lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)) * 1000
        lower, below = bound, count
    return None


def _probe(target: str, stop: threading.Event, samples: list[tuple[float, float | None]]) -> None:
    """One 1-row request every 20 ms on a connection of its own: (send time, latency or None when it failed)."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        predict = channel.unary_unary(
            "/modelserver.v1.ModelService/PredictMultiInput",
            request_serializer=pb.PredictMultiInputRequest.SerializeToString,
            response_deserializer=pb.PredictMultiInputResponse.FromString,
        )
        while not stop.is_set():
            sent = time.monotonic()
            try:
                predict(REQUEST, timeout=10)
                samples.append((sent, time.monotonic() - sent))
            except grpc.RpcError:
                samples.append((sent, None))
            stop.wait(0.02)


def _open_loop(target: str, rate: float, seconds: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "clients", "--target", target, "--timeout", str(CLIENT_TIMEOUT_S),
                        "loadtest", MODEL, "--rate", str(rate), "--duration", str(seconds),
                        "--max-outstanding", "1000000", "--no-progress", "--json", out.name],
                       cwd=REPO_ROOT, check=True, capture_output=True)  # fmt: skip
        return json.loads(Path(out.name).read_text())


# nginx's access log (deploy/nginx/nginx.conf's format): its own answers have no upstream; time= is $request_time.
ACCESS_TIME = re.compile(r"upstream=(\S+) time=([0-9.]+)")


def _nginx_times(nginx: NginxProcess, offset: int) -> dict[str, dict[str, float | None]]:
    """nginx's own time per call from its access log past `offset` ($request_time, millisecond resolution):
    the edge's answer time, whatever the load client's lateness. `refused`: nginx's own answers; `proxied`: the
    calls it passed to the server."""
    with (nginx.workdir / "access.log").open() as log:
        log.seek(offset)
        lines = log.read().splitlines()
    seconds: dict[str, list[float]] = {"refused": [], "proxied": []}
    for match in filter(None, map(ACCESS_TIME.search, lines)):
        seconds["refused" if match.group(1) == "-" else "proxied"].append(float(match.group(2)))
    return {kind: {**percentiles_ms(values), "count": len(values)} for kind, values in seconds.items()}


def overload_run(
    server: ServerProcess,
    target: str,
    rate: float,
    seconds: float,
    recovered_below_s: float,
    nginx: NginxProcess | None = None,
) -> dict:
    """One open loop at `rate` against `target`, with the probe timing recovery, the server's counts, and (through
    nginx) nginx's own time per call."""
    log_offset = (nginx.workdir / "access.log").stat().st_size if nginx else 0
    codes_before, buckets_before = _server_counts(server)
    samples: list[tuple[float, float | None]] = []
    stop = threading.Event()
    prober = threading.Thread(target=_probe, args=(target, stop, samples))
    started = time.monotonic()
    prober.start()
    try:
        result = _open_loop(target, rate, seconds)
        end = started + seconds
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            t > end and latency is not None and latency < recovered_below_s for t, latency in samples
        ):
            time.sleep(0.05)
    finally:
        stop.set()
        prober.join()
    codes_after, buckets_after = _server_counts(server)
    recovered = [t for t, latency in samples if t > end and latency is not None and latency < recovered_below_s]
    reached = {code: n - codes_before.get(code, 0.0) for code, n in codes_after.items()}
    return {
        "rate_rps": rate,
        "sent": result["requests"],
        "ok": result["ok"],
        "errors": result["errors"],
        "admitted_ms": result["latency_ms"],
        "refusal_ms": result["error_latency_ms_by_code"].get("RESOURCE_EXHAUSTED"),
        "error_ms_by_code": result["error_latency_ms_by_code"],
        # The same from each call's actual send: what the proxy or server took, without the client's own lateness.
        "send_lag_ms": result["send_lag_ms"],
        "from_send_ms_by_code": result["latency_from_send_ms_by_code"],
        "reached_server": {code: int(n) for code, n in reached.items() if n},
        "server_p50_ms": _histogram_quantile(0.5, buckets_before, buckets_after),
        "server_p99_ms": _histogram_quantile(0.99, buckets_before, buckets_after),
        "recovery_s": (recovered[0] - end) if recovered else None,
        "nginx_ms": _nginx_times(nginx, log_offset) if nginx else None,
        "client": result,
    }


def _brief(run: dict) -> str:
    def p50_p99(ms: dict | None) -> str:
        return "-" if not ms or ms["p50"] is None else f"{ms['p50']:.1f}/{ms['p99']:.1f}"

    from_send = run["from_send_ms_by_code"]
    return (
        f"ok {run['ok']} errors {run['errors']} reached server {run['reached_server']}; p50/p99 ms: refusal "
        f"{p50_p99(run['refusal_ms'])} (from send {p50_p99(from_send.get('RESOURCE_EXHAUSTED'))}), admitted "
        f"{p50_p99(run['admitted_ms'])} (from send {p50_p99(from_send.get('OK'))}), send lag "
        f"{p50_p99(run['send_lag_ms'])}, server {run['server_p50_ms']}/{run['server_p99_ms']}, nginx "
        f"{run['nginx_ms']}; "
        f"recovery {run['recovery_s']} s"
    )


@contextmanager
def _target(variant: str, repository: Path, workdir: Path) -> Iterator[tuple[ServerProcess, str, NginxProcess | None]]:
    """The server of `variant`, the address its load goes to (nginx's, or the server's own), and nginx."""
    server_args, through_nginx = VARIANTS[variant]
    with serving(repository, server_args) as server:
        if not through_nginx:
            yield server, server.target, None
            return
        nginx = NginxProcess(workdir, [server.target])
        try:
            yield server, nginx.target, nginx
        finally:
            nginx.stop()


CAP_LINE = re.compile(r"limit_conn modelserver_calls (\d+);")
SWEEP_CONCURRENCY = (8, 16, 32, 64, 128)


def cap_sweep(server: ServerProcess, workdir: Path) -> dict:
    """Closed loops through nginx without its cap: the concurrency past which throughput stops growing is the cap
    to set (calls beyond it only wait in the server's queue). Returns each run and the smallest concurrency
    within 5 % of the best throughput."""
    config = CAP_LINE.sub("limit_conn modelserver_calls 65535;", NGINX_CONFIG.read_text())
    workdir.mkdir()
    nginx = NginxProcess(workdir, [server.target], config=config)
    try:
        load(nginx.target, MODEL, 1.0, concurrency=64)  # warm-up
        runs = {c: load(nginx.target, MODEL, 4.0, concurrency=c) for c in SWEEP_CONCURRENCY}
    finally:
        nginx.stop()
    best = max(r["throughput_rps"] for r in runs.values())
    knee = min(c for c, r in runs.items() if r["throughput_rps"] >= 0.95 * best)
    log("cap sweep through nginx: " + ", ".join(f"c={c} {r['throughput_rps']:.0f} req/s" for c, r in runs.items()))
    cap = CAP_LINE.search(NGINX_CONFIG.read_text())
    if cap is None:
        raise RuntimeError(f"no '{CAP_LINE.pattern}' line in {NGINX_CONFIG}")
    return {
        "runs": {
            str(c): {"throughput_rps": r["throughput_rps"], "latency_ms": r["latency_ms"]} for c, r in runs.items()
        },
        "best_rps": best,
        "smallest_concurrency_within_5pct_of_best": knee,
        "shipped_cap": int(cap.group(1)),
    }


def measure(variant: str, repository: Path, capacity: float, factors: list[float], seconds: float) -> dict:
    with (
        tempfile.TemporaryDirectory() as workdir,
        _target(variant, repository, Path(workdir)) as (server, target, nginx),
    ):
        load(target, MODEL, 1.0, concurrency=64)  # warm-up
        unloaded = load(target, MODEL, 5.0, concurrency=64)
        calm = load(target, MODEL, 3.0, concurrency=1)
        report: dict = {"cap_sweep": cap_sweep(server, Path(workdir) / "sweep")} if VARIANTS[variant][1] else {}
        report |= {
            "server_args": list(VARIANTS[variant][0]),
            "through_nginx": VARIANTS[variant][1],
            "unloaded_c64": unloaded,
            "unloaded_c1": calm,
        }
        for factor in factors:
            run = overload_run(server, target, factor * capacity, seconds, 3 * calm["latency_ms"]["p99"] / 1000, nginx)
            run["admitted_p99_over_unloaded_c64_p99"] = (
                run["admitted_ms"]["p99"] / unloaded["latency_ms"]["p99"] if run["admitted_ms"]["p99"] else None
            )
            report[f"{factor:g}x"] = run
            log(f"{variant} {factor:g}x: {_brief(run)}")
        report["server_log_tracebacks"] = server.log_text().count("Traceback")
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each open loop")
    parser.add_argument("--factors", type=float, nargs="+", default=[2.0, 4.0], help="multiples of the capacity")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, help="JSON output (default: bench/results/overload-<time>.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        repository = Path(folder)
        server = ServerProcess(repository)  # exports the models once, and measures the capacity
        try:
            server.wait_serving()
            load(server.target, MODEL, 1.0, concurrency=64)
            capacity = load(server.target, MODEL, 5.0, concurrency=64)["throughput_rps"]
        finally:
            server.kill()
        log(f"capacity {capacity:.0f} req/s at c=64 closed loop, straight to the server")
        report: dict = {
            "machine": machine(),
            "command": " ".join(sys.argv),
            "nginx_config": str(NGINX_CONFIG.relative_to(REPO_ROOT)),
            "client_timeout_s": CLIENT_TIMEOUT_S,
            "capacity_rps": capacity,
        }
        for variant in args.variants:
            report[variant] = measure(variant, repository, capacity, args.factors, args.seconds)
    out = args.out or REPO_ROOT / "bench" / "results" / f"overload-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report, indent=2, default=float))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
