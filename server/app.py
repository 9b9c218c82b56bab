"""Server lifecycle: listen, load and warm every model, serve, and drain on SIGTERM/SIGINT (SPEC §6)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import REGISTRY, CollectorRegistry

from models.registry import BUILTIN_MODELS
from modelserver.v1 import modelserver_pb2
from server.base import metrics
from server.base.errors import ServingError
from server.base.hold import HoldPoints
from server.base.ports import write_port_file
from server.batching.batcher import Batcher
from server.dataplane.admission import AdmissionControl
from server.dataplane.inference import InferenceService
from server.grpc import oip as oip_service
from server.grpc import tfserving as tfserving_service
from server.grpc.drain import CLOSED, IDLE, MARK_METHOD, QUIET, DrainMarker, Siblings, wait_quiet
from server.grpc.health import HealthService
from server.grpc.rpc import GenericOnly, add_service
from server.grpc.security import BearerTokenInterceptor
from server.grpc.typed import ModelService
from server.http import documents as http_documents
from server.http import oip as oip_http
from server.http import tfserving as tfserving_http
from server.http.api import HttpApi
from server.http.server import HttpServer, listening_socket
from server.protocols.oip.handlers import server_version
from server.registry import model_config, repository
from server.registry.manager import ModelManager, Phase
from server.runtimes import warmup
from server.runtimes.base import ModelRuntime
from server.runtimes.device import select_device
from server.runtimes.keras import KerasRuntime
from server.runtimes.savedmodel import SavedModelRuntime
from server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = modelserver_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Seconds without a new call (or an answer, which its caller follows with a new call) before the listener closes,
# and seconds allowed for its GOAWAY to reach clients. A call that arrives after the close, before its client has
# read the GOAWAY, is cancelled by gRPC: 50 ms was shorter than a busy client takes to call again (2 of 10 drains of
# two workers lost calls with the machine's two cores saturated; none in 18 at 0.2 s).
QUIET_BEFORE_CLOSE = 0.2
# Seconds at most of holding new calls before the listener closes anyway (callers that never stop sending, an
# open loop, must not use up the grace period, whose end would cancel the held calls).
MAX_HOLD = 2.0
# Seconds after the signal during which calls still reach the server as accepted work: those the clients had
# sent before it may still be in their socket buffers or ours.
IN_TRANSIT = 0.25
GOAWAY_TRAVEL = 0.2


@dataclass
class _Loading:
    """What opening a model version needs; the device is known once TensorFlow is configured."""

    batcher: Batcher
    holds: HoldPoints
    device: str = ""


def _open_version(loading: _Loading, found: repository.ModelVersion) -> ModelRuntime:
    """Open one version (a SavedModel or a model.keras file), warm up every batch size, and replay the version's own
    warm-up records if it ships them (blocking; runs on the manager's loading thread, off the event loop)."""
    loading.holds.wait("load", found.name)
    runtime_class: type[ModelRuntime] = KerasRuntime if found.format == "keras" else SavedModelRuntime
    runtime = runtime_class(found.name, found.version, found.path, loading.device)
    if loading.holds.folder is not None:
        runtime.before_call = functools.partial(loading.holds.wait, "warmup")
    loading.batcher.warm_up(runtime)
    warmup.replay(runtime)  # the SavedModel's own warm-up records, when it ships them (TF Serving's)
    if loading.holds.folder is not None:
        runtime.before_call = functools.partial(loading.holds.wait, "predict")
    return runtime


def prepare_repository(settings: Settings, holds: HoldPoints) -> str:
    """Pick the device and export missing built-in models (blocking); returns the device. With a model config the
    config names what is served, and nothing is exported."""
    device = select_device(settings.intra_op_threads, settings.inter_op_threads)
    metrics.DEVICE_INFO.labels(device).set(1)
    for definition in BUILTIN_MODELS.values() if settings.model_config_file is None else ():
        started = time.perf_counter()
        if repository.ensure_exported(
            settings.model_repository,
            definition.name,
            definition.version,
            definition.build,
            settings.seed,
            functools.partial(holds.wait, "export", definition.name),
        ):
            log.info(
                "exported %s version %d in %.2fs",
                definition.name,
                definition.version,
                time.perf_counter() - started,
            )
    return device


async def _load_all(settings: Settings, manager: ModelManager, loading: _Loading, executor: ThreadPoolExecutor) -> None:
    """Export, load every model's aspired versions, freeze the start-up heap, then serve (and keep polling)."""
    loading.device = await asyncio.get_running_loop().run_in_executor(
        executor, prepare_repository, settings, loading.holds
    )
    if settings.model_config_file is not None:
        manager.use_config(model_config.read_config(settings.model_config_file))
    await manager.sync(initial=True)
    if manager.config is not None:
        # TF Serving checks labels before loading, so that a label at start-up needs its flag; here they are checked
        # once the start-up load is done: a label on a version that did not become available still stops the start.
        manager.check_labels(manager.config)
    log.info("froze %d startup objects out of the garbage collector's reach", metrics.freeze_startup_heap())
    manager.heap_frozen()
    manager.set_phase(Phase.SERVING)


def _server_credentials(settings: Settings) -> grpc.ServerCredentials:
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _grpc_server(
    settings: Settings, interceptors: list[grpc.aio.ServerInterceptor], reuse_port: bool = False
) -> grpc.aio.Server:
    """The gRPC server with its limits set deliberately (SPEC §6): gRPC's own backlog of received calls is kept
    far above our admission limit (--max-concurrent-rpcs), so that overload is answered by us, with
    RESOURCE_EXHAUSTED, and not by gRPC cancelling calls from its backlog. grpc.aio's own
    maximum_concurrent_rpcs is not used: it counts only calls handed to handlers (health checks and streams
    included), so it never acts while calls wait in gRPC's backlog, which is where they wait under overload, and
    its refusal costs 70 % of a served call in grpc's Cython layer anyway (bench/refusal_cost.py)."""
    streams = []
    if settings.max_concurrent_streams:  # else gRPC's default: no limit per connection
        streams.append(("grpc.max_concurrent_streams", settings.max_concurrent_streams))
    return grpc.aio.server(
        interceptors=interceptors,
        options=[
            *streams,
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", settings.max_send_message_bytes),
            # Alone, a port already in use is an error, not a silent second listener; --workers share it on purpose.
            ("grpc.so_reuseport", int(reuse_port)),
            ("grpc.server.max_pending_requests", settings.max_pending_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_rpcs),
            # Each stream's receive window stays at HTTP/2's 64 KB instead of growing with the bandwidth-delay product
            # probe (4 MB or more per stream): gRPC buffers that much of a stream before its handler reads, so a
            # ModelStreamInfer stream that the server stopped reading (its client reads no answers) would still hold
            # it. A larger message still arrives once it is being read, at about one more round trip.
            ("grpc.http2.bdp_probe", 0),
        ],
    )


async def _drain(settings: Settings, listener: _Listener, core: InferenceService, siblings: Siblings) -> None:
    """Shut down without losing accepted work (SPEC §6): NOT_SERVING at once; serve normally for
    --shutdown-delay; keep serving until every call gRPC received before now has reached a handler; then
    refuse new calls with UNAVAILABLE, finish the accepted ones, and close the listener only once gRPC holds
    no call that our handlers have not answered. With --workers, the last steps are taken by every worker
    together (`siblings`, server/grpc/drain.py). HTTP follows the same phases: every reply says `Connection: close`
    from the signal on, new requests get 503 once draining, and the listener closes with gRPC's, after the requests
    it accepted are answered."""
    server, marker = listener.server, listener.marker
    core.begin_stopping()
    if settings.shutdown_delay > 0:
        log.info("NOT_SERVING; serving on for --shutdown-delay %.1fs so that load balancers stop routing here",
                 settings.shutdown_delay)  # fmt: skip
        await asyncio.sleep(settings.shutdown_delay)
    deadline = time.monotonic() + settings.grace_period

    def remaining() -> float:
        return max(0.0, deadline - time.monotonic())

    # Calls received before the signal (or the delay's end) are accepted work, even while gRPC still holds them.
    # Calls already on their way get IN_TRANSIT more seconds; then two markers: the second one also covers the
    # message reads of calls that reached a handler with the first.
    await asyncio.sleep(min(remaining(), IN_TRANSIT))
    handed_over = await marker.pass_through(remaining()) and await marker.pass_through(remaining())
    handed_over = await listener.stop_http_admitting(remaining()) and handed_over
    core.begin_drain()
    log.info(
        "shutting down: refusing new requests, finishing %d accepted request(s) within %.1fs%s",
        core.in_flight,
        remaining(),
        "" if handed_over else " (gRPC's backlog or HTTP bodies did not clear in time)",
    )
    if not await core.wait_idle(remaining()):
        log.warning("grace period over with %d request(s) still running", core.in_flight)
    answered = time.monotonic()  # the callers answered just now call again at once: quiet counts from here too
    # Closing the listener sends clients a GOAWAY, but gRPC cancels every call that reaches it afterwards, and a
    # caller refused at once sends again at once. So new calls are now held: once every caller's call is held
    # (no arrival for QUIET_BEFORE_CLOSE, and none left inside gRPC), the listener closes, and the held calls get
    # UNAVAILABLE after the GOAWAY has reached their clients. With --workers, each of these steps waits for every
    # worker: a caller sent away by one worker reconnects to a sibling, which must then be refusing at once or
    # holding, never closing (server/grpc/drain.py).
    await siblings.agree(IDLE, remaining())
    core.begin_closing()
    hold_until = time.monotonic() + min(remaining(), MAX_HOLD)
    quiet = functools.partial(wait_quiet, marker, lambda: max(core.last_arrival, answered), QUIET_BEFORE_CLOSE)
    await quiet(hold_until)
    await siblings.agree(QUIET, max(0.0, hold_until - time.monotonic()))
    await quiet(hold_until)  # calls that arrived while the siblings became quiet are held: quiet again
    # Even with the grace period used up, the held calls get their UNAVAILABLE rather than gRPC's CANCELLED.
    grace = max(min(remaining(), 5.0), GOAWAY_TRAVEL + 0.5)
    closed = time.monotonic()
    stopping = asyncio.create_task(server.stop(grace))
    await siblings.agree(CLOSED, grace - GOAWAY_TRAVEL - 0.2)
    await asyncio.sleep(max(0.0, closed + GOAWAY_TRAVEL - time.monotonic()))
    core.release_held()
    await asyncio.gather(stopping, listener.close_http(max(1.0, remaining())))


@dataclass
class _Core:
    """What serves, whatever the transport: the model threads, batcher, admission, loading, manager and core."""

    executor: ThreadPoolExecutor
    batcher: Batcher
    admission: AdmissionControl
    loading: _Loading
    manager: ModelManager
    core: InferenceService

    async def close(self, wait: bool) -> None:
        await self.manager.close()
        await self.admission.stop()
        self.executor.shutdown(wait=wait, cancel_futures=True)


@dataclass
class _Listener:
    """The gRPC transport, listening, the HTTP one (None: --http-port 0), and the metrics endpoint."""

    server: grpc.aio.Server
    marker: DrainMarker
    port: int
    metrics_port: int | None
    http: HttpServer | None = None

    async def stop_http_admitting(self, timeout: float) -> bool:
        """HTTP requests admitted before the drain whose body is still arriving reach the core before it refuses
        new work (the HTTP twin of the drain marker); new ones get 503 from now on."""
        return True if self.http is None else await self.http.app.stop_admitting(timeout)

    async def close_http(self, timeout: float) -> None:
        if self.http is not None:
            await self.http.close(timeout)


def _build_core(settings: Settings, siblings: Siblings) -> _Core:
    """Phase 1, wiring: settings -> registry -> batcher and admission -> data plane (nothing runs yet)."""
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="model")
    batcher = Batcher(executor, settings.batching_for)
    admission = AdmissionControl(settings.max_concurrent_rpcs, seconds_per_call=batcher.seconds_per_call)
    loading = _Loading(batcher, HoldPoints(settings.test_hold_dir))
    manager = ModelManager(
        settings.model_repository,
        functools.partial(_open_version, loading),
        batcher.retire,
        settings.version_policy_for,
        builtin=BUILTIN_MODELS if settings.model_config_file is None else (),
    )
    manager.allow_unavailable_labels = settings.allow_version_labels_for_unavailable_models
    # Ready (SERVING, and calls taken) only once every worker of the server is: a lone server as soon as it is.
    manager.whole_server_serving = siblings.all_serving
    siblings.attach(manager.republish)
    core = InferenceService(manager, batcher, settings.batching_for, admission.check)
    return _Core(executor, batcher, admission, loading, manager, core)


