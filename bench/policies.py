"""The batching policies side by side: the default (`cost`), `fixed`, and batching off,
each loaded in turn with 1-row multi_input requests at c=1/16/64 and open loops at 300 and 700 req/s.

Usage: python -m bench.policies [--rounds N] [--duration S]  (prints one line per load and server, medians)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.run import batch_stats, load, machine, start_server

VARIANTS = {
    "cost (default)": [],
    "fixed": ["--batching-policy", "fixed"],
    "unbatched": ["--batching", "false"],
}
LOADS: dict[str, dict[str, Any]] = {"c=1": {"concurrency": 1}, "c=16": {"concurrency": 16}, "c=64": {"concurrency": 64},
         "300 req/s": {"rate": 300}, "700 req/s": {"rate": 700}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    repository = Path(tempfile.mkdtemp(prefix="bench-policies-"))
    start_server(repository).stop()  # export once
    servers = {name: start_server(repository, *flags) for name, flags in VARIANTS.items()}
    runs: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    try:
        for _ in range(args.rounds):
            for load_name, kwargs in LOADS.items():
                for name, server in servers.items():
                    load(server.target, "multi_input", 0.5, **kwargs)
                    rows0, batches0 = batch_stats(server, "multi_input")
                    result = load(server.target, "multi_input", args.duration, **kwargs)
                    rows1, batches1 = batch_stats(server, "multi_input")
                    latency = result["latency_ms"]
                    rows_per_batch = (rows1 - rows0) / max(1.0, batches1 - batches0)
                    runs.setdefault((load_name, name), []).append(
                        (result["throughput_rps"], latency["p50"], latency["p99"], rows_per_batch)
                    )
    finally:
        for server in servers.values():
            server.stop()
    print(machine())
    for (load_name, name), values in runs.items():
        rps, p50, p99, rows = (statistics.median(v[i] for v in values) for i in range(4))
        line = f"{load_name:10} {name:20} {rps:7.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
        print(f"{line}  rows/batch {rows:5.1f}")


if __name__ == "__main__":
    main()
