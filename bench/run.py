"""The benchmark (BENCH.md): our server against its references, measured side by side in one run.

References: the compute ceiling (the SavedModel signature called in-process at each batch size, no gRPC),
the transport ceiling (bench/echo_server.py on the same gRPC stack), a plain per-request server calling the same
loaded signature (bench/plain_server.py, sync gRPC), and our server with batching off. Load comes from
`python -m clients loadtest` in its own process, closed loop with 1-row requests at concurrency 1, 4, 16, 64 and
256, 32-row residual_cnn requests, and open-loop runs at 10, 25 and 50 % of the batched maximum. Every server runs
at once and each load is run against them in turn, several rounds, keeping each one's median. Prints JSON (also
written to bench/results/, with the machine, its load and the command) and markdown tables: every run, and every
goal of issue 15 as a same-run ratio with whether it holds.

Usage: python -m bench.run [--duration S] [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from harness.server import ServerProcess  # noqa: E402

CONCURRENCIES = (1, 4, 16, 64, 256)
CNN_ROWS = 32
CNN_BULK_CONCURRENCY = 8
OTHER_POLICIES = ("fixed",)  # the default policy is "cost" (server/batching/policy.py)
MAIN_VARIANTS = ("echo", "plain", "unbatched", "batched")
OPEN_LOOP_SHARES = (0.1, 0.25, 0.5)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "load_average": load_average()}


def load_average() -> list[float]:
    """The machine's 1, 5 and 15-minute load averages (other users' work on a shared machine shows here)."""
    return [round(x, 2) for x in os.getloadavg()]


def compute_ceiling(repository: Path, seconds: float) -> dict:
    """Rows/s of each model called in-process at each batch size (bench/compute_ceiling.py)."""
    done = subprocess.run([sys.executable, "-m", "bench.compute_ceiling", str(repository), str(seconds)],
                          capture_output=True, text=True, check=True, cwd=REPO_ROOT)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def load(
    target: str,
    model: str,
    duration: float,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    rows: int = 1,
    protocol: str = "typed",
    http_target: str = "",
) -> dict:
    """One load-test run from a separate client process; returns its JSON summary. `protocol` is the load tester's
    (`rest-*` ones go to `http_target`)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        mode = ["--concurrency", str(concurrency)] if concurrency else ["--rate", str(rate)]
        http = ["--http-target", http_target] if http_target else []
        subprocess.run([sys.executable, "-m", "clients", "--target", target, *http, "loadtest", model, *mode,
                        "--duration", str(duration), "--rows-per-request", str(rows), "--protocol", protocol,
                        "--no-progress", "--json", out.name],
                       cwd=REPO_ROOT, check=True, capture_output=True)  # fmt: skip
        return json.loads(Path(out.name).read_text())


