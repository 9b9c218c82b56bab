"""The protocols benchmark (BENCH.md): the Open Inference Protocol (unary with raw tensors, and streaming)
against our typed API, on one server, measured side by side in one run.

Loads (closed loop, `python -m clients loadtest --protocol ...` in its own process, each after a 0.5 s
warm-up run): 1-row multi_input at concurrency 1 and 64 through typed / oip / oip-stream, and 32-row
residual_cnn requests at concurrency 16 through typed / oip. Every load is run against each protocol in turn,
several rounds, and each one's median (by throughput) is kept, so drift on this shared machine hits all of
them alike. Also measured: the server's and the load client's CPU time per request (/proc, getrusage) and,
in-process, what decoding one 32-row image request costs as packed floats (typed) and as raw bytes (OIP).

Usage: python -m bench.protocols [--duration S] [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from harness.server import ServerProcess  # noqa: E402

CNN_ROWS = 32
LOADS = [  # (name, model, concurrency, rows, protocols)
    ("multi_input c=1", "multi_input", 1, 1, ("typed", "oip", "oip-stream")),
    ("multi_input c=64", "multi_input", 64, 1, ("typed", "oip", "oip-stream")),
    (f"residual_cnn {CNN_ROWS} rows c=16", "residual_cnn", 16, CNN_ROWS, ("typed", "oip")),
]


def log(message: str) -> None:
    print(f"[bench-protocols {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "device": "/device:CPU:0"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def batches(server: ServerProcess, model: str) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    found = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("model") == model and s.name.startswith("modelserver_batch_size_rows_")
    }
    return found.get("modelserver_batch_size_rows_sum", 0.0), found.get("modelserver_batch_size_rows_count", 0.0)


def load(server: ServerProcess, model: str, protocol: str, concurrency: int, rows: int, duration: float) -> dict:
    """A warm-up run, then the measured run, each from its own client process; server CPU and batches counted."""

    def client(seconds: float) -> dict:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([sys.executable, "-m", "clients", "--target", server.target, "loadtest", model,
                            "--protocol", protocol, "--concurrency", str(concurrency), "--duration", str(seconds),
                            "--rows-per-request", str(rows), "--no-progress", "--json", out.name],
                           cwd=REPO_ROOT, check=True, capture_output=True)  # fmt: skip
            return json.loads(Path(out.name).read_text())

    client(0.5)
    cpu, (rows_before, batches_before) = cpu_seconds(server.process.pid), batches(server, model)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = client(duration)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows_after, batches_after = batches(server, model)
    served = max(result["ok"] + sum(result["errors"].values()), 1)
    result["server_cpu_ms_per_request"] = 1000 * (cpu_seconds(server.process.pid) - cpu) / served
    # The client's whole process (start-up included): what the load generator takes from the shared cores.
    client_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    result["client_cpu_ms_per_request"] = 1000 * client_cpu / served
    result["mean_rows_per_batch"] = (rows_after - rows_before) / max(batches_after - batches_before, 1)
    log(
        f"  {model} {protocol} c={concurrency} rows={rows}: {result['throughput_rps']:.0f} req/s, "
        f"p50 {result['latency_ms']['p50']:.2f} ms, server CPU {result['server_cpu_ms_per_request']:.3f} ms/req, "
        f"client CPU {result['client_cpu_ms_per_request']:.3f} ms/req, errors {result['errors']}"
    )
    return result


def decode_costs(repeat: int = 200) -> dict:
    """In-process cost of turning one 32-row image request's bytes into the numpy array the core gets."""
    from tritonclient.grpc import service_pb2

    from modelserver.v1 import modelserver_pb2
    from server.protocols.oip import codec as oip_codec

    image = np.random.default_rng(0).random((CNN_ROWS, 28, 28, 1), dtype=np.float32)
    typed_bytes = modelserver_pb2.PredictResidualCnnRequest(image=image.ravel().tolist()).SerializeToString()
    oip = service_pb2.ModelInferRequest(model_name="residual_cnn")
    oip.inputs.add(name="image", datatype="FP32", shape=image.shape)
    oip.raw_input_contents.append(image.tobytes())
    oip_bytes = oip.SerializeToString()

    def typed() -> np.ndarray:
        request = modelserver_pb2.PredictResidualCnnRequest.FromString(typed_bytes)
        return np.fromiter(request.image, dtype=np.float32, count=len(request.image)).reshape(-1, 28, 28, 1)

    def raw() -> np.ndarray:
        return oip_codec.decode_inputs("residual_cnn", service_pb2.ModelInferRequest.FromString(oip_bytes))["image"]

    assert np.array_equal(typed(), raw())
    ms = {name: 1000 * min(timeit.repeat(f, number=repeat // 10, repeat=10)) / (repeat // 10)
          for name, f in (("typed_packed_floats", typed), ("oip_raw_bytes", raw))}  # fmt: skip
    return {"ms_per_request": ms, "typed_over_raw": ms["typed_packed_floats"] / ms["oip_raw_bytes"]}


def run(duration: float, rounds: int) -> dict:
    results: dict = {
        "machine": machine(),
        "duration_s": duration,
        "rounds": rounds,
        "placement": "one server and the load client in separate processes on the same machine (they share its "
        "cores, and the machine is shared with other developers' test runs); default batching settings",
        "loads": {},
    }
    log("decode cost of a 32-row residual_cnn request, in-process")
    results["decode_32_row_image"] = decode_costs()
    server = ServerProcess(Path(tempfile.mkdtemp(prefix="bench-protocols-")), [])
    try:
        server.wait_serving()
        for name, model, concurrency, rows, protocols in LOADS:
            log(name)
            runs: dict[str, list[dict]] = {p: [] for p in protocols}
            for _ in range(rounds):
                for protocol in protocols:
                    runs[protocol].append(load(server, model, protocol, concurrency, rows, duration))
            results["loads"][name] = {
                p: sorted(r, key=lambda x: x["throughput_rps"])[len(r) // 2] for p, r in runs.items()
            }
    finally:
        server.stop()
    results["ratios"] = ratios(results["loads"])
    return results


def ratios(loads: dict) -> dict:
    found = {}
    for name, by_protocol in loads.items():
        typed = by_protocol["typed"]
        for protocol, x in by_protocol.items():
            if protocol == "typed":
                continue
            key = f"{name}: {protocol} / typed"
            found[f"{key} throughput"] = x["throughput_rps"] / typed["throughput_rps"]
            found[f"{key} p50 latency"] = x["latency_ms"]["p50"] / typed["latency_ms"]["p50"]
            found[f"{key} server CPU per request"] = x["server_cpu_ms_per_request"] / typed["server_cpu_ms_per_request"]
    return found


def table(loads: dict) -> str:
    lines = [
        "| load | protocol | req/s | rows/s | p50 ms | p99 ms | server CPU ms/req | client CPU ms/req | rows/batch "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_protocol in loads.items():
        for protocol, x in by_protocol.items():
            lat = x["latency_ms"]
            lines.append(
                f"| {name} | {protocol} | {x['throughput_rps']:.0f} | {x['rows_per_s']:.0f} | {lat['p50']:.2f} | "
                f"{lat['p99']:.2f} | {x['server_cpu_ms_per_request']:.3f} | {x['client_cpu_ms_per_request']:.3f} | "
                f"{x['mean_rows_per_batch']:.1f} | "
                f"{sum(x['errors'].values())} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measured run (default: 3)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per protocol and load, median kept (default: 3)")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/protocols-<time>.json)")
    args = parser.parse_args()
    results = run(args.duration, args.rounds)
    results["command"] = f"make bench-protocols ARGS='--duration {args.duration:g} --rounds {args.rounds}'"
    out = args.out or REPO_ROOT / "bench" / "results" / f"protocols-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({"ratios": results["ratios"], "decode_32_row_image": results["decode_32_row_image"]}, indent=2))
    print(table(results["loads"]))
    log(f"written {out}")


if __name__ == "__main__":
    main()
