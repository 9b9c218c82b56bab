"""What a refused call costs grpc.aio, against a served one (issue 25): the bare echo of our typed API driven by the
load tester (its own process, closed loop), once serving every call and once with grpc.aio's own limit
(maximum_concurrent_rpcs=1) held by a call that never ends, so that every other call is refused with
RESOURCE_EXHAUSTED in grpc's Cython layer before any handler runs. The server's CPU time per call in each mode
bounds what any refusal in Python can save: a server whose refusals cost that much cannot refuse arrivals faster
than 1 / (refusal CPU) per second on one event loop.

Usage: python -m bench.refusal_cost [--concurrency 64] [--seconds 6]. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import grpc

from bench.echo_server import EchoService
from bench.run import REPO_ROOT, cpu_seconds
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc

HOLD = 7.0  # input_a[0] of the call that holds the limit


class HoldingEcho(EchoService):
    async def PredictMultiInput(self, request, context):
        if request.input_a and request.input_a[0] == HOLD:
            await asyncio.Event().wait()  # never set: holds the one call the limit allows
        return await super().PredictMultiInput(request, context)


async def measure(refuse: bool, concurrency: int, seconds: float) -> dict:
    server = grpc.aio.server(maximum_concurrent_rpcs=1 if refuse else None)
    pb_grpc.add_ModelServiceServicer_to_server(HoldingEcho(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    holder = None
    if refuse:
        stub = pb_grpc.ModelServiceStub(channel)
        holder = asyncio.ensure_future(stub.PredictMultiInput(pb.PredictMultiInputRequest(input_a=[HOLD] * 10)))
        await asyncio.sleep(0.5)  # the holding call is in its handler
    try:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            before = cpu_seconds(os.getpid())
            load = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "clients", "--target", f"127.0.0.1:{port}", "loadtest", "multi_input",
                "--concurrency", str(concurrency), "--duration", str(seconds), "--no-progress", "--json", out.name,
                cwd=REPO_ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await load.wait()
            cpu = cpu_seconds(os.getpid()) - before
            result = json.loads(Path(out.name).read_text())
    finally:
        if holder is not None:
            holder.cancel()
        await channel.close()
        await server.stop(0)
    calls = result["requests"]
    return {
        "calls": calls,
        "ok": result["ok"],
        "errors": result["errors"],
        "calls_per_s": round(calls / seconds),
        "server_cpu_ms_per_call": round(cpu * 1000 / calls, 4),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    served = await measure(False, args.concurrency, args.seconds)
    refused = await measure(True, args.concurrency, args.seconds)
    report = {
        "concurrency": args.concurrency,
        "served": served,
        "refused_by_grpc_aio": refused,
        "refusal_over_served_cpu": round(refused["server_cpu_ms_per_call"] / served["server_cpu_ms_per_call"], 3),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