def _add_services(settings: Settings, server: grpc.aio.Server, parts: _Core) -> None:
    """The gRPC services over the data plane: our typed API, the Open Inference Protocol, TF Serving's API, health
    and (optionally) reflection."""
    core = parts.core
    add_service(server, ModelService(core), modelserver_pb2.DESCRIPTOR.services_by_name["ModelService"])
    add_service(server, oip_service.OipService(core, settings.repository_control), oip_service.SERVICE)
    add_service(server, tfserving_service.PredictionService(core), tfserving_service.PREDICTION_SERVICE)
    add_service(server, tfserving_service.ModelService(core), tfserving_service.MODEL_SERVICE)
    health = HealthService(parts.manager, [SERVICE_NAME])
    health_pb2_grpc.add_HealthServicer_to_server(health, GenericOnly(server).as_server())
    if settings.reflection:
        names = (
            SERVICE_NAME,
            oip_service.SERVICE.full_name,
            tfserving_service.PREDICTION_SERVICE.full_name,
            tfserving_service.MODEL_SERVICE.full_name,
            HEALTH_SERVICE,
            reflection.SERVICE_NAME,
        )
        # enable_server_reflection(names, server) would register its methods too (GenericOnly says why not).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
            reflection.aio.ReflectionServicer(names), GenericOnly(server).as_server()
        )


