"""The REST benchmark (issue 23, BENCH.md): the HTTP port's protocols against our gRPC Open Inference Protocol, on one
server and one model, measured side by side in one run.

Protocols (each `python -m clients loadtest --protocol P` in its own process, closed loop, 1-row `multi_input`):
`rest-oip-binary` (the OIP over HTTP with Triton's binary tensors), `rest-oip-json` (JSON tensors), `rest-tfserving`
(TF Serving's REST `:predict`, row format) and `oip` (our gRPC ModelInfer, raw tensors: the reference). At each
concurrency (1, 16, 64), every protocol runs in turn, a 0.5 s warm-up then the measured run, for several rounds
(the order rotated each round), and each protocol's median run (by throughput) is kept, so drift on a shared machine
hits all of them alike. Beside requests/s and p50/p99: the server's CPU time per request (/proc/PID/stat), the load
client's (getrusage), and the mean rows per executed batch (the server's metrics).

Goals, each a ratio of two things measured in this run: binary REST >= 0.8x our gRPC OIP's throughput at c=64; JSON
REST >= 0.6x; the REST protocols' p50 at c=1 <= 1.2x gRPC's.

Usage: python -m bench.rest [--duration S] [--rounds N] [--concurrency 1,16,64] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from bench.protocols import batches, cpu_seconds, machine  # noqa: E402
from harness.server import ServerProcess  # noqa: E402

MODEL = "multi_input"
REFERENCE = "oip"  # our gRPC ModelInfer
PROTOCOLS = ("rest-oip-binary", "rest-oip-json", "rest-tfserving", REFERENCE)
# (protocol, what, concurrency, target, lower is better): issue 23's goals as same-run ratios to REFERENCE.
GOALS = [
    ("rest-oip-binary", "throughput", 64, 0.8, False),
    ("rest-oip-json", "throughput", 64, 0.6, False),
    ("rest-oip-binary", "p50 latency", 1, 1.2, True),
    ("rest-oip-json", "p50 latency", 1, 1.2, True),
    ("rest-tfserving", "p50 latency", 1, 1.2, True),
]


def log(message: str) -> None:
    print(f"[bench-rest {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def server_cpu(server: ServerProcess) -> float:
    """CPU seconds of every server process (one unless --workers)."""
    return sum(cpu_seconds(pid) for pid in server.server_pids)


def load(server: ServerProcess, protocol: str, concurrency: int, duration: float) -> dict:
    """A warm-up run, then the measured run, each from its own client process; server CPU and batches counted."""

    def client(seconds: float) -> dict:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([sys.executable, "-m", "clients", "--target", server.target, "--http-target",
                            server.http_url, "loadtest", MODEL, "--protocol", protocol, "--concurrency",
                            str(concurrency), "--duration", str(seconds), "--no-progress", "--json", out.name],
                           cwd=REPO_ROOT, check=True, capture_output=True)  # fmt: skip
            return json.loads(Path(out.name).read_text())

    client(0.5)
    cpu, (rows_before, batches_before) = server_cpu(server), batches(server, MODEL)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = client(duration)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows_after, batches_after = batches(server, MODEL)
    served = max(result["requests"], 1)
    result["server_cpu_ms_per_request"] = 1000 * (server_cpu(server) - cpu) / served
    # The client's whole process (start-up included): what the load generator takes from the shared cores.
    client_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    result["client_cpu_ms_per_request"] = 1000 * client_cpu / served
    result["mean_rows_per_batch"] = (rows_after - rows_before) / max(batches_after - batches_before, 1)
    p50 = result["latency_ms"]["p50"]
    log(
        f"  c={concurrency} {protocol}: {result['throughput_rps']:.0f} req/s, p50 "
        f"{'n/a' if p50 is None else f'{p50:.2f}'} ms, server CPU {result['server_cpu_ms_per_request']:.3f} ms/req, "
        f"errors {result['errors']}"
    )
    return result


def summary(run: dict) -> dict:
    lat = run["latency_ms"]
    return {
        "requests_per_s": run["throughput_rps"],
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "p99_over_p50": lat["p99"] / lat["p50"] if lat["p50"] else None,
        "server_cpu_ms_per_request": run["server_cpu_ms_per_request"],
        "client_cpu_ms_per_request": run["client_cpu_ms_per_request"],
        "mean_rows_per_batch": run["mean_rows_per_batch"],
        "requests": run["requests"],
        "errors": run["errors"],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(loads: dict) -> dict:
    """Each REST protocol against the gRPC OIP at each concurrency: throughput, p50, p99, server CPU per request."""
    found = {}
    for load_name, by_protocol in loads.items():
        reference = by_protocol[REFERENCE]
        for protocol, x in by_protocol.items():
            if protocol == REFERENCE:
                continue
            found[f"{load_name} {protocol} / grpc oip"] = {
                "throughput": _ratio(x["requests_per_s"], reference["requests_per_s"]),
                "p50 latency": _ratio(x["p50_ms"], reference["p50_ms"]),
                "p99 latency": _ratio(x["p99_ms"], reference["p99_ms"]),
                "server CPU per request": _ratio(
                    x["server_cpu_ms_per_request"], reference["server_cpu_ms_per_request"]
                ),
            }
    return found


def goals(found: dict) -> list[dict]:
    checked = []
    for protocol, what, concurrency, target, lower in GOALS:
        value = found.get(f"c={concurrency} {protocol} / grpc oip", {}).get(what)
        holds = None if value is None else (value <= target if lower else value >= target)
        checked.append(
            {
                "goal": f"{protocol} {what} at c={concurrency} / grpc oip {'<=' if lower else '>='} {target}",
                "ratio": value,
                "holds": holds,
            }
        )
    return checked


def run(duration: float, rounds: int, concurrencies: list[int]) -> dict:
    results: dict = {
        "machine": machine(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "model": MODEL,
        "rows_per_request": 1,
        "duration_s": duration,
        "rounds": rounds,
        "placement": "one server (default settings; HTTP on its metrics port) and the load client in separate "
        "processes on the same machine, sharing its cores; REST calls over aiohttp keep-alive connections, one per "
        "caller; gRPC calls over one channel",
        "loads": {},
        "rounds_requests_per_s": {},
    }
    server = ServerProcess(Path(tempfile.mkdtemp(prefix="bench-rest-")), [])
    try:
        server.wait_serving()
        if not server.http_url:
            raise RuntimeError("the server serves no HTTP port")
        runs: dict[int, dict[str, list[dict]]] = {c: {p: [] for p in PROTOCOLS} for c in concurrencies}
        for round_index in range(rounds):
            order = PROTOCOLS[round_index % len(PROTOCOLS) :] + PROTOCOLS[: round_index % len(PROTOCOLS)]
            for concurrency in concurrencies:
                log(f"round {round_index + 1}/{rounds}, c={concurrency}")
                for protocol in order:
                    runs[concurrency][protocol].append(load(server, protocol, concurrency, duration))
    finally:
        server.stop()
        server.kill()  # whatever is left (idempotent)
    for concurrency, by_protocol in runs.items():
        name = f"c={concurrency}"
        results["loads"][name] = {
            p: summary(sorted(r, key=lambda x: x["throughput_rps"])[len(r) // 2]) for p, r in by_protocol.items()
        }
        results["rounds_requests_per_s"][name] = {
            p: [round(x["throughput_rps"], 1) for x in r] for p, r in by_protocol.items()
        }
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["ratios"] = ratios(results["loads"])
    results["goals"] = goals(results["ratios"])
    return results


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> str:
    lines = [
        "| load | protocol | req/s | p50 ms | p99 ms | server CPU ms/req | client CPU ms/req | rows/batch | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_protocol in results["loads"].items():
        for protocol, x in by_protocol.items():
            lines.append(
                f"| {name} | {protocol} | {x['requests_per_s']:.0f} | {_number(x['p50_ms'])} | {_number(x['p99_ms'])} "
                f"| {x['server_cpu_ms_per_request']:.3f} | {x['client_cpu_ms_per_request']:.3f} "
                f"| {x['mean_rows_per_batch']:.1f} | {sum(x['errors'].values())} |"
            )
    lines += ["", "| goal (same-run ratio) | measured | holds |", "|---|---|---|"]
    for goal in results["goals"]:
        holds = {True: "yes", False: "NO", None: "n/a"}[goal["holds"]]
        lines.append(f"| {goal['goal']} | {_number(goal['ratio'])} | {holds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measured run (default: 3)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per protocol and load, median kept (default: 3)")
    parser.add_argument(
        "--concurrency", default="1,16,64", help="closed-loop callers, comma-separated (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/rest-<time>.json)")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results = run(args.duration, args.rounds, concurrencies)
    results["command"] = (
        f"make bench-rest ARGS='--duration {args.duration:g} --rounds {args.rounds} --concurrency {args.concurrency}'"
    )
    out = args.out or REPO_ROOT / "bench" / "results" / f"rest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("machine", "loads", "ratios", "goals")}, indent=2))
    print(table(results))
    log(f"written {out}")


if __name__ == "__main__":
    main()
