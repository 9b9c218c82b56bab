"""Reliability figures (issue: nothing accepted is lost, overload is shed): drain over repeated SIGTERMs under
load, overload at 2x and 4x the measured capacity, and a soak at concurrency 16. Every call is counted on the
client side. Prints JSON (also written to bench/results/).

Usage: python -m bench.reliability [--drains 10] [--overload-seconds 8] [--soak-seconds 600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from bench.run import load, log, machine  # noqa: E402
from modelserver.v1 import modelserver_pb2 as pb  # noqa: E402
from tests.helpers.drain import drain_round  # noqa: E402
from tests.helpers.server import ServerProcess  # noqa: E402

REQUEST = pb.PredictMultiInputRequest(input_a=[0.25] * 10, input_b=[0.5] * 20)


def _serving(repository: Path, *args: str) -> ServerProcess:
    server = ServerProcess(repository, args)
    server.wait_serving()
    return server


def drains(repository: Path, rounds: int) -> dict:
    """64 closed-loop callers, SIGTERM after a second; calls sent before the signal must all succeed."""
    totals: dict[str, int] = {}
    exit_codes = []
    for i in range(rounds):
        server = _serving(repository, "--grace-period", "20")
        try:
            outcomes, wrong = asyncio.run(drain_round(server, REQUEST, expected=float("nan")))
            exit_codes.append(server.process.wait(30))
        finally:
            server.kill()
        for (when, code), n in outcomes.items():
            totals[f"{when}_{code}"] = totals.get(f"{when}_{code}", 0) + n
        log(f"drain {i + 1}/{rounds}: {dict(outcomes)}")
    accepted = totals.get("before_OK", 0)
    sent_before = sum(n for key, n in totals.items() if key.startswith("before_"))
    return {
        "rounds": rounds,
        "outcomes": totals,
        "sent_before_signal": sent_before,
        "accepted_and_answered": accepted,
        "lost": sent_before - accepted,
        "cancelled": sum(n for key, n in totals.items() if key.endswith("_CANCELLED")),
        "exit_codes": exit_codes,
    }


def _probe(target: str, stop: threading.Event, samples: list[tuple[float, float | None]]) -> None:
    """One 1-row request every 20 ms: (send time, latency or None when refused)."""
    with grpc.insecure_channel(target) as channel:
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


def overload(repository: Path, seconds: float) -> dict:
    """Capacity from a closed loop at c=64; then open loops at 2x and 4x it, with a probe measuring recovery."""
    server = _serving(repository)
    try:
        load(server.target, "multi_input", 1.0, concurrency=64)  # warm-up
        results = {"server_rss_before_mb": _rss_bytes(server.process.pid) / 2**20}
        unloaded = load(server.target, "multi_input", 5.0, concurrency=64)
        capacity = unloaded["throughput_rps"]
        calm = load(server.target, "multi_input", 3.0, concurrency=1)
        threshold = 3 * calm["latency_ms"]["p99"] / 1000
        results |= {"capacity_rps": capacity, "unloaded_c64": unloaded, "unloaded_c1": calm}
        for factor in (2, 4):
            samples: list[tuple[float, float | None]] = []
            stop = threading.Event()
            prober = threading.Thread(target=_probe, args=(server.target, stop, samples))
            rss_peak = [_rss_bytes(server.process.pid)]

            def sample_rss(stop: threading.Event = stop, peak: list[int] = rss_peak) -> None:
                while not stop.wait(0.1):
                    peak[0] = max(peak[0], _rss_bytes(server.process.pid))

            sampler = threading.Thread(target=sample_rss)
            sampler.start()
            started = time.monotonic()
            prober.start()
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, "-m", "clients", "--target", server.target, "--timeout", "5",
                                "loadtest", "multi_input", "--rate", str(factor * capacity), "--duration", str(seconds),
                                "--max-outstanding", "100000", "--no-progress", "--json", out.name],
                               cwd=REPO_ROOT, check=True, capture_output=True)  # fmt: skip
                result = json.loads(Path(out.name).read_text())
            end = started + seconds
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                t > end and latency is not None and latency < threshold for t, latency in samples
            ):
                time.sleep(0.05)
            stop.set()
            prober.join()
            sampler.join()
            result["server_rss_peak_mb"] = rss_peak[0] / 2**20
            recovered = [t for t, latency in samples if t > end and latency is not None and latency < threshold]
            result["recovery_s"] = (recovered[0] - end) if recovered else None
            result["recovery_threshold_ms"] = threshold * 1000
            result["admitted_p99_over_unloaded_c64_p99"] = (
                result["latency_ms"]["p99"] / unloaded["latency_ms"]["p99"] if result["latency_ms"]["p99"] else None
            )
            results[f"{factor}x"] = result
            log(f"overload {factor}x: ok {result['ok']} errors {result['errors']} recovery {result['recovery_s']}")
        results["server_log_tracebacks"] = server.log_text().count("Traceback")
        return results
    finally:
        server.kill()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def soak(repository: Path, seconds: float) -> dict:
    """Closed loop at c=16 for `seconds`: RSS growth, errors, and the server's count against the client's."""
    server = _serving(repository)
    try:
        load(server.target, "multi_input", 20.0, concurrency=16)  # warm-up: caches and arenas reach their size
        ok_before = server.metric(
            "modelserver_requests_total", model="multi_input", method="PredictMultiInput", code="OK"
        )
        rss_start = _rss_bytes(server.process.pid)
        result = load(server.target, "multi_input", seconds, concurrency=16)
        rss_end = _rss_bytes(server.process.pid)
        served = (
            server.metric("modelserver_requests_total", model="multi_input", method="PredictMultiInput", code="OK")
            - ok_before
        )
        return {
            "seconds": seconds,
            "client": result,
            "rss_start_mb": rss_start / 2**20,
            "rss_end_mb": rss_end / 2**20,
            "rss_growth": rss_end / rss_start - 1,
            "server_ok_count": served,
            "client_ok_count": result["ok"],
            "counts_match": served == result["ok"],
        }
    finally:
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drains", type=int, default=10)
    parser.add_argument("--overload-seconds", type=float, default=8.0)
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--only", choices=("drain", "overload", "soak"), help="run one part only")
    parser.add_argument("--out", type=Path, help="JSON output (default: bench/results/reliability-<time>.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        repository = Path(folder)
        _serving(repository).kill()  # export the models once
        report: dict = {"machine": machine(), "command": " ".join(sys.argv)}
        if args.only in (None, "drain"):
            report["drain"] = drains(repository, args.drains)
        if args.only in (None, "overload"):
            report["overload"] = overload(repository, args.overload_seconds)
        if args.only in (None, "soak"):
            report["soak"] = soak(repository, args.soak_seconds)
    out = args.out or REPO_ROOT / "bench" / "results" / f"reliability-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report, indent=2, default=float))
    log(f"wrote {out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