def batch_stats(server: ServerProcess, model: str) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") == model and s.name in (
                "modelserver_batch_size_rows_sum",
                "modelserver_batch_size_rows_count",
            ):
                values[s.name] = s.value
    return values.get("modelserver_batch_size_rows_sum", 0.0), values.get("modelserver_batch_size_rows_count", 0.0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(
    server: ServerProcess | None, target: str, model: str, duration: float, pid: int | None = None, **kwargs
) -> dict:
    """A load run, plus mean rows per executed batch from the server's own metrics over exactly that run, and the
    server's CPU time per successful request (the number that decides throughput on 2 shared cores)."""
    warmup = kwargs.pop("warmup", 0.5)
    if warmup:
        load(target, model, warmup, **kwargs)
    before = batch_stats(server, model) if server else None
    cpu_before = cpu_seconds(pid) if pid else None
    result = load(target, model, duration, **kwargs)
    if pid and cpu_before is not None and result["ok"]:
        result["server_cpu_ms_per_request"] = (cpu_seconds(pid) - cpu_before) * 1000 / result["ok"]
    if server and before is not None:
        after = batch_stats(server, model)
        batches = after[1] - before[1]
        result["mean_rows_per_batch"] = (after[0] - before[0]) / batches if batches else None
        result["batches"] = batches
    latency = result["latency_ms"]
    log(
        f"  {model} {kwargs} -> {result['throughput_rps']:.0f} req/s, p50 {latency['p50']:.2f} ms, "
        f"p99 {latency['p99']:.2f} ms, rows/batch {result.get('mean_rows_per_batch')}, errors {result['errors']}"
    )
    return result


def start_server(repository: Path, *args: str) -> ServerProcess:
    server = ServerProcess(repository, args)
    server.wait_serving()
    return server


class ReferenceServer:
    """A reference server of bench/ in its own process (the echo, or the plain per-request server)."""

    def __init__(self, module: str, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT,
                                        stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.process.stdout is not None
        listening = self.process.stdout.readline().split()  # "NAME listening on HOST:PORT"
        assert listening[1:3] == ["listening", "on"], listening
        self.target = listening[3]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


def EchoServer() -> ReferenceServer:  # noqa: N802
    return ReferenceServer("bench.echo_server")


def PlainServer(repository: Path) -> ReferenceServer:  # noqa: N802
    """The plain per-request server of the built-in models in `repository` (our server exports them first if
    missing)."""
    if not (repository / "multi_input").exists():
        start_server(repository).stop()
    return ReferenceServer("bench.plain_server", str(repository))


def interleaved(
    targets: dict[str, ServerProcess | ReferenceServer], model: str, duration: float, rounds: int, **kwargs
) -> dict[str, dict]:
    """Run the same load against every target in turn, `rounds` times, and keep each target's median run
    (by throughput). The machines here are shared and their speed drifts over seconds: interleaving puts
    the same drift on every target, so the ratios hold even when the absolute numbers move."""
    runs: dict[str, list[dict]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, target in targets.items():
            server = target if isinstance(target, ServerProcess) else None
            runs[name].append(measured(server, target.target, model, duration, pid=target.process.pid, **kwargs))
    return {name: sorted(r, key=lambda x: x["throughput_rps"])[len(r) // 2] for name, r in runs.items()}


def run(duration: float, rounds: int) -> dict:
    results: dict = {
        "machine": machine(),
        "duration_s": duration,
        "rounds": rounds,
        "placement": "servers and load client in separate processes on the same machine (they share its cores); "
        "all servers run at once, idle but one, and are loaded in turn",
    }
    repository = Path(tempfile.mkdtemp(prefix="bench-repo-"))

    log("exporting models")
    start_server(repository).stop()
    log("compute ceiling (in-process, no gRPC)")
    results["compute_ceiling"] = compute_ceiling(repository, min(duration, 2.0))
    results["machine"]["device"] = results["compute_ceiling"].pop("device")

    log("starting the echo, the plain per-request server, and our server unbatched, batched and with policy fixed")
    targets: dict[str, ServerProcess | ReferenceServer] = {"echo": EchoServer()}
    try:
        targets["plain"] = PlainServer(repository)
        targets["unbatched"] = start_server(repository, "--batching", "false")
        targets["batched"] = start_server(repository)
        for policy in OTHER_POLICIES:
            targets[f"batched_{policy}"] = start_server(repository, "--batching-policy", policy)
        for variant in targets:
            results[variant] = {}
        for c in CONCURRENCIES:
            log(f"multi_input, 1-row requests, concurrency {c}")
            chosen = targets if c in (1, 16, 64) else {k: v for k, v in targets.items() if k in MAIN_VARIANTS}
            for variant, result in interleaved(chosen, "multi_input", duration, rounds, concurrency=c).items():
                results[variant][c] = result
        cnn_targets = {k: v for k, v in targets.items() if k in MAIN_VARIANTS}
        log("residual_cnn, 1-row requests, concurrency 64")
        for variant, result in interleaved(cnn_targets, "residual_cnn", duration, rounds, concurrency=64).items():
            results[f"{variant}_cnn_1row_c64"] = result
        log(f"residual_cnn, {CNN_ROWS}-row requests, concurrency {CNN_BULK_CONCURRENCY}")
        for variant, result in interleaved(cnn_targets, "residual_cnn", duration, rounds,
                                           concurrency=CNN_BULK_CONCURRENCY, rows=CNN_ROWS).items():  # fmt: skip
            results[f"{variant}_cnn"] = result
        peak = max(r["throughput_rps"] for r in results["batched"].values())
        log(f"open loop at 10, 25 and 50 % of the batched peak ({peak:.0f} req/s), batched and unbatched")
        results["open_loop"] = {}
        for share in OPEN_LOOP_SHARES:
            rate = round(share * peak)
            for variant, result in interleaved({k: targets[k] for k in ("batched", "unbatched")}, "multi_input",
                                               duration, 1, rate=rate, warmup=0).items():  # fmt: skip
                results["open_loop"][f"{variant} {int(share * 100)}%"] = result
        # A lone caller once more, after every load above: the batcher must not carry what it learned under load
        # (a model call's time while the process was busy) into a tax on a caller that is alone again.
        log("multi_input, 1-row requests, concurrency 1 again, after the loads")
        results["after_load_c1"] = interleaved(
            {k: targets[k] for k in ("batched", "unbatched")}, "multi_input", duration, rounds, concurrency=1
        )
    finally:
        for target in targets.values():
            target.stop()
    results["machine"]["load_average_after"] = load_average()
    results["goals"] = goals(results)
    return results


def goals(r: dict) -> list[dict]:
    """Issue 15's goals, each as ratios of two things measured in this run, with its target and whether it holds."""
    b, u, e, p = r["batched"], r["unbatched"], r["echo"], r["plain"]
    rps = {c: b[c]["throughput_rps"] for c in CONCURRENCIES}
    cnn_ceiling = max(x["rows_per_s"] for x in r["compute_ceiling"]["residual_cnn"].values())
    out = []

    def goal(number: int, what: str, value: float, target: str, holds: bool) -> None:
        out.append({"goal": number, "what": what, "value": round(value, 3), "target": target, "holds": holds})

    p50_c1 = b[1]["latency_ms"]["p50"] / u[1]["latency_ms"]["p50"]
    goal(1, "c=1 p50: batched / unbatched", p50_c1, "<= 1.05", p50_c1 <= 1.05)
    after = r["after_load_c1"]
    p50_after = after["batched"]["latency_ms"]["p50"] / after["unbatched"]["latency_ms"]["p50"]
    goal(1, "c=1 p50 after the loads: batched / unbatched", p50_after, "<= 1.05", p50_after <= 1.05)
    c1_plain = rps[1] / p[1]["throughput_rps"]
    goal(1, "c=1 req/s: batched / plain per-request server", c1_plain, ">= 1", c1_plain >= 1)
    steps = list(zip(CONCURRENCIES, CONCURRENCIES[1:], strict=False))
    for low, high in steps:
        strict = high <= 16  # c=1 < c=4 < c=16, then <= within 5 %
        ratio = rps[high] / rps[low]
        goal(2, f"req/s c={high} / c={low}", ratio, "> 1" if strict else ">= 0.95",
             ratio > 1 if strict else ratio >= 0.95)  # fmt: skip
    echo_c64 = rps[64] / e[64]["throughput_rps"]
    goal(3, "multi_input 1-row c=64 req/s: batched / echo", echo_c64, ">= 0.85", echo_c64 >= 0.85)
    tail = b[64]["latency_ms"]["p99"] / b[64]["latency_ms"]["p50"]
    goal(3, "multi_input 1-row c=64: p99 / p50", tail, "<= 2", tail <= 2)
    ceiling = r["batched_cnn"]["rows_per_s"] / cnn_ceiling
    goal(4, f"residual_cnn {CNN_ROWS}-row rows/s: batched / compute ceiling", ceiling, ">= 0.9", ceiling >= 0.9)
    over_plain = r["batched_cnn"]["rows_per_s"] / r["plain_cnn"]["rows_per_s"]
    goal(4, f"residual_cnn {CNN_ROWS}-row rows/s: batched / plain", over_plain, "> 1", over_plain > 1)
    cpu = b[64]["server_cpu_ms_per_request"] / e[64]["server_cpu_ms_per_request"]
    goal(5, "server CPU per 1-row request c=64: batched / echo", cpu, "<= 1.5", cpu <= 1.5)
    for share in OPEN_LOOP_SHARES:
        name = f"{int(share * 100)}%"
        batched, unbatched = r["open_loop"][f"batched {name}"], r["open_loop"][f"unbatched {name}"]
        keeps_up = sum(unbatched["errors"].values()) == 0 and unbatched["throughput_rps"] >= 0.95 * unbatched["rate"]
        for q, limit in (("p50", 1.2), ("p99", 1.5)):
            ratio = batched["latency_ms"][q] / unbatched["latency_ms"][q]
            target = f"<= {limit}" if keeps_up else f"<= {limit} (unbatched does not keep up: n/a)"
            goal(6, f"open loop {name} {q}: batched / unbatched", ratio, target, ratio <= limit or not keeps_up)
    return out


def goals_table(r: dict) -> str:
    lines = ["| goal | measured | ratio | target | holds |", "|---|---|---|---|---|"]
    for g in r["goals"]:
        lines.append(
            f"| {g['goal']} | {g['what']} | {g['value']:.2f} | {g['target']} | {'yes' if g['holds'] else 'NO'} |"
        )
    return "\n".join(lines)


def table(r: dict) -> str:
    def row(name: str, x: dict) -> str:
        lat = x["latency_ms"]
        rpb = x.get("mean_rows_per_batch")
        cpu = x.get("server_cpu_ms_per_request")
        return (f"| {name} | {x['throughput_rps']:.0f} | {x['rows_per_s']:.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} | "
                f"{lat['p99']:.2f} | {lat['max']:.1f} | {'' if rpb is None else f'{rpb:.1f}'} | "
                f"{'' if cpu is None else f'{cpu:.3f}'} | {sum(x['errors'].values())} |")  # fmt: skip

    lines = ["| run | req/s | rows/s | p50 ms | p90 ms | p99 ms | max ms | rows/batch | server CPU ms/req | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant in (*MAIN_VARIANTS, *(f"batched_{p}" for p in OTHER_POLICIES)):
        for c, x in r[variant].items():
            lines.append(row(f"multi_input {variant} c={c}", x))
    for variant in MAIN_VARIANTS:
        lines.append(row(f"residual_cnn {variant} 1 row c=64", r[f"{variant}_cnn_1row_c64"]))
    for variant in MAIN_VARIANTS:
        lines.append(row(f"residual_cnn {variant} {CNN_ROWS} rows c={CNN_BULK_CONCURRENCY}", r[f"{variant}_cnn"]))
    for name, x in r["open_loop"].items():
        lines.append(row(f"multi_input {name.split()[0]} open loop {name.split()[1]} ({x['rate']:.0f} req/s)", x))
    for variant, x in r["after_load_c1"].items():
        lines.append(row(f"multi_input {variant} c=1 after the loads", x))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measured run (default: 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs per target, median kept (default: 3)")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/bench-<time>.json)")
    args = parser.parse_args()
    results = json.loads(json.dumps(run(args.duration, args.rounds)))  # int keys become strings, as in the file
    out = args.out or REPO_ROOT / "bench" / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results["command"] = "make bench  # " + " ".join(["python", "-m", "bench.run", *sys.argv[1:]])
    results["tables"] = {"runs": table(results), "goals": goals_table(results)}
    out.write_text(json.dumps(results, indent=2))
    print(goals_table(results))
    print(table(results))
    log(f"written {out}")


if __name__ == "__main__":
    main()
