"""Where the server's CPU per request goes, by thread (issue 25): the server and the bare grpc.aio echo loaded in turn
by the load tester (its own process), each thread's CPU time read from /proc before and after, grouped by what
the thread is (the event loop, gRPC's C-core threads, the Python threads that call the model, TensorFlow's own
pools).

The echo serves the same typed API with no model, so each group's difference is what our server adds there: the
event loop's is our Python per request, the Python threads' the batches (joining, the model call's Python
side), TensorFlow's the model's kernels.

`--targets` adds `echo-sync`, the same echo on gRPC's synchronous server (C-core threads doing HTTP/2, the
handlers on a thread pool), to compare the two transports grpcio offers on the same request; `plain`, the plain
per-request server of bench/plain_server.py (the c=1 reference); `unbatched`, our server with batching off;
`server-rest`, our server loaded over its HTTP port (OIP with binary tensors): the same core behind another
transport.

Usage: python -m bench.threads [--concurrency 64] [--seconds 8] [--rounds 2]
[--targets echo,echo-sync,plain,server,server-rest,unbatched] [-- SERVER FLAGS...]. Prints JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.run import EchoServer, PlainServer, ReferenceServer, load, start_server
from harness.server import ServerProcess

# Thread name (the kernel's 15-character comm) -> group. Threads Python starts keep the process's name ("python"):
# the main thread (the event loop) is told apart by its id, the process's.
GROUPS = [
    (re.compile(r"^python"), "Python threads (model calls, metrics)"),
    (re.compile(r"^grpc|^default-exec|^resolver-exec|^timer_manager|^global_timer"), "gRPC C-core threads"),
    (re.compile(r"^tf_|^Eigen|^tensorflow"), "TensorFlow threads"),
]


REST_PROTOCOL = "rest-oip-binary"


def group_of(name: str) -> str:
    for pattern, group in GROUPS:
        if pattern.search(name):
            return group
    return f"other ({name})"


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread group of a process."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = collections.defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except FileNotFoundError:  # the thread ended between listing and reading
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        group = "event loop (main thread)" if int(tid) == pid else group_of(name)
        totals[group] += (int(fields[11]) + int(fields[12])) / ticks
    return dict(totals)


def measure(target: ServerProcess | ReferenceServer, concurrency: int, seconds: float, protocol: str = "typed") -> dict:
    pid = target.process.pid
    over: dict[str, Any] = {}
    if protocol != "typed":  # over HTTP: our server's port (ServerProcess.http_url)
        over = {"protocol": protocol, "http_target": getattr(target, "http_url", "")}
    load(target.target, "multi_input", 0.5, concurrency=concurrency, **over)
    before = thread_cpu(pid)
    result = load(target.target, "multi_input", seconds, concurrency=concurrency, **over)
    after = thread_cpu(pid)
    ok = result["ok"]
    per_request = {g: round((after.get(g, 0.0) - before.get(g, 0.0)) * 1e3 / ok, 4) for g in after}
    return {
        "req_per_s": round(result["throughput_rps"]),
        "p50_ms": round(result["latency_ms"]["p50"], 2),
        "cpu_ms_per_request": {"total": round(sum(per_request.values()), 4), **per_request},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    targets_help = "comma-separated: echo, echo-sync, plain, server, server-rest, unbatched"
    parser.add_argument("--targets", default="echo,server", help=targets_help)
    parser.add_argument("server_args", nargs="*", help="flags for our server (after --)")
    args = parser.parse_args()
    repository = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    targets: dict[str, ServerProcess | ReferenceServer] = {}
    try:
        for name in args.targets.split(","):
            if name == "echo":
                targets[name] = EchoServer()
            elif name == "echo-sync":
                targets[name] = ReferenceServer("bench.echo_server", "--sync")
            elif name == "server":
                targets[name] = start_server(repository, *args.server_args)
            elif name == "server-rest":  # our server again, loaded over its HTTP port (OIP, binary tensors)
                targets[name] = targets.get("server") or start_server(repository, *args.server_args)
            elif name == "unbatched":
                targets[name] = start_server(repository, "--batching", "false", *args.server_args)
            elif name == "plain":
                targets[name] = PlainServer(repository)
            else:
                parser.error(f"unknown target {name!r}: echo, echo-sync, plain, server, server-rest or unbatched")
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, target in targets.items():
                protocol = REST_PROTOCOL if name == "server-rest" else "typed"
                runs[name].append(measure(target, args.concurrency, args.seconds, protocol))
                print(f"{name}: {runs[name][-1]}", file=sys.stderr)
    finally:
        for target in set(targets.values()):
            target.stop()
    print(json.dumps({"concurrency": args.concurrency, "seconds": args.seconds, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
