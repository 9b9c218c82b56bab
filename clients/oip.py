"""Open Inference Protocol client pieces: call any model of the repository (names, datatypes and shapes from
its ModelMetadata), and the requests and stream caller that the load tester uses against any OIP server.

Tensors go raw (little-endian bytes in `raw_input_contents`), the protocol's compact form; replies are read raw
(what Triton and modelserver send) or typed (what some other servers send). A model whose ModelConfig says
`max_batch_size: 0` has no batch dimension: its metadata shapes are whole, and a request is one input of that
shape. The message classes are the stubs tritonclient ships; numpy <-> datatype conversions are tritonclient's
public utils.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, serialize_byte_tensor, triton_to_np_dtype


class InputError(ValueError):
    """The caller's inputs do not match the model's: raised before anything is sent."""


def prepare_inputs(metadata: pb.ModelMetadataResponse, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inputs (name -> rows, e.g. from JSON) as arrays of the model's datatypes; a missing or unknown name is an
    InputError that lists what the model expects."""
    specs = {t.name: t for t in metadata.inputs}
    missing, unknown = sorted(set(specs) - set(inputs)), sorted(set(inputs) - set(specs))
    if missing or unknown:
        problems = [f"missing input {', '.join(repr(n) for n in missing)}"] if missing else []
        problems += [f"no input named {', '.join(repr(n) for n in unknown)}"] if unknown else []
        expected = ", ".join(f"{t.name} ({t.datatype} {list(t.shape)})" for t in metadata.inputs)
        raise InputError(f"model '{metadata.name}': {'; '.join(problems)}; expected inputs: {expected}")
    arrays = {}
    for name, spec in specs.items():
        if spec.datatype == "BYTES":
            arrays[name] = np.asarray(inputs[name], dtype=object)
        else:
            try:
                arrays[name] = np.asarray(inputs[name], dtype=triton_to_np_dtype(spec.datatype))
            except (TypeError, ValueError) as error:
                raise InputError(f"model '{metadata.name}' input '{name}' must hold {spec.datatype}: {error}") from None
    return arrays


def build_request(model: str, arrays: Mapping[str, np.ndarray], version: str = "", request_id: str = "") -> Any:
    """A ModelInferRequest with every input raw; the datatype is each array's own."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in arrays.items():
        if array.dtype == np.dtype(object):
            datatype, raw = "BYTES", serialize_byte_tensor(array).item()
        else:
            little_endian = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
            datatype, raw = np_to_triton_dtype(array.dtype), little_endian.tobytes()
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(raw)
    return request


def decode_response(response: Any) -> dict[str, np.ndarray]:
    """Every output of a ModelInferResponse as a numpy array (raw or typed contents)."""
    outputs = {}
    for index, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        if index < len(response.raw_output_contents):
            raw = response.raw_output_contents[index]
            if tensor.datatype == "BYTES":
                outputs[tensor.name] = deserialize_bytes_tensor(raw).reshape(shape)
            else:
                outputs[tensor.name] = np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype)).reshape(shape)
        else:
            field = next((f for f, _ in tensor.contents.ListFields()), None)
            values = list(getattr(tensor.contents, field.name)) if field else []
            outputs[tensor.name] = np.asarray(values).reshape(shape)
    return outputs


class OipClient:
    """Blocking OIP calls on an existing channel (so it shares the typed client's credentials and options);
    `metadata` goes with every call (the bearer token, see clients.client.token_metadata)."""

    def __init__(self, channel: grpc.Channel, metadata: Any = None) -> None:
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self._metadata = metadata

    def metadata(self, model: str, version: int = 0, timeout: float | None = None) -> Any:
        request = pb.ModelMetadataRequest(name=model, version=str(version) if version else "")
        return self._stub.ModelMetadata(request, timeout=timeout, metadata=self._metadata)

    def predict(
        self, model: str, inputs: Mapping[str, Any], version: int = 0, timeout: float | None = None
    ) -> dict[str, np.ndarray]:
        """Predict with any model: inputs map input names to rows; raises InputError before sending bad ones."""
        arrays = prepare_inputs(self.metadata(model, version, timeout), inputs)
        request = build_request(model, arrays, str(version) if version else "")
        return decode_response(self._stub.ModelInfer(request, timeout=timeout, metadata=self._metadata))


def random_arrays(
    model: str, inputs: Sequence[tuple[str, str, Sequence[int]]], batched: bool, rows: int, seed: int
) -> dict[str, np.ndarray]:
    """Seeded random arrays of `rows` rows for inputs given as (name, OIP datatype, shape with the batch dimension
    first when `batched`); for a model without a batch dimension, one input of its whole shape. BYTES inputs hold
    b"x". Shared by the gRPC and the REST load tests, so both send the same values."""
    if not batched and rows != 1:
        raise InputError(f"model '{model}' has no batch dimension (max_batch_size 0): send 1 row per request")
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, datatype, full_shape in inputs:
        dims = list(full_shape)[1:] if batched else list(full_shape)
        if any(d < 0 for d in dims):
            raise InputError(f"model '{model}' input '{name}' has dimensions of variable size {list(full_shape)}")
        shape = (rows, *dims) if batched else tuple(dims)
        if datatype == "BYTES":
            arrays[name] = np.full(shape, b"x", dtype=object)
        else:
            arrays[name] = (rng.random(shape) * 2).astype(triton_to_np_dtype(datatype))
    return arrays


async def random_request(
    channel: grpc.aio.Channel, model: str, rows: int, version: str, seed: int, timeout: float, call_metadata: Any = None
) -> Any:
    """A raw request of `rows` random rows for any OIP server's model, shaped from its ModelMetadata; for a model
    without a batch dimension (ModelConfig's max_batch_size 0), one input of its whole shape."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelMetadataRequest(name=model, version=version)
    metadata = await stub.ModelMetadata(request, timeout=timeout, metadata=call_metadata)
    config_request = pb.ModelConfigRequest(name=model, version=version)
    config = await stub.ModelConfig(config_request, timeout=timeout, metadata=call_metadata)
    inputs = [(spec.name, spec.datatype, list(spec.shape)) for spec in metadata.inputs]
    return build_request(model, random_arrays(model, inputs, config.config.max_batch_size > 0, rows, seed), version)


class StreamCaller:
    """Calls over one ModelStreamInfer stream, awaitable like a unary stub method (`await caller(request,
    timeout=...)`): each request gets a fresh id, and its answer is matched back by id."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Any = None) -> None:
        self._call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(metadata=metadata)
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._write = asyncio.Lock()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for response in self._call:
                future = self._waiting.pop(response.infer_response.id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(_error(grpc.StatusCode.UNAVAILABLE, "the stream ended"))

    async def __call__(self, request: Any, timeout: float) -> Any:
        future = asyncio.get_running_loop().create_future()
        request_id = f"{next(self._ids)}"
        async with self._write:  # the message is serialized by write(), so the id can be set in place
            request.id = request_id
            self._waiting[request_id] = future
            await self._call.write(request)
        try:
            response = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._waiting.pop(request_id, None)
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer on the stream in time") from None
        if response.error_message:
            code, _, _ = response.error_message.partition(":")
            raise _error(getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN), response.error_message)
        return response

    async def close(self) -> None:
        await self._call.done_writing()
        self._call.cancel()
        self._reader.cancel()


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
