"""Typed clients (sync and asyncio) for modelserver.v1 and the standard health service.

Inputs are array-likes of rows; outputs come back as numpy arrays with rows first, shaped like the
Keras model's own outputs. Every call has a deadline; UNAVAILABLE (starting, draining, connection
refused) is retried with exponential backoff by gRPC itself, through the channel's service config, and so is a
CANCELLED that the client did not ask for: the server never answers CANCELLED (SPEC §3), so one can only come from
the transport (gRPC cancels a call that reaches a server in the instant its listener closes, before any handler
saw it), and these methods are read-only. A call the client itself cancels is never retried.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.oip import OipClient
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20


def _service_config(attempts: int) -> str:
    retry = {
        "maxAttempts": attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
    }
    services = [{"service": "modelserver.v1.ModelService"}, {"service": "grpc.health.v1.Health"}]
    return json.dumps({"methodConfig": [{"name": services, "retryPolicy": retry}]})


def channel_options(retries: int, max_message_bytes: int) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if retries > 0:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", _service_config(min(retries + 1, 5)))]
    else:
        options.append(("grpc.enable_retries", 0))
    return options


def _floats(rows: Any) -> list[float]:
    """Rows (any array-like) flattened row-major, as the packed field wants them."""
    return np.asarray(rows, dtype=np.float32).ravel().tolist()


@dataclass(frozen=True)
class _TypedModel:
    """How one built-in model's typed method maps numpy inputs to its request and its response back."""

    method: str
    build: Callable[[Mapping[str, Any], int], Any]
    parse: Callable[[Any], dict[str, np.ndarray]]


def _column(values: Any, per_row: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, per_row)


TYPED_MODELS: dict[str, _TypedModel] = {
    "multi_input": _TypedModel(
        "PredictMultiInput",
        lambda x, v: pb.PredictMultiInputRequest(
            input_a=_floats(x["input_a"]), input_b=_floats(x["input_b"]), version=v
        ),
        lambda r: {"output": _column(r.output, 1)},
    ),
    "shared_layer": _TypedModel(
        "PredictSharedLayer",
        lambda x, v: pb.PredictSharedLayerRequest(
            input_a=_floats(x["input_a"]), input_b=_floats(x["input_b"]), version=v
        ),
        lambda r: {"output_a": _column(r.output_a, 1), "output_b": _column(r.output_b, 1)},
    ),
    "residual_cnn": _TypedModel(
        "PredictResidualCnn",
        lambda x, v: pb.PredictResidualCnnRequest(image=_floats(x["image"]), version=v),
        lambda r: {
            "probabilities": _column(r.probabilities, 10),
            "predicted_class": np.asarray(r.predicted_class, dtype=np.int64),
        },
    ),
}


def _typed(model: str) -> _TypedModel:
    try:
        return TYPED_MODELS[model]
    except KeyError:
        raise ValueError(
            f"no typed predict method for model '{model}'; typed methods exist for: {', '.join(TYPED_MODELS)}"
        ) from None


def open_channel(
    module: Any, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
) -> Any:
    """A channel from `grpc` or `grpc.aio` (same signatures): TLS when credentials are given."""
    if credentials is not None:
        return module.secure_channel(target, credentials, options)
    return module.insecure_channel(target, options)


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: the CA that signed the server's certificate (None: the system's
    roots), and a client certificate and key for mutual TLS."""

    def read(path: str | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries a bearer token (None: no authentication)."""
    return (("authorization", f"Bearer {token}"),) if token else None


def read_token(path: str | None) -> str | None:
    """The first non-empty line of a token file."""
    if path is None:
        return None
    return next((line.strip() for line in Path(path).read_text().splitlines() if line.strip()), None)


def health_status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class ModelServerClient:
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = 3,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._channel = open_channel(grpc, target, credentials, channel_options(retries, max_message_bytes))
        self._stub = pb_grpc.ModelServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = token_metadata(token)
        self.timeout = timeout

    def _call_options(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout or self.timeout, "metadata": self._metadata}

    def __enter__(self) -> ModelServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def predict(
        self, model: str, inputs: Mapping[str, Any], version: int = 0, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        """Predict with a built-in model's typed method; inputs map input names to rows."""
        typed = _typed(model)
        call = getattr(self._stub, typed.method)
        return typed.parse(call(typed.build(inputs, version), **self._call_options(timeout)))

    def predict_any(
        self, model: str, inputs: Mapping[str, Any], version: int = 0, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        """Predict with any model of the repository (a user's too) through the Open Inference Protocol;
        raises clients.oip.InputError, naming the expected inputs, for a missing or unknown input."""
        return OipClient(self._channel, self._metadata).predict(model, inputs, version, timeout or self.timeout)

    def predict_multi_input(self, input_a: Any, input_b: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        return self.predict("multi_input", {"input_a": input_a, "input_b": input_b}, **kwargs)

    def predict_shared_layer(self, input_a: Any, input_b: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        return self.predict("shared_layer", {"input_a": input_a, "input_b": input_b}, **kwargs)

    def predict_residual_cnn(self, image: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        return self.predict("residual_cnn", {"image": image}, **kwargs)

    def metadata(self, model: str, version: int = 0, timeout: float | None = None) -> pb.GetModelMetadataResponse:
        request = pb.GetModelMetadataRequest(name=model, version=version)
        response: pb.GetModelMetadataResponse = self._stub.GetModelMetadata(request, **self._call_options(timeout))
        return response

    def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        response: pb.ListModelsResponse = self._stub.ListModels(pb.ListModelsRequest(), **self._call_options(timeout))
        return response

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The health status name (SERVING, NOT_SERVING, ...) of the server ("") or one model or service."""
        request = health_pb2.HealthCheckRequest(service=service)
        # The stubs omit the methods that HealthStub's __init__ sets.
        return health_status_name(self._health.Check(request, **self._call_options(timeout)))  # type: ignore[attr-defined]


class AsyncModelServerClient:
    """asyncio client with the same methods as ModelServerClient, awaitable. Use with `async with`."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = 3,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._channel = open_channel(grpc.aio, target, credentials, channel_options(retries, max_message_bytes))
        self._stub = pb_grpc.ModelServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = token_metadata(token)
        self.timeout = timeout

    def _call_options(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout or self.timeout, "metadata": self._metadata}

    async def __aenter__(self) -> AsyncModelServerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def predict(
        self, model: str, inputs: Mapping[str, Any], version: int = 0, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        typed = _typed(model)
        call = getattr(self._stub, typed.method)
        return typed.parse(await call(typed.build(inputs, version), **self._call_options(timeout)))

    async def predict_multi_input(self, input_a: Any, input_b: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        return await self.predict("multi_input", {"input_a": input_a, "input_b": input_b}, **kwargs)

    async def predict_shared_layer(self, input_a: Any, input_b: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        return await self.predict("shared_layer", {"input_a": input_a, "input_b": input_b}, **kwargs)

    async def predict_residual_cnn(self, image: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        return await self.predict("residual_cnn", {"image": image}, **kwargs)

    async def metadata(self, model: str, version: int = 0, timeout: float | None = None) -> pb.GetModelMetadataResponse:
        request = pb.GetModelMetadataRequest(name=model, version=version)
        response: pb.GetModelMetadataResponse = await self._stub.GetModelMetadata(
            request, **self._call_options(timeout)
        )
        return response

    async def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        response: pb.ListModelsResponse = await self._stub.ListModels(
            pb.ListModelsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
        )
        return response

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        # The stubs omit the methods that HealthStub's __init__ sets.
        return health_status_name(await self._health.Check(request, **self._call_options(timeout)))  # type: ignore[attr-defined]
