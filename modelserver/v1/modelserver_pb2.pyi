from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictMultiInputRequest(_message.Message):
    __slots__ = ("input_a", "input_b", "version")
    INPUT_A_FIELD_NUMBER: _ClassVar[int]
    INPUT_B_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    input_a: _containers.RepeatedScalarFieldContainer[float]
    input_b: _containers.RepeatedScalarFieldContainer[float]
    version: int
    def __init__(self, input_a: _Optional[_Iterable[float]] = ..., input_b: _Optional[_Iterable[float]] = ..., version: _Optional[int] = ...) -> None: ...

class PredictMultiInputResponse(_message.Message):
    __slots__ = ("output", "version")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    output: _containers.RepeatedScalarFieldContainer[float]
    version: int
    def __init__(self, output: _Optional[_Iterable[float]] = ..., version: _Optional[int] = ...) -> None: ...

class PredictSharedLayerRequest(_message.Message):
    __slots__ = ("input_a", "input_b", "version")
    INPUT_A_FIELD_NUMBER: _ClassVar[int]
    INPUT_B_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    input_a: _containers.RepeatedScalarFieldContainer[float]
    input_b: _containers.RepeatedScalarFieldContainer[float]
    version: int
    def __init__(self, input_a: _Optional[_Iterable[float]] = ..., input_b: _Optional[_Iterable[float]] = ..., version: _Optional[int] = ...) -> None: ...

class PredictSharedLayerResponse(_message.Message):
    __slots__ = ("output_a", "output_b", "version")
    OUTPUT_A_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_B_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    output_a: _containers.RepeatedScalarFieldContainer[float]
    output_b: _containers.RepeatedScalarFieldContainer[float]
    version: int
    def __init__(self, output_a: _Optional[_Iterable[float]] = ..., output_b: _Optional[_Iterable[float]] = ..., version: _Optional[int] = ...) -> None: ...

class PredictResidualCnnRequest(_message.Message):
    __slots__ = ("image", "version")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    image: _containers.RepeatedScalarFieldContainer[float]
    version: int
    def __init__(self, image: _Optional[_Iterable[float]] = ..., version: _Optional[int] = ...) -> None: ...

class PredictResidualCnnResponse(_message.Message):
    __slots__ = ("probabilities", "predicted_class", "version")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    predicted_class: _containers.RepeatedScalarFieldContainer[int]
    version: int
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., predicted_class: _Optional[_Iterable[int]] = ..., version: _Optional[int] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchingSettings(_message.Message):
    __slots__ = ("enabled", "max_batch_size", "batch_timeout_seconds", "max_queued_rows", "allowed_batch_sizes", "policy", "max_batches_in_flight")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_ROWS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCHES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    max_batch_size: int
    batch_timeout_seconds: float
    max_queued_rows: int
    allowed_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    policy: str
    max_batches_in_flight: int
    def __init__(self, enabled: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., batch_timeout_seconds: _Optional[float] = ..., max_queued_rows: _Optional[int] = ..., allowed_batch_sizes: _Optional[_Iterable[int]] = ..., policy: _Optional[str] = ..., max_batches_in_flight: _Optional[int] = ...) -> None: ...

class GetModelMetadataResponse(_message.Message):
    __slots__ = ("name", "version", "versions", "platform", "inputs", "outputs", "device", "batching", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    platform: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    device: str
    batching: BatchingSettings
    ready: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., platform: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., device: _Optional[str] = ..., batching: _Optional[_Union[BatchingSettings, _Mapping]] = ..., ready: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "versions", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    ready: bool
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., ready: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...
