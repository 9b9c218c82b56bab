"""Every Prometheus metric the server exports, declared once (SPEC §5).

Served by prometheus_client's own HTTP server; the default registry brings the process collectors. With
--workers N each worker writes its values to prometheus_client's multiprocess files and the supervisor serves
their sum (server/workers/supervisor.py); `multiprocess_mode` says how each gauge combines across workers.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)

# The *_created series double every sample for no use in dashboards or alerts.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client

# 100 µs to 10 s: a 1-row dense call is sub-millisecond, a large CNN batch or a queued request seconds.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

REQUESTS = Counter(
    "modelserver_requests",
    "Requests handled, by model, method, final status (gRPC's name, whatever the transport) and transport "
    "(grpc, http).",
    ["model", "method", "code", "transport"],
)
REQUEST_DURATION = Histogram(
    "modelserver_request_duration_seconds",
    "Time from receiving a request to its reply, by model, method and transport (grpc, http).",
    ["model", "method", "transport"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "modelserver_inflight_requests",
    "Inference requests accepted and not yet answered, by model.",
    ["model"],
    multiprocess_mode="livesum",
)
QUEUE_DURATION = Histogram(
    "modelserver_queue_duration_seconds",
    "Time a request (or a chunk of a split request) waited in the batch queue before its batch ran.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "modelserver_inference_duration_seconds",
    "Time of one model call on the device, per executed batch.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "modelserver_batch_size_rows",
    "Request rows per executed model call, before padding.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
BATCHES = Counter(
    "modelserver_batches",
    "Model calls, by why each ran (server/batching/policy.py): full (max_batch_size rows), idle (a batch slot was "
    "free and waiting would not pay), waited (the wait for more rows ended: batch_timeout, or arrivals stopped), "
    "deadline (a queued deadline allowed no more waiting), unbatched (batching off: one request per call).",
    ["model", "reason"],
)
SIGNATURE_ROWS = Counter(
    "modelserver_signature_rows",
    "Request rows answered by the model, by signature (TF Serving's signature_name; serving_default for every "
    "protocol that names none). Each signature is batched on its own; the batch metrics above sum them per model.",
    ["model", "signature"],
)
BATCH_PADDING = Counter(
    "modelserver_batch_padding_rows",
    "Rows added to reach an allowed batch size; computed and then dropped.",
    ["model"],
)
QUEUE_ROWS = Gauge(
    "modelserver_queue_rows",
    "Rows waiting in the model's batch queue.",
    ["model"],
    multiprocess_mode="livesum",
)
REJECTED = Counter(
    "modelserver_rejected_requests",
    "Requests that never reached the model, by reason: overloaded (server-wide admission), queue_full, deadline "
    "(expired, or not meetable behind the queued work), cancelled, invalid.",
    ["model", "reason"],
)
MODEL_READY = Gauge(
    "modelserver_model_ready",
    "1 when the model version is loaded, warmed up and served; 0 otherwise.",
    ["model", "version"],
    multiprocess_mode="livemin",  # ready only when every running worker serves it
)
WARMUP_REQUESTS = Counter(
    "modelserver_warmup_requests",
    "Model calls replayed from a version's warm-up records (assets.extra/tf_serving_warmup_requests) while it "
    "loaded; never counted among the requests above.",
    ["model"],
)
VERSION_LABEL = Gauge(
    "modelserver_version_label_info",
    "1 for each version label of a model (a model config's version_labels) and the version it names now.",
    ["model", "label", "version"],
    multiprocess_mode="max",
)
MODEL_LOAD_DURATION = Gauge(
    "modelserver_model_load_duration_seconds",
    "Seconds the last load of the model took: loading the SavedModel and warming up every batch size.",
    ["model"],
    multiprocess_mode="max",  # the slowest worker
)
DEVICE_INFO = Gauge(
    "modelserver_device_info",
    "1 for the device models run on (GPU when present, CPU otherwise).",
    ["device"],
    multiprocess_mode="max",
)


GC_PAUSE = Histogram(
    "modelserver_gc_pause_seconds",
    "Pauses of Python's garbage collector, by generation; full (generation 2) collections of a large heap stall "
    "every request in flight.",
    ["generation"],
    buckets=LATENCY_BUCKETS,
)


def track_gc_pauses() -> None:
    """Time every garbage collection into modelserver_gc_pause_seconds (gc.callbacks: start and stop)."""
    started: dict[str, float] = {}
    children = {generation: GC_PAUSE.labels(str(generation)) for generation in range(3)}

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["at"] = time.perf_counter()
        elif "at" in started:
            children[info["generation"]].observe(time.perf_counter() - started.pop("at"))

    gc.callbacks.append(callback)


def freeze_startup_heap() -> int:
    """Move everything alive now (TensorFlow, Keras, the loaded models: a large heap that lives as long as the
    process) out of the collector's reach, so full collections walk only what requests allocate. Measured: they
    took up to 141 ms each under load and set the p99 (SPEC §11)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # a scrape every few seconds is not news
        pass


def _only_metrics(app: WSGIApplication) -> WSGIApplication:
    """Answer /metrics and nothing else: other paths get 404, not a copy of the metrics."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: metrics are at /metrics\n"]
        return app(environ, start_response)

    return serve


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> int:
    """Start the /metrics HTTP endpoint in a background thread; returns the port bound (port 0 picks one)."""
    server = make_server(host, port, _only_metrics(make_wsgi_app(registry)), _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server.server_port
