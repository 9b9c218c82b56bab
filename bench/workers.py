"""--workers: throughput and server CPU per request with 1 and 2 worker processes, measured side by side.

Both servers run at once; each load (closed loop, 1-row multi_input requests, from `python -m clients loadtest`
in its own process) is run against each in turn, several rounds, median kept. The server's CPU time is the sum
of utime + stime (/proc/PID/stat, all threads) over its whole process tree (supervisor and workers), read before
and after each measured run; requests per server CPU-second should stay flat from 1 to 2 workers (processes add
cores, not cost per request). One client channel is one HTTP/2 connection and so reaches one worker: the
`channels 1` run shows that. Prints JSON (also written to bench/results/).

Usage: python -m bench.workers [--duration S] [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from bench.run import batch_stats, log, machine  # noqa: E402
from harness.server import ServerProcess  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
WARMUP = 5.0  # seconds of load on each server before any measurement
# (label, workers, concurrency, client channels)
LOADS = (
    ("1 worker, c=64, 8 channels", 1, 64, 8),
    ("2 workers, c=64, 8 channels", 2, 64, 8),
    ("2 workers, c=64, 1 channel", 2, 64, 1),
    ("1 worker, c=256, 32 channels", 1, 256, 32),
    ("2 workers, c=256, 32 channels", 2, 256, 32),
)


def _tree(root: int) -> list[int]:
    """The pid and every descendant's (from /proc/*/stat parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def cpu_seconds(root: int) -> float:
    """utime + stime of the process tree, every thread included."""
    total = 0.0
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def load(target: str, concurrency: int, channels: int, duration: float, warmup: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "clients", "--target", target, "loadtest", "multi_input",
                        "--concurrency", str(concurrency), "--channels", str(channels), "--duration", str(duration),
                        "--warmup", str(warmup), "--no-progress", "--json", out.name],
                       cwd=REPO_ROOT, check=True, capture_output=True)  # fmt: skip
        return json.loads(Path(out.name).read_text())


def measured(server: ServerProcess, idle_rate: float, concurrency: int, channels: int, duration: float) -> dict:
    """One run; the server's CPU is read around the whole client process (start-up and warm-up included), and the
    server's idle CPU over the time outside the measured phase is subtracted."""
    pid = server.process.pid
    spread_before, batches_before = per_worker(server), batch_stats(server, "multi_input")
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    result = load(server.target, concurrency, channels, duration, warmup=1.0)
    cpu = cpu_seconds(pid) - cpu_before
    spread = [after - before for after, before in zip(per_worker(server), spread_before, strict=True)]
    batches_after = batch_stats(server, "multi_input")
    batches = batches_after[1] - batches_before[1]
    wall = time.monotonic() - wall_before
    idle = idle_rate * (wall - result["duration_s"] - result["warmup_s"])
    # The warm-up's share, at the measured phase's CPU rate: what remains is the measured phase's own CPU.
    busy = max(cpu - idle, 0.0) * result["duration_s"] / (result["duration_s"] + result["warmup_s"])
    return {
        "rps": result["throughput_rps"],
        "p50_ms": result["latency_ms"]["p50"],
        "p99_ms": result["latency_ms"]["p99"],
        "errors": result["errors"],
        "server_cpu_s": busy,
        "server_cores_busy": busy / result["duration_s"],
        "requests_per_cpu_s": result["ok"] / busy if busy else None,
        "rows_per_batch": (batches_after[0] - batches_before[0]) / batches if batches else None,  # warm-up included
        "requests_per_worker": spread,  # warm-up included; one worker: empty (no supervisor)
    }


def per_worker(server: ServerProcess) -> list[float]:
    """Requests answered so far by each worker (the supervisor's modelserver_worker_requests_total)."""
    count = int(server.metric("modelserver_workers"))
    return [server.metric("modelserver_worker_requests_total", worker=str(i)) for i in range(count)]


def idle_cpu_per_s(server: ServerProcess, seconds: float = 3.0) -> float:
    before = cpu_seconds(server.process.pid)
    time.sleep(seconds)
    return (cpu_seconds(server.process.pid) - before) / seconds


def run(duration: float, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as repository:
        servers: dict[int, ServerProcess] = {}
        try:
            for workers in (1, 2):
                servers[workers] = ServerProcess(Path(repository), ["--workers", str(workers)])
                servers[workers].wait_serving()
                while workers > 1 and "SERVING with" not in servers[workers].log_text():
                    time.sleep(0.1)  # health is SERVING from the first ready worker; wait for all
            for server in servers.values():  # the first seconds under load run slower (first full batches, caches)
                load(server.target, 64, 8, WARMUP, warmup=0.0)
            idle = {workers: idle_cpu_per_s(server) for workers, server in servers.items()}
            runs: dict[str, list[dict]] = {label: [] for label, *_ in LOADS}
            for round_ in range(rounds):
                for label, workers, concurrency, channels in LOADS:
                    runs[label].append(measured(servers[workers], idle[workers], concurrency, channels, duration))
                    log(f"round {round_ + 1}/{rounds} {label}: {runs[label][-1]}")
        finally:
            for server in servers.values():
                server.stop()
    medians = {label: _median(r) for label, r in runs.items()}
    one, two = medians["1 worker, c=64, 8 channels"], medians["2 workers, c=64, 8 channels"]
    return {
        "machine": machine(),
        "placement": "server(s) and load client on the same machine, all processes sharing its cores",
        "duration_s": duration,
        "rounds": rounds,
        "idle_server_cpu_per_s": idle,
        "runs": medians,
        "all_rounds": runs,
        "ratios": {
            "requests_per_cpu_s 2 workers / 1 worker (c=64, 8 channels)": one["requests_per_cpu_s"]
            and two["requests_per_cpu_s"] / one["requests_per_cpu_s"],
            "throughput 2 workers / 1 worker (c=64, 8 channels)": two["rps"] / one["rps"],
            "throughput 2 workers, 1 channel / 8 channels (c=64)": medians["2 workers, c=64, 1 channel"]["rps"]
            / two["rps"],
        },
    }


def _median(results: list[dict]) -> dict:
    """The median of every numeric figure; the errors of every round summed."""
    median = {
        key: statistics.median(r[key] for r in results)
        for key in results[0]
        if key not in ("errors", "requests_per_worker") and all(r[key] is not None for r in results)
    }
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    return {**median, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run (default: 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per load, median kept (default: 3)")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/workers-<time>.json)")
    args = parser.parse_args()
    results = run(args.duration, args.rounds)
    results["command"] = f"python -m bench.workers --duration {args.duration:g} --rounds {args.rounds}"
    out = args.out or REPO_ROOT / "bench" / "results" / f"workers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({"runs": results["runs"], "ratios": results["ratios"]}, indent=2))
    log(f"written {out}")


if __name__ == "__main__":
    main()
