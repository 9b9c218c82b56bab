"""Server lifecycle: listen, load and warm every model, serve, and drain on SIGTERM/SIGINT (SPEC §6)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from models.registry import BUILTIN_MODELS
from modelserver.v1 import modelserver_pb2
from server import metrics, repository
from server.batching import Batcher
from server.device import select_device
from server.grpc_service import ModelService
from server.inference import InferenceService
from server.rpc import add_service
from server.runtime import ModelRuntime
from server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = modelserver_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _load_model(versions: list[repository.ModelVersion], device: str, batcher: Batcher) -> ModelRuntime:
    """Load the latest version of one model and warm up every batch size (blocking; runs on the executor)."""
    latest = versions[-1]
    started = time.perf_counter()
    try:
        runtime = ModelRuntime(latest.name, latest.version, latest.path, device)
        batcher.warm_up(runtime)
    except Exception as error:
        raise RuntimeError(
            f"cannot load model '{latest.name}' version {latest.version} from {latest.path}: {error}"
        ) from error
    metrics.MODEL_LOAD_DURATION.labels(latest.name).set(time.perf_counter() - started)
    log.info(
        "loaded %s version %d from %s in %.2fs",
        latest.name,
        latest.version,
        latest.path,
        time.perf_counter() - started,
    )
    return runtime


def _prepare_repository(settings: Settings) -> tuple[str, dict[str, list[repository.ModelVersion]]]:
    """Pick the device, export missing built-in models, and list what the repository holds (blocking)."""
    device = select_device(settings.intra_op_threads, settings.inter_op_threads)
    metrics.DEVICE_INFO.labels(device).set(1)
    for definition in BUILTIN_MODELS.values():
        started = time.perf_counter()
        if repository.ensure_exported(
            settings.model_repository, definition.name, definition.version, definition.build, settings.seed
        ):
            log.info(
                "exported %s version %d in %.2fs",
                definition.name,
                definition.version,
                time.perf_counter() - started,
            )
    return device, repository.discover(settings.model_repository)


async def _load_all(
    settings: Settings,
    core: InferenceService,
    batcher: Batcher,
    health_servicer: health.aio.HealthServicer,
    executor: ThreadPoolExecutor,
) -> None:
    loop = asyncio.get_running_loop()
    device, found = await loop.run_in_executor(executor, _prepare_repository, settings)
    for name, versions in found.items():
        await health_servicer.set(name, NOT_SERVING)
        metrics.MODEL_READY.labels(name, str(versions[-1].version)).set(0)
    for versions in found.values():
        runtime = await loop.run_in_executor(executor, _load_model, versions, device, batcher)
        core.add_model(runtime, tuple(v.version for v in versions), settings.batching_for(runtime.name))
    core.start_serving()
    for name, versions in found.items():
        metrics.MODEL_READY.labels(name, str(versions[-1].version)).set(1)
        await health_servicer.set(name, SERVING)
    await health_servicer.set(SERVICE_NAME, SERVING)
    await health_servicer.set("", SERVING)


def _server_credentials(settings: Settings) -> grpc.ServerCredentials:
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def serve(settings: Settings) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code."""
    started = time.perf_counter()
    try:
        settings.model_repository.mkdir(parents=True, exist_ok=True)
        credentials = _server_credentials(settings) if settings.tls_enabled else None
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="model")
    batcher = Batcher(executor, settings.batching_for)
    core = InferenceService(batcher)
    health_servicer = health.aio.HealthServicer()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, NOT_SERVING)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", settings.max_send_message_bytes),
            ("grpc.so_reuseport", 0),  # a port already in use is an error, not a silent second listener
        ]
    )
    add_service(server, ModelService(core), modelserver_pb2.DESCRIPTOR.services_by_name["ModelService"])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as error:
        log.error("cannot listen on %s: %s (is the port in use?)", address, error)
        return 1
    if settings.metrics_port:
        try:
            metrics.serve_metrics(settings.host, settings.metrics_port)
        except OSError as error:
            log.error("cannot serve metrics on %s:%d: %s", settings.host, settings.metrics_port, error)
            return 1
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    await server.start()
    log.info("gRPC listening on %s:%d (%s)", settings.host, port, "TLS" if settings.tls_enabled else "plaintext")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    loading = asyncio.create_task(_load_all(settings, core, batcher, health_servicer, executor))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if loading.done():
        if loading.exception() is not None:
            log.error("startup failed: %s", loading.exception(), exc_info=loading.exception())
            exit_code = 1
            stop.set()
        else:
            log.info("SERVING %s after %.2fs", ", ".join(core.model_names()), time.perf_counter() - started)
    await stopping

    log.info(
        "shutting down: NOT_SERVING, refusing new work, draining %d request(s) within %.1fs",
        core.in_flight,
        settings.grace_period,
    )
    deadline = time.monotonic() + settings.grace_period
    loading.cancel()
    await health_servicer.enter_graceful_shutdown()
    core.begin_drain()
    for name in core.model_names():
        metrics.MODEL_READY.labels(name, str(core.resolve(name).version)).set(0)
    if not await core.wait_idle(settings.grace_period):
        log.warning("grace period over with %d request(s) still running", core.in_flight)
    await server.stop(max(0.0, deadline - time.monotonic()))
    executor.shutdown(wait=True, cancel_futures=True)
    log.info("stopped")
    return exit_code
