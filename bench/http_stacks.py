"""Which HTTP stack serves the REST API (issue 23): the candidates that run on the gRPC server's asyncio loop,
side by side in one run, on the same request.

Each candidate serves one endpoint, `POST /v2/models/multi_input/infer`, that does what the REST API does around
the model: parse an Open Inference Protocol JSON body (1 row of multi_input) with orjson, build the arrays with
numpy, and answer a JSON body of the same size (orjson writes the arrays). No model runs: what differs between the
candidates is the HTTP stack alone. Candidates:

- `uvicorn`: uvicorn's `Server.serve()` on the running loop, httptools' parser, a bare ASGI app (no framework);
- `aiohttp`: aiohttp's web server (its C parser) on the running loop, through `AppRunner` and a `TCPSite`.

The load: a closed loop of `concurrency` callers, aiohttp's client on keep-alive connections, in its own process;
each candidate in turn, several interleaved rounds, the median of each kept. The server's CPU time per request
(/proc) is reported beside the rates: on 2 cores it decides throughput.

Usage: python -m bench.http_stacks [--duration S] [--rounds N] [--concurrency 1,16,64] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

STACKS = ("uvicorn", "aiohttp")
BODY = orjson.dumps(
    {
        "id": "1",
        "inputs": [
            {"name": "input_a", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16},
            {"name": "input_b", "datatype": "FP32", "shape": [1, 8], "data": [0.25] * 8},
        ],
    }
)


def answer(body: bytes) -> bytes:
    """What every candidate does per request: parse, decode to arrays, encode a reply."""
    request = orjson.loads(body)
    outputs = []
    for tensor in request["inputs"]:
        array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        outputs.append({"name": tensor["name"], "datatype": "FP32", "shape": list(array.shape), "data": array})
    return orjson.dumps(
        {"model_name": "multi_input", "model_version": "1", "id": request.get("id", ""), "outputs": outputs},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


async def serve_uvicorn(sock: socket.socket) -> None:
    import uvicorn

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        reply = answer(b"".join(chunks))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    config = uvicorn.Config(app, http="httptools", lifespan="off", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    await server.serve(sockets=[sock])


async def serve_aiohttp(sock: socket.socket) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        return web.Response(body=answer(await request.read()), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    await asyncio.Event().wait()


def server_main(stack: str, port: int) -> None:
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP (with proto 0 uvicorn's
    # replies, headers and body written apart, wait 40 ms for a delayed ACK); aiohttp sets it itself.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    asyncio.run(serve_uvicorn(sock) if stack == "uvicorn" else serve_aiohttp(sock))


async def _load(port: int, concurrency: int, duration: float) -> dict:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v2/models/multi_input/infer"
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def caller(stop: float, record: bool) -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                sent = time.perf_counter()
                async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as reply:
                    await reply.read()
                    ok = reply.status == 200
                if record:
                    latencies.append(time.perf_counter() - sent)
                    errors += not ok

        warm = time.perf_counter() + 0.5
        await asyncio.gather(*(caller(warm, False) for _ in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(caller(started + duration, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def client_main(port: int, concurrency: int, duration: float) -> None:
    print(json.dumps(asyncio.run(_load(port, concurrency, duration))))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--c", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        server_main(args.serve, args.port)
        return 0
    if args.load:
        client_main(args.port, args.c, args.duration)
        return 0
    servers = {}
    for stack in STACKS:
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "bench.http_stacks", "--serve", stack, "--port", str(port)])
        servers[stack] = (process, port)
    try:
        for _, port in servers.values():
            wait_listening(port)
        results: dict[str, dict[str, list[dict]]] = {}
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            for _ in range(args.rounds):
                for stack, (process, port) in servers.items():
                    before = cpu_seconds(process.pid)
                    client = subprocess.run(
                        [sys.executable, "-m", "bench.http_stacks", "--load", "--port", str(port),
                         "--c", str(concurrency), "--duration", str(args.duration)],
                        check=True, capture_output=True, text=True,
                    )  # fmt: skip
                    figures = json.loads(client.stdout)
                    # The warm-up's requests are in the CPU time too: per request, over the measured ones only,
                    # this overstates both candidates alike.
                    figures["server_cpu_ms_per_request"] = (
                        (cpu_seconds(process.pid) - before) * 1000 / max(1, figures["requests"])
                    )
                    results.setdefault(f"c={concurrency}", {}).setdefault(stack, []).append(figures)
                    print(f"c={concurrency} {stack}: {figures['rps']:.0f} req/s", file=sys.stderr, flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
    summary: dict[str, Any] = {"duration_s": args.duration, "rounds": args.rounds, "loads": {}}
    for load, by_stack in results.items():
        medians = {}
        for stack, rounds in by_stack.items():
            medians[stack] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        medians["aiohttp/uvicorn rps"] = medians["aiohttp"]["rps"] / medians["uvicorn"]["rps"]
        summary["loads"][load] = medians
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
