"""Pauses at c=1 (issue 25: max latency over a 60 s run at c=1 within 5x its p50, and each remaining pause named).

One caller, one request at a time, for `--seconds` against each target in turn: the bare grpc.aio echo and the
plain per-request server (bench/), which have no batcher, no repository poll and no model graph on the heap, and our
server with its defaults and with the repository poll off. The caller is this process, with its garbage collector
off during the run, so a pause of its own is not counted as the server's. For our server the run also reads, from
its /metrics before and after: how many calls its own handlers took longer than 10 and 25 ms (the request duration
histogram: a pause inside the server process shows there, one in the kernel or the client does not), and its
garbage collections by generation (count, total and longest pause).

A pause the echo and the plain server show as often as ours is the machine's (two cores shared by server, client
and everything else), not the server's.

Usage: python -m bench.pauses [--seconds 60] [--rounds 1] [--targets echo,plain,server,server-no-poll]. Prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.run import EchoServer, PlainServer, ReferenceServer, start_server
from clients.loadtest import percentiles_ms
from harness.server import ServerProcess
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc

REQUEST = pb.PredictMultiInputRequest(input_a=[0.25] * 10, input_b=[0.5] * 20)
SLOW_FACTOR = 5.0  # the bound: max <= 5x p50


def server_counts(server: ServerProcess) -> dict[str, float]:
    """The server's own view: its handlers' calls over 10 and 25 ms, and its GC pauses (count, seconds, by
    generation), from /metrics."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(server.metrics_text()):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "modelserver_request_duration_seconds_bucket" and labels.get("model") == "multi_input":
                if labels["le"] in ("0.01", "0.025", "+Inf"):
                    key = f"handler_calls_le_{labels['le']}"
                    counts[key] = counts.get(key, 0.0) + sample.value
            elif sample.name.startswith("modelserver_gc_pause_seconds_") and sample.name.endswith(("_count", "_sum")):
                counts[f"gc{labels['generation']}_{sample.name.rsplit('_', 1)[1]}"] = sample.value
            elif sample.name == "modelserver_gc_pause_seconds_bucket" and labels["le"] in ("0.005", "0.01"):
                counts[f"gc{labels['generation']}_le_{labels['le']}"] = sample.value
    return counts


def run_one(target: str, seconds: float) -> list[tuple[float, float]]:
    """(start offset, latency), in seconds, of every call of a c=1 closed loop, this process's GC off while it
    runs."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        for _ in range(50):  # warm-up: the connection, the first calls
            stub.PredictMultiInput(REQUEST, timeout=10)
        calls: list[tuple[float, float]] = []
        gc.collect()
        gc.disable()
        try:
            begin = time.perf_counter()
            end = begin + seconds
            while (now := time.perf_counter()) < end:
                stub.PredictMultiInput(REQUEST, timeout=10)
                calls.append((now - begin, time.perf_counter() - now))
        finally:
            gc.enable()
    return calls


def summary(calls: list[tuple[float, float]]) -> dict:
    latency = percentiles_ms([seconds for _, seconds in calls])  # the load tester's percentiles
    p50, p99, most = latency["p50"] or 0.0, latency["p99"] or 0.0, latency["max"] or 0.0
    slow = [(round(at, 2), round(s * 1e3, 1)) for at, s in calls if s * 1e3 > SLOW_FACTOR * p50]
    return {
        "calls": len(calls),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(most, 1),
        "max_over_p50": round(most / p50, 1) if p50 else None,
        f"calls_over_{SLOW_FACTOR:g}x_p50": len(slow),
        "slowest": sorted(slow, key=lambda x: -x[1])[:5],  # (seconds into the run, ms)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--targets", default="echo,plain,server,server-no-poll")
    args = parser.parse_args()
    repository = Path(tempfile.mkdtemp(prefix="bench-pauses-"))
    targets: dict[str, ServerProcess | ReferenceServer] = {}
    try:
        for name in args.targets.split(","):
            if name == "echo":
                targets[name] = EchoServer()
            elif name == "server":
                targets[name] = start_server(repository)
            elif name == "server-no-poll":
                targets[name] = start_server(repository, "--repository-poll-seconds", "0")
            elif name == "plain":
                targets[name] = PlainServer(repository)
            else:
                parser.error(f"unknown target {name!r}: echo, plain, server or server-no-poll")
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, target in targets.items():
                server = target if isinstance(target, ServerProcess) else None
                before = server_counts(server) if server else {}
                result = summary(run_one(target.target, args.seconds))
                if server:
                    after = server_counts(server)
                    result["server"] = {key: round(after[key] - before.get(key, 0.0), 4) for key in sorted(after)}
                runs[name].append(result)
                print(f"{name}: {result}", file=sys.stderr, flush=True)
    finally:
        for target in targets.values():
            target.stop()
    print(json.dumps({"seconds": args.seconds, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
