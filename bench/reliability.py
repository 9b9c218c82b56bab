"""Reliability figures (issue: nothing accepted is lost): drain over repeated SIGTERMs under load, and a soak at
concurrency 16. Every call is counted on the client side. Prints JSON (also written to bench/results/).
Overload at 2x and 4x capacity, through nginx and at the bare server, is bench/overload.py.

Usage: python -m bench.reliability [--drains 10] [--soak-seconds 600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from bench.run import load, log, machine  # noqa: E402
from harness.drain import drain_round  # noqa: E402
from harness.server import ServerProcess  # noqa: E402
from modelserver.v1 import modelserver_pb2 as pb  # noqa: E402

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
            "modelserver_requests_total", model="multi_input", method="typed.PredictMultiInput", code="OK"
        )
        rss_start = _rss_bytes(server.process.pid)
        result = load(server.target, "multi_input", seconds, concurrency=16)
        rss_end = _rss_bytes(server.process.pid)
        served = (
            server.metric(
                "modelserver_requests_total", model="multi_input", method="typed.PredictMultiInput", code="OK"
            )
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
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--only", choices=("drain", "soak"), help="run one part only")
    parser.add_argument("--out", type=Path, help="JSON output (default: bench/results/reliability-<time>.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        repository = Path(folder)
        _serving(repository).kill()  # export the models once
        report: dict = {"machine": machine(), "command": " ".join(sys.argv)}
        if args.only in (None, "drain"):
            report["drain"] = drains(repository, args.drains)
        if args.only in (None, "soak"):
            report["soak"] = soak(repository, args.soak_seconds)
    out = args.out or REPO_ROOT / "bench" / "results" / f"reliability-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report, indent=2, default=float))
    log(f"wrote {out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
