"""Load-test tool: closed loop (N concurrent callers) or open loop (a fixed request rate), bounded by duration
or request count, with live progress and a summary of throughput, latency percentiles and errors (SPEC §8).

It benchmarks the server from a client that shares the machine with it, so the hot loop does as little as
it can: one prebuilt request message reused for every call, the raw generated stub on a grpc.aio channel,
no retries (they would hide errors), and no per-call numpy. The REST protocols (clients/rest.py) do the same over
aiohttp's client: one prebuilt body, keep-alive connections, each answer counted under the gRPC status name its HTTP
status stands for, so both transports report the same codes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, TextIO

import grpc
import numpy as np
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from clients import oip, rest
from clients.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    TYPED_MODELS,
    channel_options,
    open_channel,
    read_token,
    tls_credentials,
    token_metadata,
)
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc

# Row shapes of each typed model's inputs (SPEC §2); rows are prepended.
INPUT_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "multi_input": {"input_a": (10,), "input_b": (20,)},
    "shared_layer": {"input_a": (10,), "input_b": (20,)},
    "residual_cnn": {"image": (28, 28, 1)},
}
# How requests are sent: our typed methods, or the Open Inference Protocol (any model of any OIP server), unary
# or many requests over one ModelStreamInfer stream per channel; or over HTTP to `http_target` (clients/rest.py):
# the OIP with JSON tensors or binary tensors, and TF Serving's REST :predict (row format).
PROTOCOLS = ("typed", "oip", "oip-stream", *rest.PROTOCOLS)
CLIENT_OVERLOAD = "CLIENT_OVERLOAD"  # open loop: not sent because max_outstanding requests were in flight


@dataclass(frozen=True)
class LoadTestConfig:
    """One run. Exactly one of concurrency (closed loop) / rate (open loop), and of duration / requests."""

    target: str  # the gRPC address (HOST:PORT); the REST protocols use http_target
    model: str
    concurrency: int | None = None
    rate: float | None = None
    duration: float | None = None
    requests: int | None = None
    rows_per_request: int = 1
    warmup: float = 0.0
    version: int = 0
    timeout: float = 10.0
    max_outstanding: int = 1000
    channels: int = 1
    seed: int = 0
    tls: bool = False  # TLS with the system's roots; implied by the tls_* files
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    token_file: str | None = None  # its first line is sent as a bearer token
    protocol: str = "typed"  # "typed" (our API), "oip" (ModelInfer), "oip-stream" (ModelStreamInfer), "rest-*"
    http_target: str = ""  # the REST protocols: http(s)://HOST:PORT[/prefix] or HOST:PORT
    progress: TextIO | None = None  # where live progress goes (stderr in the CLI); None: no progress

    def __post_init__(self) -> None:
        problems = []
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol must be one of {', '.join(PROTOCOLS)}, got '{self.protocol}'")
        if self.protocol == "typed" and self.model not in TYPED_MODELS:
            problems.append(f"model must be one of {', '.join(sorted(TYPED_MODELS))}, got '{self.model}'")
        if (self.concurrency is None) == (self.rate is None):
            problems.append("give exactly one of concurrency (closed loop) and rate (open loop)")
        if (self.duration is None) == (self.requests is None):
            problems.append("give exactly one of duration and requests")
        for name in ("concurrency", "rate", "duration", "requests", "rows_per_request", "timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append(f"{name} must be > 0, got {value}")
        if not self.warmup >= 0 or self.max_outstanding < 1 or self.channels < 1:
            problems.append("warmup must be >= 0, max_outstanding and channels >= 1")
        if self.protocol in rest.PROTOCOLS:
            if not self.http_target:
                problems.append(f"protocol {self.protocol} needs http_target (the server's HTTP address)")
            else:
                try:
                    rest.base_url(self.http_target, self.uses_tls)
                except ValueError as error:
                    problems.append(str(error))
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.tls_ca_file or self.tls_cert_file or self.tls_key_file)


@dataclass
class LoadTestResult:
    """The summary of the measured phase. Throughput counts successful requests only."""

    model: str
    mode: str  # "closed" or "open"
    concurrency: int | None
    rate: float | None
    rows_per_request: int
    requests: int  # finished (ok + errors), CLIENT_OVERLOAD included
    ok: int
    errors: dict[str, int]  # status code name -> count
    duration_s: float
    throughput_rps: float
    rows_per_s: float
    latency_ms: dict[str, float | None]  # p50, p90, p99, max, mean over successful requests
    error_latency_ms: dict[str, float | None]  # the same over failed requests: how fast refusals come
    error_latency_ms_by_code: dict[str, dict[str, float | None]]  # the same per status code
    # Open loop: how late calls left against the schedule (the client's own saturation), and latency per status
    # code from the actual send, which leaves that lateness out (the server's or proxy's answer time).
    send_lag_ms: dict[str, float | None]
    latency_from_send_ms_by_code: dict[str, dict[str, float | None]]
    target: str = ""
    version: int = 0
    warmup_s: float = 0.0
    timeout_s: float = 0.0
    protocol: str = "typed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        load = f"concurrency {self.concurrency}" if self.mode == "closed" else f"rate {self.rate:g} req/s"
        lat = "  ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in self.latency_ms.items())
        errors = ", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"
        return "\n".join(
            [
                f"{self.model}: {self.mode} loop, {load}, {self.rows_per_request} row(s) per request",
                f"requests    {self.requests} (ok {self.ok}) in {self.duration_s:.2f} s",
                f"throughput  {self.throughput_rps:.1f} req/s, {self.rows_per_s:.1f} rows/s",
                f"latency ms  {lat}",
                *(
                    [f"send lag ms p99 {self.send_lag_ms['p99']:.2f} (calls sent late: the client was saturated)"]
                    if self.mode == "open" and self.send_lag_ms["p99"]
                    else []
                ),
                f"errors      {errors}",
            ]
        )


class _Stats:
    """Outcomes of one phase; only touched from the event loop thread, so no locks."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.error_latencies: dict[str, list[float]] = {}
        self.from_send: dict[str, list[float]] = {}  # status code name (OK too) -> seconds from the actual send
        self.send_lag: list[float] = []  # open loop: how late each call left against its schedule
        self.errors: Counter[str] = Counter()

    @property
    def finished(self) -> int:
        return len(self.latencies) + sum(self.errors.values())