def _http_api(settings: Settings, parts: _Core, tokens: tuple[bytes, ...], registry: CollectorRegistry) -> HttpApi:
    """The REST APIs over the same data plane: TF Serving's, the Open Inference Protocol's, /openapi.json, and
    /metrics when it shares the port."""
    routes = [
        *oip_http.routes(parts.core, settings.repository_control),
        *tfserving_http.routes(parts.core),
        *http_documents.routes(registry if settings.metrics_on_rest_port else None, server_version()),
    ]
    api = HttpApi(
        parts.core, routes, tokens, settings.max_receive_message_bytes, parts.admission, settings.http_header_timeout
    )
    parts.admission.elsewhere = lambda: api.in_progress
    return api


async def _listen_http(
    settings: Settings, parts: _Core, tokens: tuple[bytes, ...], reuse_port: bool, registry: CollectorRegistry
) -> HttpServer:
    """The HTTP listener (raises OSError when its port cannot be had)."""
    assert settings.rest_port is not None
    tls = None
    if settings.tls_enabled:
        assert settings.tls_cert_file is not None and settings.tls_key_file is not None
        tls = (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    server = HttpServer(
        _http_api(settings, parts, tokens, registry), settings.http_idle_timeout, settings.http_header_timeout, tls
    )
    await server.start(listening_socket(settings.host, settings.rest_port, reuse_port))
    return server


async def _listen(
    settings: Settings, parts: _Core, reuse_port: bool, registry: CollectorRegistry = REGISTRY
) -> _Listener | None:
    """Phase 2, listening: the gRPC server with its services and auth, bound and started, and /metrics; models
    are not loaded yet, so health says NOT_SERVING and model calls get UNAVAILABLE. None when a port or a file
    cannot be had (logged)."""
    try:
        settings.model_repository.mkdir(parents=True, exist_ok=True)
        credentials = _server_credentials(settings) if settings.tls_enabled else None
        tokens = settings.auth_tokens()
    except OSError as error:
        log.error("cannot start: %s", error)
        return None
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tokens:
        drain_service = MARK_METHOD.split("/")[1]
        interceptors.append(BearerTokenInterceptor(tokens, open_services=(HEALTH_SERVICE, drain_service)))
    server = _grpc_server(settings, interceptors, reuse_port)
    _add_services(settings, server, parts)
    marker = DrainMarker()
    marker.attach(server)
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as error:
        log.error("cannot listen on %s: %s (is the port in use?)", address, error)
        return None
    http = None
    if settings.rest_port is not None:
        try:
            http = await _listen_http(settings, parts, tokens, reuse_port, registry)
        except OSError as error:
            log.error("cannot listen for HTTP on %s:%d: %s (is the port in use?)", settings.host, settings.rest_port,
                      error)  # fmt: skip
            await server.stop(0)
            return None
        log.info(
            "HTTP listening on %s://%s:%d (TF Serving's REST API /v1, the Open Inference Protocol /v2%s)",
            "https" if settings.tls_enabled else "http",
            settings.host,
            http.port,
            ", /metrics" if settings.metrics_on_rest_port else "",
        )
    metrics_port = None
    if settings.metrics_on_rest_port:
        assert http is not None
        metrics_port = http.port
    elif settings.metrics:
        try:
            metrics_port = metrics.serve_metrics(settings.metrics_address, settings.metrics_port, registry)
        except OSError as error:
            log.error("cannot serve metrics on %s:%d: %s", settings.metrics_address, settings.metrics_port, error)
            return None
        log.info("metrics on http://%s:%d/metrics", settings.metrics_address, metrics_port)
    await server.start()
    parts.admission.start()
    log.info(
        "gRPC listening on %s:%d (%s%s)",
        settings.host,
        port,
        "TLS" if settings.tls_enabled else "plaintext",
        ", bearer-token authentication" if tokens else "",
    )
    if settings.port_file is not None:
        write_port_file(settings.port_file, port, metrics_port, [os.getpid()], http.port if http else None)
    return _Listener(server, marker, port, metrics_port, http)


async def _poll_model_config(manager: ModelManager, path: Path, seconds: float) -> None:
    """Read the model config file every `seconds` (TF Serving's --model_config_file_poll_wait_seconds); one that
    differs from the config in force (HandleReloadConfigRequest's included) replaces it as that RPC does. One that
    cannot be read or is refused is logged once per content, and the config in force keeps serving."""
    refused = b""
    while True:
        await asyncio.sleep(seconds)
        try:
            text = await asyncio.to_thread(path.read_bytes)
        except OSError as error:
            log.warning("cannot read the model config file %s (%s); the config in force keeps serving", path, error)
            continue
        if text == refused:
            continue
        try:
            config = model_config.parse_config(text.decode(errors="replace"), path.parent)
            if manager.config is not None and config.source == manager.config.source:
                continue
            await manager.reload(config, from_file=True)
            log.info("model config file %s reloaded", path)
        except ServingError as error:
            refused = text
            log.error("model config file %s refused; the config in force keeps serving: %s", path, error)
        except Exception:
            refused = text
            log.exception("reloading the model config file %s failed; the config in force keeps serving", path)


class _Signals:
    """SIGTERM/SIGINT set `stop`; SIGHUP rescans the repository while serving (each scan task kept until done)."""

    def __init__(self, manager: ModelManager) -> None:
        self.stop = asyncio.Event()
        self._manager = manager
        self._scans: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._rescan)

    def _rescan(self) -> None:
        if self._manager.phase is Phase.SERVING:
            log.info("SIGHUP: scanning the model repository")
            task = asyncio.get_running_loop().create_task(self._manager.sync())
            self._scans.add(task)
            task.add_done_callback(self._scans.discard)


