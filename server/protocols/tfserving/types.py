"""TensorFlow Serving's requests and replies as plain data, for its transport-free handlers
(server/protocols/tfserving/handlers.py); the codec (server/protocols/tfserving/codec.py) turns its gRPC messages
into these and back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from server.base.tensors import InputLimits


@dataclass(frozen=True)
class ModelSpec:
    """Which servable a request asks for (TF Serving's ModelSpec)."""

    name: str
    version: int = 0  # 0: the latest
    version_label: str | None = None  # a label, asked for instead of a number (this server keeps none)
    signature_name: str = ""  # "": the default signature


@dataclass(frozen=True)
class PredictRequest:
    """A Predict request. `decode(limits)` decodes its input tensors (name -> array) once the handler knows what the
    model takes (InputLimits): the declared shapes are checked against it before anything is allocated."""

    model_spec: ModelSpec
    decode: Callable[[InputLimits], dict[str, np.ndarray]]
    output_filter: tuple[str, ...] = ()


@dataclass(frozen=True)
class PredictResponse:
    model_spec: ModelSpec  # the version that answered, and the signature
    outputs: dict[str, np.ndarray]  # the outputs asked for, in order


@dataclass(frozen=True)
class ModelVersionStatus:
    """A version's state in TF Serving's words (START, LOADING, AVAILABLE, UNLOADING, END) and, for a version that
    failed to load, its error (`error_code`: a tensorflow.error.Code, 0 = OK)."""

    version: int
    state: str
    error_code: int = 0
    error_message: str = ""
