"""The Open Inference Protocol's requests and replies as plain data, for its transport-free handlers
(server/protocols/oip/handlers.py). Field names are the protocol's own (its gRPC messages and its REST JSON share
them), so `dataclasses.asdict` of a reply is its JSON body, and the codec (server/protocols/oip/codec.py) turns
them into gRPC messages and back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from server.base.tensors import InputLimits

# A request parameter's value: InferParameter's bool_param, int64_param or uint64_param, double_param or
# string_param (None: a parameter sent without a value).
Parameter = bool | int | float | str | None


@dataclass(frozen=True)
class InferInput:
    """An input tensor as the request declares it; its values are decoded later, within the model's limits."""

    name: str
    datatype: str


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    parameters: Mapping[str, Parameter] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """A ModelInfer request. `decode(limits)` decodes its tensors (name -> array, rows first) once the handler knows
    what the model takes (InputLimits): the declared shapes are checked against it before anything is allocated."""

    model_name: str
    model_version: str
    inputs: tuple[InferInput, ...]
    decode: Callable[[InputLimits], dict[str, np.ndarray]]
    outputs: tuple[RequestedOutput, ...] = ()
    parameters: Mapping[str, Parameter] = field(default_factory=dict)
    id: str = ""


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    data: np.ndarray  # its shape is the output's shape

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: tuple[OutputTensor, ...]
    id: str = ""
    parameters: Mapping[str, Parameter] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True)
class StatisticDuration:
    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class InferStatistics:
    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


@dataclass(frozen=True)
class ModelStatistics:
    name: str
    version: str
    last_inference: int  # ms since the epoch
    inference_count: int  # rows answered
    execution_count: int  # model calls (batches)
    inference_stats: InferStatistics


@dataclass(frozen=True)
class RepositoryModel:
    """A RepositoryIndex entry: one version of a model and its state in Triton's words (READY, LOADING, UNLOADING,
    UNAVAILABLE), with the reason (a load error); a model with no version has an empty version."""

    name: str
    version: str = ""
    state: str = ""
    reason: str = ""
