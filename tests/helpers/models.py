"""Inputs for the built-in models and the Keras models' own outputs for them, to compare served answers with."""

from __future__ import annotations

import grpc
import numpy as np
import pytest


def random_inputs(model, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.random((rows, *t.shape[1:]), dtype=np.float32) for t in model.inputs}


def keras_outputs(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    values = model(inputs if len(inputs) > 1 else next(iter(inputs.values())))
    values = values if isinstance(values, list) else [values]
    return {name: np.asarray(v) for name, v in zip(model.output_names, values, strict=True)}


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The gRPC error that `call(*args, **kwargs)` must raise."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value
