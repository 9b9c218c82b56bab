"""The transport-free core: resolves models, validates requests, runs them, tracks in-flight work.

gRPC servicers call this and only convert messages; nothing here imports grpc. A runner (the
batcher) decides how validated inputs reach the model, so batching sits between this core and the model
runtime without either knowing of it.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

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


@dataclass
class _Model:
    runtimes: dict[int, ModelRuntime] = field(default_factory=dict)
    versions_on_disk: tuple[int, ...] = ()
    batching: BatchingConfig = field(default_factory=lambda: BatchingConfig(enabled=False))


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

    async def infer(
        self, name: str, version: int, inputs: Mapping[str, np.ndarray], deadline: float | None = None
    ) -> InferenceResult:
        """Validate and run one request; raises a ServingError subclass for anything the caller must fix.

        `deadline` is a time.monotonic() value after which the request is no longer worth running.
        """
        await self._check_accepting()
        return await self._run(self.resolve(name, version), lambda runtime: inputs, deadline)

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

        return await self._run(self.resolve(name, version), reshaped, deadline)

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
        return sorted(self._models)

    def list_models(self) -> list[ModelMetadata]:
        """Every loaded model's metadata; UNAVAILABLE while the repository is still loading."""
        if self.phase is Phase.STARTING:
            raise UnavailableError("the server is starting: models are still loading; retry shortly")
        return [self.metadata(name) for name in self.model_names()]

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
            batching=model.batching,
            ready=self.phase is Phase.SERVING,
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
