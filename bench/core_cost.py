"""What our server costs without its transport (issue 25): the typed API's whole request path in one process, from
a request's bytes to its reply's bytes (the gRPC servicer's decoder, handler, core, admission, validation, batcher,
the model on the executor, metrics, encoding), with no gRPC: `concurrency` callers on one event loop, each sending
the next request when its reply is encoded. Per request: the event loop's CPU time, the whole process's, and
requests per second; rows per batch and why batches ran, from the batcher's own metrics.

Compared with the bare grpc.aio echo (`python -m bench.threads --targets echo`), it splits the server's cost per
request into what the transport costs and what the rest of the server costs, each measured alone: our event loop's
work here is what the server adds to grpc.aio's on its loop. One difference from a server: the callers' own work
(encoding, decoding) runs on the same loop, so the batching policy sees a busier interpreter than a server's, and at
c=1 about a tenth of the lone requests wait for company here (`waited`), against under 1 % in a server.

Usage: python -m bench.core_cost [REPOSITORY] [--concurrency 1,16,64] [--requests 20000] [--rounds 3]
(without REPOSITORY: the built-in models are exported to a temporary one). Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import grpc  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from modelserver.v1 import modelserver_pb2 as pb  # noqa: E402
from server.batching.batcher import Batcher  # noqa: E402
from server.batching.config import BatchingConfig  # noqa: E402
from server.dataplane.admission import AdmissionControl  # noqa: E402
from server.dataplane.inference import InferenceService  # noqa: E402
from server.grpc.rpc import _safe_decoder  # noqa: E402
from server.grpc.typed import ModelService  # noqa: E402
from server.registry.manager import ModelManager, Phase  # noqa: E402
from server.registry.version_policy import VersionPolicy  # noqa: E402
from server.runtimes.device import select_device  # noqa: E402
from server.runtimes.savedmodel import SavedModelRuntime  # noqa: E402

MODEL = "multi_input"
REQUEST = pb.PredictMultiInputRequest(input_a=[0.25] * 10, input_b=[0.5] * 20).SerializeToString()
WARM_UP_REQUESTS = 2000
REASONS = ("full", "idle", "waited", "deadline")


class NoDeadline:
    """The part of a gRPC servicer context that a successful typed predict call uses."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")


def batch_counts() -> dict[str, float]:
    counts = {r: REGISTRY.get_sample_value("modelserver_batches_total", {"model": MODEL, "reason": r}) or 0.0
              for r in REASONS}  # fmt: skip
    counts["rows"] = REGISTRY.get_sample_value("modelserver_batch_size_rows_sum", {"model": MODEL}) or 0.0
    return counts


async def measure(repository: Path, concurrencies: list[int], requests: int, rounds: int) -> dict[str, Any]:
    executor = ThreadPoolExecutor(4, thread_name_prefix="model")
    batcher = Batcher(executor, lambda name: BatchingConfig())
    runtime = SavedModelRuntime(MODEL, 1, repository / MODEL / "1", select_device())
    batcher.warm_up(runtime)
    manager = ModelManager(repository, load=lambda version: runtime, retire_queue=batcher.retire,
                           policy_for=lambda name: VersionPolicy("latest"))  # fmt: skip
    manager.add_available(runtime)
    manager.set_phase(Phase.SERVING)
    admission = AdmissionControl(1024, seconds_per_call=batcher.seconds_per_call)
    service = ModelService(InferenceService(manager, batcher, batcher.config, admission.check))
    decode = _safe_decoder(pb.PredictMultiInputRequest)
    context = NoDeadline()
    left = 0

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            reply = await service.PredictMultiInput(decode(REQUEST), context)  # type: ignore[arg-type]
            reply.SerializeToString()

    results: dict[str, Any] = {}
    for concurrency in concurrencies:
        left = WARM_UP_REQUESTS
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        runs = []
        for _ in range(rounds):
            left = requests
            before = batch_counts()
            loop_cpu, process_cpu, wall = time.thread_time(), time.process_time(), time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            loop_cpu, process_cpu = time.thread_time() - loop_cpu, time.process_time() - process_cpu
            wall = time.perf_counter() - wall
            after = batch_counts()
            batches = sum(after[r] - before[r] for r in REASONS)
            runs.append({
                "req_per_s": round(requests / wall),
                "loop_cpu_us_per_request": round(loop_cpu / requests * 1e6, 1),
                "process_cpu_us_per_request": round(process_cpu / requests * 1e6, 1),
                "rows_per_batch": round((after["rows"] - before["rows"]) / batches, 2) if batches else None,
                "batches_by_reason": {r: int(after[r] - before[r]) for r in REASONS if after[r] > before[r]},
            })  # fmt: skip
            print(f"c={concurrency}: {runs[-1]}", file=sys.stderr, flush=True)
        results[f"c={concurrency}"] = runs
    executor.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", nargs="?", type=Path)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated (default: 1,16,64)")
    parser.add_argument("--requests", type=int, default=20000, help="per measured round (default: 20000)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    repository = args.repository
    if repository is None:
        from bench.run import start_server

        repository = Path(tempfile.mkdtemp(prefix="bench-core-"))
        start_server(repository).stop()  # the server exports the built-in models at start-up
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results = asyncio.run(measure(repository, concurrencies, args.requests, args.rounds))
    print(json.dumps({"model": MODEL, "requests_per_round": args.requests, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
