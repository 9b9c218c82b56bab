"""Two checkouts of this repository side by side: a server from each, the same closed-loop load against each in
turn, interleaved rounds, medians (BENCH.md: compare inside one run). For a change that must not slow the server
(a move, a refactor), the "before" tree is a `git worktree` of the base commit.

Usage: python -m bench.compare_trees BEFORE_DIR AFTER_DIR [--concurrency 64] [--duration 5] [--rounds 5]
           [--model multi_input] [--protocol typed]
Prints JSON: each tree's req/s and latency percentiles per round, their medians, and after/before.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def start(tree: Path, repository: Path, scratch: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m server` from `tree`, on port 0; returns the process and its target once it serves."""
    port_file = scratch / "ports.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--grpc-port", "0", "--metrics-port", "0", "--port-file", str(port_file),
         "--model-repository", str(repository)],
        cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server of {tree} did not start")
        time.sleep(0.1)
    target = f"127.0.0.1:{json.loads(port_file.read_text())['grpc_port']}"
    health = [sys.executable, "-m", "clients", "--target", target, "health"]
    while subprocess.run(health, cwd=tree, capture_output=True, text=True).stdout.strip() != "SERVING":
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server of {tree} never served")
        time.sleep(0.5)
    return process, target


def load(tree: Path, target: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One closed-loop run of the project's load tester (its own process) against `target`."""
    subprocess.run(
        [sys.executable, "-m", "clients", "--target", target, "loadtest", args.model, "--concurrency",
         str(args.concurrency), "--duration", str(args.duration), "--warmup", "1", "--protocol", args.protocol,
         "--json", str(out), "--no-progress"],
        cwd=tree, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    summary = json.loads(out.read_text())
    return {
        "rps": summary["throughput_rps"],
        "p50_ms": summary["latency_ms"]["p50"],
        "p99_ms": summary["latency_ms"]["p99"],
        "errors": sum(summary["errors"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="multi_input")
    parser.add_argument("--protocol", default="typed")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    with tempfile.TemporaryDirectory(prefix="compare-trees-") as scratch_dir:
        scratch = Path(scratch_dir)
        repository = scratch / "repository"
        processes = {}
        try:
            for name, tree in trees.items():  # the first exports the built-in models; the second finds them
                (scratch / name).mkdir()
                processes[name] = start(tree, repository, scratch / name)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                for name in order:
                    runs[name].append(load(trees[name], processes[name][1], args, scratch / f"{name}.json"))
        finally:
            for process, _ in processes.values():
                process.kill()
                process.wait(30)
    medians = {name: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]} for name, rounds in runs.items()}
    result = {
        "command": " ".join(["python", "-m", "bench.compare_trees", *sys.argv[1:]]),
        "trees": {name: str(tree) for name, tree in trees.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
        "medians": medians,
        "after_over_before_rps": round(medians["after"]["rps"] / medians["before"]["rps"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