Call = Callable[..., Any]


async def _call(call: Call, request: Any, timeout: float, stats: _Stats, scheduled: float, sent: float) -> None:
    """One call; its latency counts from `scheduled` (an open loop's plan) and, apart, from when it was `sent`."""
    try:
        await call(request, timeout=timeout)
        code = "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    except rest.CallFailed as error:
        code = error.code
    finished = time.perf_counter()
    if code == "OK":
        stats.latencies.append(finished - scheduled)
    else:
        stats.errors[code] += 1
        stats.error_latencies.setdefault(code, []).append(finished - scheduled)
    stats.from_send.setdefault(code, []).append(finished - sent)


async def _closed(
    calls: list[Call], request: Any, cfg: LoadTestConfig, stats: _Stats, requests: float, duration: float
) -> None:
    """Each caller sends its next request when its previous one returned, until the count or time is used up."""
    end = time.perf_counter() + duration

    async def caller(call: Call) -> None:
        nonlocal requests
        while requests > 0 and time.perf_counter() < end:
            requests -= 1
            now = time.perf_counter()
            await _call(call, request, cfg.timeout, stats, now, now)

    assert cfg.concurrency is not None
    await asyncio.gather(*(caller(calls[i % len(calls)]) for i in range(cfg.concurrency)))


