"""A version switch measured against no switch, in one run (BENCH.md): 64 closed-loop callers of multi_input's
latest version, first for a steady window, then while version 2 is published (renamed into place) and version 1
retires. Reports the time from the copy to the first answer of version 2, the callers' p50/p99 in both windows,
every call's code, and the server's peak resident memory in both windows. Prints JSON (also written to
bench/results/).

Usage: python -m bench.lifecycle [--seconds S] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from bench.run import log, machine  # noqa: E402
from harness.server import REPO_ROOT, ServerProcess  # noqa: E402
from modelserver.v1 import modelserver_pb2 as pb  # noqa: E402
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc  # noqa: E402

CALLERS = 64
REQUEST = pb.PredictMultiInputRequest(input_a=[0.25] * 10, input_b=[0.5] * 20)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """The server's resident memory every 20 ms, on a thread."""

    def __init__(self, pid: int) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pid,), daemon=True)
        self._thread.start()

    def _run(self, pid: int) -> None:
        while not self._stop.wait(0.02):
            self.samples.append(rss_bytes(pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.samples, default=0)


async def load(target: str, seconds: float, during: asyncio.Future | None = None) -> dict:
    """CALLERS callers for `seconds` (or until `during` is done, whichever is later); latencies and codes, and
    when (monotonic) each version first answered."""
    latencies: list[float] = []
    codes: dict[str, int] = {}
    first: dict[int, float] = {}
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ModelServiceStub(channel)

        async def caller() -> None:
            while time.monotonic() < end or (during is not None and not during.done()):
                sent = time.perf_counter()
                try:
                    response = await stub.PredictMultiInput(REQUEST, timeout=30)
                    codes["OK"] = codes.get("OK", 0) + 1
                    first.setdefault(response.version, time.monotonic())
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] = codes.get(error.code().name, 0) + 1
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
    ms = np.array(latencies) * 1000
    return {
        "calls": len(latencies),
        "codes": codes,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "first_answer": first,
    }


def status_versions(server: ServerProcess) -> list[int]:
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "multi_input"
    reply = model_service_pb2_grpc.ModelServiceStub(server.channel).GetModelStatus(request, timeout=10)
    return [s.version for s in reply.model_version_status]


async def switch(server: ServerProcess, source: Path, target: Path, seconds: float) -> dict:
    """The load while a new version (`target`) is published one second in; it runs until the old one retired."""
    number = int(target.name)
    retired: asyncio.Future = asyncio.get_running_loop().create_future()
    published: dict[str, float] = {}

    async def publish() -> None:
        await asyncio.sleep(1.0)
        staging = target.parent / f".copy-{target.name}"
        shutil.copytree(source, staging)
        published["at"] = time.monotonic()
        staging.rename(target)
        while await asyncio.to_thread(status_versions, server) != [number]:
            await asyncio.sleep(0.05)
        published["retired_after_s"] = time.monotonic() - published["at"]
        retired.set_result(None)

    task = asyncio.create_task(publish())
    result = await load(server.target, seconds, during=retired)
    await task
    result["copy_to_first_answer_of_new_version_s"] = round(result["first_answer"][number] - published["at"], 3)
    result["copy_to_old_version_retired_s"] = round(published["retired_after_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each window")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/lifecycle-<time>.json)")
    args = parser.parse_args()
    from models.registry import BUILTIN_MODELS
    from server.registry import repository

    with tempfile.TemporaryDirectory() as scratch:
        repo = Path(scratch) / "repository"
        aside = Path(scratch) / "aside" / "multi_input" / "2"
        repository.export_saved_model(BUILTIN_MODELS["multi_input"].build(99), aside, 99)
        server = ServerProcess(repo, ["--repository-poll-seconds", "0.5"])
        try:
            server.wait_serving()
            asyncio.run(load(server.target, 2.0))  # warm-up
            log("steady window")
            sampler = Sampler(server.process.pid)
            steady = asyncio.run(load(server.target, args.seconds))
            steady["peak_rss_mb"] = round(sampler.stop() / 2**20, 1)
            log(
                "switch window: version 1 (loaded at start-up, so frozen: its retirement pays one full collection) to 2"
            )
            sampler = Sampler(server.process.pid)
            during = asyncio.run(switch(server, aside, repo / "multi_input" / "2", args.seconds))
            during["peak_rss_mb"] = round(sampler.stop() / 2**20, 1)
            log("switch window: version 2 to 3 (the start-up weights again; nothing frozen to collect)")
            sampler = Sampler(server.process.pid)
            again = asyncio.run(switch(server, repo / "multi_input" / "1", repo / "multi_input" / "3", args.seconds))
            again["peak_rss_mb"] = round(sampler.stop() / 2**20, 1)
            after_rss = rss_bytes(server.process.pid)
        finally:
            server.kill()
    for window in (steady, during, again):
        window.pop("first_answer")
    result = {
        "machine": machine(),
        "command": "python -m bench.lifecycle " + " ".join(f"--seconds {args.seconds}".split()),
        "callers": CALLERS,
        "steady": steady,
        "switch_from_startup_version": during,
        "switch_between_later_versions": again,
        "rss_after_switches_mb": round(after_rss / 2**20, 1),
        "ratios": {
            name: {
                "p50_switch_over_steady": round(window["p50_ms"] / steady["p50_ms"], 2),
                "p99_switch_over_steady": round(window["p99_ms"] / steady["p99_ms"], 2),
                "peak_rss_switch_over_steady": round(window["peak_rss_mb"] / steady["peak_rss_mb"], 2),
            }
            for name, window in (("from_startup_version", during), ("between_later_versions", again))
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    out = args.out or REPO_ROOT / "bench" / "results" / f"lifecycle-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