async def _load(settings: Settings, parts: _Core, signals: _Signals) -> bool | None:
    """Phase 3, loading: export, load and warm every model, then SERVING. True once serving, False when a signal
    came first (nothing was accepted yet), None when start-up failed (logged)."""
    starting = asyncio.create_task(_load_all(settings, parts.manager, parts.loading, parts.executor))
    stopping = asyncio.create_task(signals.stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        return False
    stopping.cancel()
    if starting.exception() is not None:
        log.error("startup failed: %s", starting.exception(), exc_info=starting.exception())
        return None
    return True


async def _stop_while_starting(listener: _Listener, parts: _Core) -> int:
    """Still exporting, loading or warming up: no call has been accepted (model calls get UNAVAILABLE until
    SERVING), so stop at once. The export or load on the executor cannot be interrupted and is not waited for: the
    caller ends the process (server/__main__.py); an export's staging folder is never loaded and the next start
    removes it (server/registry/repository.py)."""
    log.info("signal received while starting: stopping now, nothing accepted yet")
    await listener.server.stop(0)
    await listener.close_http(0)
    await parts.close(wait=False)
    listener.marker.close()
    return 0


async def serve(
    settings: Settings,
    *,
    reuse_port: bool = False,
    notify: Callable[[str], None] | None = None,
    siblings: Siblings | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code. As one of --workers (server/workers/)
    it shares the port (`reuse_port`), tells its supervisor when it is "listening" and "serving" (`notify`), is
    ready only once every worker serves, drains together with them (`siblings`), and its /metrics shows them all
    (`registry`).

    The phases, in order: wire the core, listen, load (until SERVING), serve until a signal, drain, close."""
    siblings = siblings or Siblings()
    started = time.perf_counter()
    metrics.track_gc_pauses()
    parts = _build_core(settings, siblings)
    parts.manager.one_of_workers = reuse_port
    listener = await _listen(settings, parts, reuse_port, registry)
    if listener is None:
        await parts.close(wait=False)
        return 1
    if notify is not None:
        notify("listening")
    signals = _Signals(parts.manager)
    loaded = await _load(settings, parts, signals)
    if loaded is False:
        return await _stop_while_starting(listener, parts)
    exit_code = 0
    polling = config_polling = None
    if loaded:
        log.info("SERVING %s after %.2fs", ", ".join(parts.core.model_names()), time.perf_counter() - started)
        if settings.repository_poll_seconds > 0:
            polling = asyncio.create_task(parts.manager.poll(settings.repository_poll_seconds))
        if settings.model_config_file is not None and settings.model_config_file_poll_seconds > 0:
            config_polling = asyncio.create_task(
                _poll_model_config(parts.manager, settings.model_config_file, settings.model_config_file_poll_seconds)
            )
        if notify is not None:
            notify("serving")
        await signals.stop.wait()
        log.info("signal received: health NOT_SERVING, %d request(s) in flight", parts.core.in_flight)
    else:
        exit_code = 1  # start-up failed: drain what little there is, and exit non-zero
    for task in (polling, config_polling):
        if task is not None:
            task.cancel()
    await _drain(settings, listener, parts.core, siblings)
    await parts.close(wait=True)
    listener.marker.close()
    log.info("stopped")
    return exit_code