async def _open(
    calls: list[Call], request: Any, cfg: LoadTestConfig, stats: _Stats, requests: float, duration: float
) -> None:
    """Send on schedule whatever returned; latency counts from the scheduled time (no coordinated omission)."""
    assert cfg.rate is not None
    pending: set[asyncio.Task[None]] = set()
    start, i = time.perf_counter(), 0
    while i < requests and i / cfg.rate < duration:
        scheduled = start + i / cfg.rate
        # epoll rounds sleeps up to whole milliseconds: wake up to 1 ms early rather than late (sleep(0) yields).
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter() - 1e-3))
        if len(pending) >= cfg.max_outstanding:
            stats.errors[CLIENT_OVERLOAD] += 1
        else:
            now = time.perf_counter()
            stats.send_lag.append(max(0.0, now - scheduled))
            # Late: the latency counts the lateness; early: from the true send time.
            task = asyncio.create_task(
                _call(calls[i % len(calls)], request, cfg.timeout, stats, min(scheduled, now), now)
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
        i += 1
    if pending:
        await asyncio.gather(*pending)


async def _progress(stats: _Stats, label: str, stream: TextIO, started: float, done: asyncio.Event) -> None:
    """About once a second: elapsed, finished, req/s over the last interval, errors; a last line when done."""
    last_n, last_t = 0, started
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 1.0)
        now, n = time.perf_counter(), stats.finished
        rate = (n - last_n) / (now - last_t)
        end = "\r" if stream.isatty() and not done.is_set() else "\n"
        errors = n - len(stats.latencies)
        stream.write(f"{label} {now - started:6.1f} s  {n} done  {rate:8.1f} req/s  {errors} errors{end}")
        stream.flush()
        last_n, last_t = n, now


async def _phase(
    calls: list[Call], request: Any, cfg: LoadTestConfig, label: str, requests: float, duration: float
) -> tuple[_Stats, float]:
    """Run one phase to its end (in-flight requests included); returns its outcomes and elapsed seconds."""
    stats, started, done = _Stats(), time.perf_counter(), asyncio.Event()
    progress = asyncio.create_task(_progress(stats, label, cfg.progress, started, done)) if cfg.progress else None
    try:
        loop = _closed if cfg.concurrency is not None else _open
        await loop(calls, request, cfg, stats, requests, duration)
    finally:
        done.set()
        if progress:
            await progress
    return stats, time.perf_counter() - started


def build_request(model: str, rows: int, version: int = 0, seed: int = 0) -> Any:
    """One request message of `rows` random float32 rows, built once and reused for every call."""
    rng = np.random.default_rng(seed)
    inputs = {name: rng.random((rows, *shape), dtype=np.float32) for name, shape in INPUT_SHAPES[model].items()}
    return TYPED_MODELS[model].build(inputs, version)


async def _requests_and_calls(
    cfg: LoadTestConfig, channels: list[Any], metadata: Any
) -> tuple[Any, list[Call], list[Any]]:
    """The one request message, a call per channel for the protocol, and the streams to close afterwards."""
    if cfg.protocol == "typed":
        request = build_request(cfg.model, cfg.rows_per_request, cfg.version, cfg.seed)
        method = TYPED_MODELS[cfg.model].method
        return (
            request,
            [functools.partial(getattr(pb_grpc.ModelServiceStub(c), method), metadata=metadata) for c in channels],
            [],
        )
    version = str(cfg.version) if cfg.version else ""
    request = await oip.random_request(
        channels[0], cfg.model, cfg.rows_per_request, version, cfg.seed, cfg.timeout, metadata
    )
    if cfg.protocol == "oip":
        return (
            request,
            [functools.partial(oip_grpc.GRPCInferenceServiceStub(c).ModelInfer, metadata=metadata) for c in channels],
            [],
        )
    streams = [oip.StreamCaller(c, metadata) for c in channels]
    return request, list(streams), streams


async def run_loadtest(cfg: LoadTestConfig) -> LoadTestResult:
    """Warm up (not counted), then run the measured phase and summarise it."""
    if cfg.protocol in rest.PROTOCOLS:
        return await _run_rest(cfg)
    streams: list[Any] = []
    options = channel_options(0, DEFAULT_MAX_MESSAGE_BYTES)
    if cfg.channels > 1:  # otherwise channels with equal options share one connection
        options.append(("grpc.use_local_subchannel_pool", 1))
    credentials = None
    if cfg.tls or cfg.tls_ca_file or cfg.tls_cert_file or cfg.tls_key_file:
        credentials = tls_credentials(cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file)
    metadata = token_metadata(read_token(cfg.token_file))
    channels = [open_channel(grpc.aio, cfg.target, credentials, options) for _ in range(cfg.channels)]
    try:
        with contextlib.suppress(TimeoutError):  # connect first, so that the first calls do not pay for it
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), cfg.timeout)
        request, calls, streams = await _requests_and_calls(cfg, channels, metadata)
        stats, elapsed = await _warm_up_and_measure(calls, request, cfg)
    finally:
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
        await asyncio.gather(*(c.close() for c in channels))
    return _result(cfg, stats, elapsed)


