"""The transport-free core: resolves models, validates requests, runs them, tracks in-flight work.

gRPC servicers call this and only convert messages; nothing here imports grpc. A runner (the
batcher) decides how validated inputs reach the model, so batching sits between this core and the model
runtime without either knowing of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from prometheus_client import REGISTRY

from server import metrics
from server.batching import BatchingConfig
from server.errors import InvalidInputError, ModelNotFoundError, OverloadedError, UnavailableError, quoted
from server.runtime import ModelRuntime
from server.tensors import TensorSpec, check_finite_outputs, rows_from_flat, validate_inputs


class Runner(Protocol):
    """Runs validated inputs of `rows` rows on a model and returns its outputs (server.batching.Batcher).

    `deadline` is a time.monotonic() value; work whose deadline has passed must not reach the model.
    """

    async def run(
        self, runtime: ModelRuntime, inputs: Mapping[str, np.ndarray], rows: int, deadline: float | None = None
    ) -> dict[str, np.ndarray]: ...


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"  # new requests are refused with UNAVAILABLE, accepted ones finish
    CLOSING = "closing"  # new requests are held, then refused once the listener has told clients to go away


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


@dataclass(frozen=True)
class ModelSummary:
    """A model of the repository as every protocol reports it: `error` says why it failed to load."""

    name: str
    versions: tuple[int, ...]
    ready: bool
    state: str  # "loading", "available", "failed" or "unloading"
    error: str = ""


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


@dataclass
class _Model:
    runtimes: dict[int, ModelRuntime] = field(default_factory=dict)
    versions_on_disk: tuple[int, ...] = ()
    batching: BatchingConfig = field(default_factory=lambda: BatchingConfig(enabled=False))
    error: str = ""  # why the model failed to load; it is then known but never served
    stats: ModelStatistics = field(default_factory=ModelStatistics)


@dataclass(frozen=True)
class InferenceResult:
    version: int
    outputs: dict[str, np.ndarray]


class InferenceService:
    def __init__(self, runner: Runner, admit: Callable[[int], None] = lambda in_flight: None) -> None:
        """`admit(in_flight)` raises OverloadedError when the server takes no more work (server.admission)."""
        self._runner = runner
        self._admit = admit
        self._models: dict[str, _Model] = {}
        self._failed: dict[str, _Model] = {}
        self.phase = Phase.STARTING
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._released = asyncio.Event()
        self.last_arrival = 0.0  # time.monotonic() of the latest inference request

    # -- registration, done once at startup ------------------------------------------------------

    def add_model(
        self,
        runtime: ModelRuntime,
        versions_on_disk: tuple[int, ...],
        batching: BatchingConfig,
    ) -> None:
        model = self._models.setdefault(runtime.name, _Model())
        model.runtimes[runtime.version] = runtime
        model.versions_on_disk = versions_on_disk
        model.batching = batching

    def add_failed_model(self, name: str, versions_on_disk: tuple[int, ...], error: str) -> None:
        """Record a model that did not load: listed and reported not ready, refused with UNAVAILABLE."""
        self._failed[name] = _Model(versions_on_disk=versions_on_disk, error=error)

    def start_serving(self) -> None:
        self.phase = Phase.SERVING

    # -- requests ---------------------------------------------------------------------------------

    async def _check_accepting(self) -> None:
        self.last_arrival = time.monotonic()
        if self.phase is Phase.STARTING:
            raise UnavailableError("the server is starting: models are still loading; retry shortly")
        if self.phase is Phase.CLOSING:
            # Answered only after the listener's GOAWAY: a caller that sends again at once then reaches another
            # replica (or a closed port: UNAVAILABLE), not a closing server that would cancel its call.
            await self._released.wait()
        if self.phase in (Phase.DRAINING, Phase.CLOSING):
            raise UnavailableError("the server is shutting down and accepts no new requests; retry elsewhere")

    def resolve(self, name: str, version: int = 0) -> ModelRuntime:
        """The runtime for a model and version (0 = latest loaded)."""
        model = self._models.get(name)
        if model is None and name in self._failed:
            raise UnavailableError(f"model '{name}' failed to load and is not served: {self._failed[name].error}")
        if model is None and self.phase is Phase.STARTING:
            raise UnavailableError(f"the server is starting: model {quoted(name)} may still be loading; retry shortly")
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"no model named {quoted(name)}; available models: {known}")
        if version == 0:
            return model.runtimes[max(model.runtimes)]
        runtime = model.runtimes.get(version)
        if runtime is None:
            loaded = ", ".join(str(v) for v in sorted(model.runtimes))
            raise ModelNotFoundError(
                f"model '{name}' has no loaded version {version}; loaded versions: {loaded} (0 = latest)"
            )
        return runtime

    def is_ready(self, name: str, version: int = 0) -> bool:
        """Whether the model (and version, 0 = latest) answers requests now: loaded, and the server serving."""
        model = self._models.get(name)
        if model is None or self.phase is not Phase.SERVING:
            return False
        return version == 0 or version in model.runtimes

    async def infer(
        self, name: str, version: int, inputs: Mapping[str, np.ndarray], deadline: float | None = None
    ) -> InferenceResult:
        """Validate and run one request; raises a ServingError subclass for anything the caller must fix.

        `deadline` is a time.monotonic() value after which the request is no longer worth running.
        """
        await self._check_accepting()
        runtime = self.resolve(name, version)
        if runtime.batched:
            return await self._counted(runtime, lambda runtime: inputs, deadline)
        # No batch dimension: the request is validated and run as one row, and answered without it.
        result = await self._counted(runtime, lambda runtime: runtime.as_one_row(inputs), deadline)
        return InferenceResult(result.version, {name: value[0] for name, value in result.outputs.items()})

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

        return await self._counted(self.resolve(name, version), reshaped, deadline)

    async def _counted(
        self,
        runtime: ModelRuntime,
        prepare: Callable[[ModelRuntime], Mapping[str, np.ndarray]],
        deadline: float | None,
    ) -> InferenceResult:
        """`_run`, counted in the model's statistics (success or failure, time, rows)."""
        stats = self._models[runtime.name].stats
        started = time.perf_counter_ns()
        try:
            result = await self._run(runtime, prepare, deadline)
        except BaseException:
            stats.fail_count += 1
            stats.fail_ns += time.perf_counter_ns() - started
            raise
        stats.success_count += 1
        stats.success_ns += time.perf_counter_ns() - started
        stats.inference_count += next(iter(result.outputs.values())).shape[0] if result.outputs else 0
        stats.last_inference_ms = time.time_ns() // 1_000_000
        return result

    async def _run(
        self,
        runtime: ModelRuntime,
        prepare: Callable[[ModelRuntime], Mapping[str, np.ndarray]],
        deadline: float | None,
    ) -> InferenceResult:
        """Admit, prepare and validate the inputs (counting rejections), then run them, tracked as in flight."""
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
        in_flight = metrics.IN_FLIGHT.labels(runtime.name)
        in_flight.inc()
        try:
            outputs = await self._runner.run(runtime, inputs, rows, deadline)
        finally:
            in_flight.dec()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        check_finite_outputs(runtime.name, outputs)
        return InferenceResult(runtime.version, outputs)

    # -- introspection ----------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """The loaded models (a model that failed to load is not among them; see `is_known`)."""
        return sorted(self._models)

    def is_known(self, name: str) -> bool:
        """A model of the repository, loaded or failed: its name is a metric label of its own."""
        return name in self._models or name in self._failed

    def summary(self, name: str) -> ModelSummary:
        """One model's state, the one source for ModelReady, GetModelStatus, ListModels and health."""
        failed = self._failed.get(name)
        if failed is not None:
            return ModelSummary(name, failed.versions_on_disk, False, "failed", failed.error)
        model = self._models.get(name)
        if model is None:
            self.resolve(name)  # raises the right error: UNAVAILABLE while starting, else NOT_FOUND
        assert model is not None
        state = {Phase.STARTING: "loading", Phase.SERVING: "available"}.get(self.phase, "unloading")
        return ModelSummary(name, model.versions_on_disk, self.phase is Phase.SERVING, state)

    def list_models(self) -> list[ModelSummary]:
        """Every model of the repository, failed ones included; UNAVAILABLE while the repository is still loading."""
        if self.phase is Phase.STARTING:
            raise UnavailableError("the server is starting: models are still loading; retry shortly")
        return [self.summary(name) for name in sorted({*self._models, *self._failed})]

    def statistics(self, name: str) -> ModelStatistics:
        """The model's request counters (raises like `resolve` for an unknown model)."""
        if name not in self._models:
            self.resolve(name)
        stats = self._models[name].stats

        def sample(metric: str, suffix: str) -> float:  # the batcher's own counts, as /metrics shows them
            return REGISTRY.get_sample_value(f"{metric}{suffix}", {"model": name}) or 0.0

        return dataclasses.replace(
            stats,
            execution_count=int(sample("modelserver_batch_size_rows", "_count")),
            compute_ns=int(sample("modelserver_inference_duration_seconds", "_sum") * 1e9),
            queue_count=int(sample("modelserver_queue_duration_seconds", "_count")),
            queue_ns=int(sample("modelserver_queue_duration_seconds", "_sum") * 1e9),
        )

    def metadata(self, name: str, version: int = 0) -> ModelMetadata:
        runtime = self.resolve(name, version)
        model = self._models[name]
        return ModelMetadata(
            name=name,
            version=runtime.version,
            versions=model.versions_on_disk,
            platform="tensorflow_savedmodel",
            inputs=tuple(runtime.inputs.values()),
            outputs=tuple(runtime.outputs.values()),
            device=runtime.device,
            batching=model.batching if runtime.batched else dataclasses.replace(model.batching, enabled=False),
            ready=self.phase is Phase.SERVING,
            batched=runtime.batched,
        )

    # -- shutdown ---------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def begin_drain(self) -> None:
        self.phase = Phase.DRAINING

    def begin_closing(self) -> None:
        """Hold new requests unanswered until release_held(), so that callers stop sending while the listener
        closes."""
        self.phase = Phase.CLOSING

    def release_held(self) -> None:
        self._released.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no accepted request is in flight; False when the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
