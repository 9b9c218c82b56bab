"""Where the server's CPU goes under load (issue 25): py-spy samples the server process while the load tester drives
it, and the samples are summed per function, inclusive and self, per thread group (the event loop, the model
threads). Prints JSON; `--raw FILE` keeps py-spy's collapsed stacks (flamegraph.pl or speedscope read them).

py-spy (a development dependency) reads the process from outside, so the server runs unchanged; without --native
the time spent inside grpc.aio's Cython callbacks is attributed to asyncio's `Handle._run` (self time there is
grpc's own code, not ours).

Usage: python -m bench.profile [--protocol typed|oip|rest-oip-json|...] [--concurrency 64] [--seconds 15] [--raw FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.server import ServerProcess

REPO_ROOT = Path(__file__).resolve().parent.parent


def summarize(raw: str, top: int = 30) -> dict:
    """Collapsed stacks ("frame;frame;... count" per line) summed per function: inclusive and self samples, for
    the event loop's thread and the others."""
    groups: dict[str, dict[str, collections.Counter[str]]] = {}
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame.split(" (")[0] + " " + frame.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  if " (" in frame else frame for frame in stack.split(";")]  # fmt: skip
        # Threads started by Python (the model threads, the metrics server) start in threading.py; the rest is the
        # event loop's, including stacks py-spy caught only from a coroutine frame down.
        group = "other threads" if "threading.py" in stack.split(";")[0] else "event loop"
        counters = groups.setdefault(group, {"inclusive": collections.Counter(), "self": collections.Counter()})
        totals[group] += count
        for frame in set(frames):
            counters["inclusive"][frame] += count
        counters["self"][frames[-1]] += count
    return {
        group: {
            "samples": totals[group],
            "inclusive": [[name, n, round(n / totals[group], 3)] for name, n in c["inclusive"].most_common(top)],
            "self": [[name, n, round(n / totals[group], 3)] for name, n in c["self"].most_common(top)],
        }
        for group, c in groups.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", default="typed")
    parser.add_argument("--model", default="multi_input")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--raw", type=Path, help="also keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    repository = Path(tempfile.mkdtemp(prefix="modelserver-profile-"))
    raw_file = args.raw or repository / "stacks.txt"
    with ServerProcess(repository) as server:
        server.wait_serving()
        target = ["--http-target", f"127.0.0.1:{server.http_port}"] if args.protocol.startswith("rest") else []
        load = subprocess.Popen(
            [sys.executable, "-m", "clients", "--target", server.target, *target, "loadtest", args.model,
             "--protocol", args.protocol, "--concurrency", str(args.concurrency),
             "--duration", str(args.seconds + 4), "--warmup", "2"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        time.sleep(2.5)  # past the load's warm-up
        subprocess.run(
            [py_spy, "record", "-p", str(server.process.pid), "-d", str(int(args.seconds)), "-r", str(args.rate),
             "-f", "raw", "-o", str(raw_file), "--nonblocking"],
            check=True, capture_output=True,
        )  # fmt: skip
        summary_lines = [line for line in load.communicate(timeout=120)[0].splitlines() if line.strip()]
    report = {
        "protocol": args.protocol,
        "model": args.model,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "load": summary_lines[-4:],
        "profile": summarize(raw_file.read_text()),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