async def _run_rest(cfg: LoadTestConfig) -> LoadTestResult:
    """The same run over HTTP: one aiohttp session whose connector holds as many keep-alive connections as calls
    can be in flight (the concurrency, or the open loop's max_outstanding)."""
    tls = rest.ssl_context(cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file) if cfg.uses_tls else None
    connections = cfg.concurrency if cfg.concurrency is not None else cfg.max_outstanding
    base = rest.base_url(cfg.http_target, cfg.uses_tls)
    client = rest.RestClient(base, connections, cfg.timeout, tls, read_token(cfg.token_file))
    try:
        request = await rest.build_request(client, cfg.protocol, cfg.model, cfg.version, cfg.rows_per_request, cfg.seed)
        stats, elapsed = await _warm_up_and_measure([client], request, cfg)
    finally:
        await client.close()
    return _result(cfg, stats, elapsed)


async def _warm_up_and_measure(calls: list[Call], request: Any, cfg: LoadTestConfig) -> tuple[_Stats, float]:
    if cfg.warmup > 0:
        await _phase(calls, request, cfg, "warm-up", math.inf, cfg.warmup)
    requests = math.inf if cfg.requests is None else cfg.requests
    duration = math.inf if cfg.duration is None else cfg.duration
    return await _phase(calls, request, cfg, "load", requests, duration)


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50, p90, p99, max and mean of durations in seconds, in milliseconds (all None when there are none)."""
    keys = ("p50", "p90", "p99", "max", "mean")
    if not seconds:
        return dict.fromkeys(keys)
    ms = np.asarray(seconds) * 1000.0
    return dict(zip(keys, map(float, [*np.percentile(ms, [50, 90, 99]), ms.max(), ms.mean()]), strict=True))


def _result(cfg: LoadTestConfig, stats: _Stats, elapsed: float) -> LoadTestResult:
    ok = len(stats.latencies)
    return LoadTestResult(
        model=cfg.model,
        mode="closed" if cfg.concurrency is not None else "open",
        concurrency=cfg.concurrency,
        rate=cfg.rate,
        rows_per_request=cfg.rows_per_request,
        requests=stats.finished,
        ok=ok,
        errors=dict(stats.errors),
        duration_s=elapsed,
        throughput_rps=ok / elapsed if elapsed > 0 else 0.0,
        rows_per_s=ok * cfg.rows_per_request / elapsed if elapsed > 0 else 0.0,
        latency_ms=percentiles_ms(stats.latencies),
        error_latency_ms=percentiles_ms([s for latencies in stats.error_latencies.values() for s in latencies]),
        error_latency_ms_by_code={code: percentiles_ms(s) for code, s in sorted(stats.error_latencies.items())},
        send_lag_ms=percentiles_ms(stats.send_lag),
        latency_from_send_ms_by_code={code: percentiles_ms(s) for code, s in sorted(stats.from_send.items())},
        target=cfg.http_target if cfg.protocol in rest.PROTOCOLS else cfg.target,
        version=cfg.version,
        warmup_s=cfg.warmup,
        timeout_s=cfg.timeout,
        protocol=cfg.protocol,
    )


def main(args: argparse.Namespace) -> int:
    """The `loadtest` CLI command (arguments named as the config): 0 when the run completed, 2 for bad settings."""
    settings = {f.name: getattr(args, f.name) for f in fields(LoadTestConfig) if f.name != "progress"}
    try:
        cfg = LoadTestConfig(**settings, progress=None if args.no_progress else sys.stderr)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_loadtest(cfg))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (rest.SetupError, oip.InputError, OSError) as error:  # OSError: the token or TLS files
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    if args.json:
        try:
            with open(args.json, "w") as out:
                json.dump(result.to_dict(), out, indent=2)
        except OSError as error:
            print(f"error: cannot write {args.json}: {error}", file=sys.stderr)
            return 1
    return 0
