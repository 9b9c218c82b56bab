"""The transport-free core: validates requests, runs them on the version the model manager resolves, tracks
in-flight work, and answers the protocols' questions about models from the manager (server/registry/manager.py), the one
owner of model state.

gRPC servicers call this and only convert messages; nothing here imports grpc. A runner (the
batcher) decides how validated inputs reach the model, so batching sits between this core and the model
runtime without either knowing of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
from prometheus_client import REGISTRY, Gauge

from server.base import metrics
from server.base.errors import InvalidInputError, OverloadedError, UnavailableError
from server.base.tensors import InputLimits, TensorSpec, rows_from_flat, validate_inputs
from server.batching.config import BatchingConfig
from server.batching.policy import CostModel
from server.registry import model_config
from server.registry.manager import ACCEPTING, ModelManager, Phase, State, Version
from server.runtimes.base import DEFAULT_SIGNATURE, ModelRuntime

if TYPE_CHECKING:
    from tensorflow_serving.config.model_server_config_pb2 import ModelServerConfig

T = TypeVar("T")


class Runner(Protocol):
    """Runs validated inputs of `rows` rows on a model and returns its outputs (server.batching.batcher.Batcher).

    `deadline` is a time.monotonic() value; work whose deadline has passed must not reach the model. Outputs are
    finite: NaN or infinity the model computed raises InvalidInputError (server.base.tensors.check_finite_outputs),
    checked where it is cheapest, once per model call.
    """

    async def run(
        self, runtime: ModelRuntime, inputs: Mapping[str, np.ndarray], rows: int, deadline: float | None = None
    ) -> dict[str, np.ndarray]: ...

    def cost_model(self, runtime: ModelRuntime) -> CostModel | None:
        """The model version's measured call cost (None before its first call)."""
        ...

    def wait_estimate(self, runtime: ModelRuntime) -> float:
        """Seconds until the work queued now for this version has run."""
        ...


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: int
    versions: tuple[int, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    device: str
    batching: BatchingConfig
    ready: bool
    batched: bool = True  # False: no batch dimension (shapes are whole, one request is one model call)
    cost: CostModel | None = None  # the batcher's measured call cost, None before the version's first call
    queue_wait: float = 0.0  # seconds until the work queued now has run, from that cost
    signature: str = DEFAULT_SIGNATURE  # the signature whose specs these are: what protocols without one serve
    signature_defs: bytes = b""  # the SavedModel's SignatureDefMap, serialized (empty for a .keras file)


@dataclass(frozen=True)
class ModelSummary:
    """A model of the repository as every protocol reports it: `error` says why it failed to load."""

    name: str
    ready: bool
    state: str  # "loading", "available", "failed", "unloading" or "unavailable"
    error: str = ""
    version_states: tuple[tuple[int, str, str], ...] = ()  # (version, state, error) of every version not ended

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(number for number, _, _ in self.version_states)


@dataclass
class ModelStatistics:
    """Per-model request counters for the protocols' statistics RPCs (Prometheus has the histograms)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0  # rows answered
    last_inference_ms: int = 0  # wall-clock time of the last answer, ms since the epoch
    # From the batcher's metrics when asked (see InferenceService.statistics):
    execution_count: int = 0  # model calls (batches)
    compute_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0


@dataclass(frozen=True)
class InferenceResult:
    version: int
    outputs: dict[str, np.ndarray]
    batched: bool = True  # False: the model has no batch dimension (outputs are whole, without a rows axis)


class InferenceService:
    def __init__(
        self,
        manager: ModelManager,
        runner: Runner,
        batching_for: Callable[[str], BatchingConfig],
        admit: Callable[[int], None] = lambda in_flight: None,
    ) -> None:
        """`admit(in_flight)` raises OverloadedError when the server takes no more work (server.dataplane.admission)."""
        self.manager = manager
        self._runner = runner
        self._batching_for = batching_for
        self._admit = admit
        self._stats: dict[str, ModelStatistics] = {}
        self._in_flight = 0
        self._in_flight_gauges: dict[str, Gauge] = {}  # each model's child of IN_FLIGHT, looked up once
        self._idle = asyncio.Event()
        self._idle.set()
        self._released = asyncio.Event()
        self.last_arrival = 0.0  # time.monotonic() of the latest inference request

    @property
    def phase(self) -> Phase:
        return self.manager.phase

    # -- requests ---------------------------------------------------------------------------------

    async def _check_accepting(self) -> None:
        self.last_arrival = time.monotonic()
        if self.phase is Phase.STARTING:
            raise UnavailableError("the server is starting: models are still loading; retry shortly")
        if self.phase in ACCEPTING:
            return
        if self.phase is Phase.CLOSING:
            # Answered only after the listener's GOAWAY: a caller that sends again at once then reaches another
            # replica (or a closed port: UNAVAILABLE), not a closing server that would cancel its call.
            await self._released.wait()
        if self.phase in (Phase.DRAINING, Phase.CLOSING):
            raise UnavailableError("the server is shutting down and accepts no new requests; retry elsewhere")

    def resolve(self, name: str, version: int = 0) -> ModelRuntime:
        """The runtime for a model and version (0 = latest available), from the model manager."""
        runtime = self.manager.resolve(name, version).runtime
        assert runtime is not None
        return runtime

    def decode(self, runtime: ModelRuntime, decode: Callable[[InputLimits], T]) -> T:
        """A protocol's decoding of a request's tensors, given what one request may declare for this version (rows,
        elements, rank): the codecs check declared shapes against it before decoding, so a request of a few bytes
        cannot make the server allocate or broadcast. A refusal is counted as invalid, as validation's are."""
        limits = InputLimits(runtime.inputs, self._batching_for(runtime.name).max_queued_rows, runtime.batched)
        try:
            return decode(limits)
        except InvalidInputError:
            metrics.REJECTED.labels(runtime.name, "invalid").inc()
            raise

    def version_for_label(self, name: str, label: str) -> int:
        """The version a label names now (NOT_FOUND naming the model's labels when it has no such label)."""
        return self.manager.version_for_label(name, label)

    async def reload_config(self, message: ModelServerConfig) -> None:
        """Replace the served models by a model config (TF Serving's ModelServerConfig; relative base paths from the
        config file's folder): refused whole, with the reason, when anything in it is wrong."""
        root = self.manager.config.root if self.manager.config is not None else Path()
        await self.manager.reload(model_config.from_proto(message, root))

    def is_ready(self, name: str, version: int = 0) -> bool:
        """Whether the model (and version, 0 = latest) answers requests now: available, and the server ready."""
        return self.manager.is_ready(name, version)

    async def infer(
        self,
        name: str,
        version: int,
        inputs: Mapping[str, np.ndarray],
        deadline: float | None = None,
        signature: str = "",
    ) -> InferenceResult:
        """Validate and run one request; raises a ServingError subclass for anything the caller must fix.

        `deadline` is a time.monotonic() value after which the request is no longer worth running; `signature` is
        the version's signature to run ("" = the default one: serving_default).
        """
        await self._check_accepting()

        def prepare(runtime: ModelRuntime) -> Mapping[str, np.ndarray]:
            # No batch dimension: the request is validated and run as one row, and answered without it.
            return inputs if runtime.batched else runtime.as_one_row(inputs)

        result = await self._counted(name, version, prepare, deadline, signature)
        if result.batched:
            return result
        return InferenceResult(result.version, {name: value[0] for name, value in result.outputs.items()}, False)

    async def infer_flat(
        self, name: str, version: int, flat_inputs: Mapping[str, np.ndarray], deadline: float | None = None
    ) -> InferenceResult:
        """Like infer, for flat row-major arrays (packed proto fields), reshaped by the model's specs."""
        await self._check_accepting()

        def reshaped(runtime: ModelRuntime) -> Mapping[str, np.ndarray]:
            return {
                key: rows_from_flat(name, runtime.inputs[key], value) if key in runtime.inputs else value
                for key, value in flat_inputs.items()
            }

        return await self._counted(name, version, reshaped, deadline)

    async def _counted(
        self,
        name: str,
        version: int,
        prepare: Callable[[ModelRuntime], Mapping[str, np.ndarray]],
        deadline: float | None,
        signature: str = "",
    ) -> InferenceResult:
        """`_run` on the version the manager resolves, held while it runs (so it is not retired under the request)
        and counted in the model's statistics (success or failure, time, rows)."""
        entry = self.manager.acquire(name, version)
        stats = self._stats.setdefault(name, ModelStatistics())
        started = time.perf_counter_ns()
        try:
            result = await self._run(entry, prepare, deadline, signature)
        except BaseException:
            stats.fail_count += 1
            stats.fail_ns += time.perf_counter_ns() - started
            raise
        finally:
            self.manager.release(entry)
        stats.success_count += 1
        stats.success_ns += time.perf_counter_ns() - started
        stats.inference_count += next(iter(result.outputs.values())).shape[0] if result.outputs else 0
        stats.last_inference_ms = time.time_ns() // 1_000_000
        return result

    async def _run(
        self,
        entry: Version,
        prepare: Callable[[ModelRuntime], Mapping[str, np.ndarray]],
        deadline: float | None,
        signature: str = "",
    ) -> InferenceResult:
        """Admit, prepare and validate the inputs (counting rejections), then run them, tracked as in flight."""
        runtime = entry.runtime
        assert runtime is not None
        if signature:
            runtime = runtime.signature(signature)
        try:
            self._admit(self._in_flight)
        except OverloadedError:
            metrics.REJECTED.labels(runtime.name, "overloaded").inc()
            raise
        try:
            inputs = prepare(runtime)
            rows = validate_inputs(runtime.name, runtime.inputs, inputs)
        except InvalidInputError:
            metrics.REJECTED.labels(runtime.name, "invalid").inc()
            raise
        self._in_flight += 1
        self._idle.clear()
        in_flight = self._in_flight_gauges.get(runtime.name)
        if in_flight is None:
            in_flight = self._in_flight_gauges[runtime.name] = metrics.IN_FLIGHT.labels(runtime.name)
        in_flight.inc()
        try:
            outputs = await self._runner.run(runtime, inputs, rows, deadline)
        finally:
            in_flight.dec()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        return InferenceResult(runtime.version, outputs, runtime.batched)

    # -- introspection ----------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """The models with an available version (a model that failed to load is not among them; see `is_known`)."""
        return self.manager.model_names()

    def is_known(self, name: str) -> bool:
        """A model of the repository, loaded or failed: its name is a metric label of its own."""
        return self.manager.is_known(name)

    def summary(self, name: str) -> ModelSummary:
        """One model's state, from the manager: the one source for ModelReady, GetModelStatus, ListModels,
        RepositoryIndex and health."""
        versions = self.manager.versions(name)
        state, error = self.manager.state_of(name)
        return ModelSummary(
            name,
            self.manager.is_ready(name),
            state,
            error,
            tuple((v.number, v.state.value, v.error) for v in versions),
        )

    def list_models(self) -> list[ModelSummary]:
        """Every model of the repository, failed ones included; UNAVAILABLE while the repository is still loading."""
        if self.phase is Phase.STARTING:
            raise UnavailableError("the server is starting: models are still loading; retry shortly")
        return [self.summary(name) for name in self.manager.known()]

    def statistics(self, name: str) -> ModelStatistics:
        """The model's request counters (raises like `resolve` for an unknown model)."""
        self.manager.versions(name)
        stats = self._stats.get(name, ModelStatistics())

        def sample(metric: str, suffix: str) -> float:  # the batcher's own counts, as /metrics shows them
            return REGISTRY.get_sample_value(f"{metric}{suffix}", {"model": name}) or 0.0

        return dataclasses.replace(
            stats,
            execution_count=int(sample("modelserver_batch_size_rows", "_count")),
            compute_ns=int(sample("modelserver_inference_duration_seconds", "_sum") * 1e9),
            queue_count=int(sample("modelserver_queue_duration_seconds", "_count")),
            queue_ns=int(sample("modelserver_queue_duration_seconds", "_sum") * 1e9),
        )

    def metadata(self, name: str, version: int = 0, signature: str = "") -> ModelMetadata:
        """A version's metadata through one of its signatures ("" = the default one)."""
        runtime = self.resolve(name, version).signature(signature)
        return ModelMetadata(
            name=name,
            version=runtime.version,
            versions=tuple(v.number for v in self.manager.versions(name) if v.state is State.AVAILABLE),
            platform=runtime.platform,
            inputs=tuple(runtime.inputs.values()),
            outputs=tuple(runtime.outputs.values()),
            device=runtime.device,
            batching=self._batching_for(name)
            if runtime.batched
            else dataclasses.replace(self._batching_for(name), enabled=False),
            ready=self.manager.is_ready(name, runtime.version),
            batched=runtime.batched,
            cost=self._runner.cost_model(runtime),
            queue_wait=self._runner.wait_estimate(runtime),
            signature=runtime.signature_name,
            signature_defs=runtime.signature_defs,
        )

    # -- shutdown ---------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def begin_stopping(self) -> None:
        """Not ready from now on, everywhere at once; requests are still served (--shutdown-delay)."""
        self.manager.set_phase(Phase.STOPPING)

    def begin_drain(self) -> None:
        self.manager.set_phase(Phase.DRAINING)

    def begin_closing(self) -> None:
        """Hold new requests unanswered until release_held(), so that callers stop sending while the listener
        closes."""
        self.manager.set_phase(Phase.CLOSING)

    def release_held(self) -> None:
        self._released.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no accepted request is in flight; False when the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
