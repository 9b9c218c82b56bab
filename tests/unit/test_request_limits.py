"""Declared shapes cost nothing to send: a few bytes can declare [2**62, 4], 10,000 dimensions, or one value that
"fills" a billion elements. Every limit (rank, rows, elements, bytes) is checked from the declared shape, in
Python integers, before anything is allocated, and is INVALID_ARGUMENT naming the limit, never INTERNAL.

The codecs, without a server; tests/integration/test_request_limits.py sends the same shapes to a real one."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from server.base import tensors
from server.base.errors import InvalidInputError
from server.base.tensors import TensorSpec
from server.protocols.oip import codec as oip_codec
from server.protocols.tfserving import codec as tfserving_codec
from tests.helpers.absurd_shapes import MANY_DIMS, MAX_ROWS, WRAPPED, oip_input, tfs_tensor

SPECS = {
    "input_a": TensorSpec("input_a", np.dtype(np.float32), (10,)),
    "input_b": TensorSpec("input_b", np.dtype(np.float32), (20,)),
}


def _limits(batched: bool = True) -> tensors.InputLimits:
    return tensors.InputLimits(SPECS, max_rows=MAX_ROWS, batched=batched)


def _refused(decode: Callable[[], object], words: str) -> str:
    """Decode, expecting InvalidInputError whose message holds `words`, is short and shows no wrapped size, with
    next to nothing allocated on the way (tracemalloc sees numpy's buffers)."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError) as caught:
            decode()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert words in message, message
    assert len(message) < 600 and not WRAPPED.search(message), message
    assert peak < 1 << 20, f"{peak} bytes allocated to refuse it"
    return message


OIP_ABSURD = {
    "typed [2**62, 4], empty contents": (oip_input([2**62, 4]), "at most 4096 rows"),
    "raw [2**61, 8], empty raw contents": (oip_input([2**61, 8], raw=b""), "at most 4096 rows"),
    "typed 10,000 dimensions of 1": (oip_input(MANY_DIMS, values=1), "at most 32"),
    "raw 10,000 dimensions of 1": (oip_input(MANY_DIMS, raw=b"\0" * 4), "at most 32"),
    "typed [1, 2**62]": (oip_input([1, 2**62]), "at most 40960 elements"),
    "raw [4096, 2**52]": (oip_input([4096, 2**52], raw=b""), "at most 40960 elements"),
}


@pytest.mark.parametrize(("request_", "words"), OIP_ABSURD.values(), ids=OIP_ABSURD.keys())
def test_oip_absurd_shapes_are_refused_by_the_limit_they_break(request_, words):
    _refused(lambda: oip_codec.decode_inputs("multi_input", request_, _limits()), words)


@pytest.mark.parametrize("request_", [r for r, _ in OIP_ABSURD.values()], ids=OIP_ABSURD.keys())
def test_oip_absurd_shapes_are_invalid_input_without_the_models_limits(request_):
    """Knowing nothing of the model (as for an input it does not have), sizes still never wrap and rank is bounded."""
    _refused(lambda: oip_codec.decode_inputs("m", request_), "")


def test_oip_sizes_are_exact_integers_in_messages():
    message = _refused(lambda: oip_codec.decode_inputs("m", oip_input([2**61, 8], raw=b"")), "needs")
    assert str(2**64 * 4) in message  # 2**61 x 8 elements x 4 bytes, not a product wrapped around at 2**64


TFS_ABSURD = {
    "one value fills [100000000, 10]": (tfs_tensor([100_000_000, 10], values=1), "at most 4096 rows"),
    "[2**62, 4] without values": (tfs_tensor([2**62, 4]), "at most 4096 rows"),
    "10,000 dimensions of 1, one value": (tfs_tensor(MANY_DIMS, values=1), "at most 32"),
    "[2**61, 8] with 4 bytes of tensor_content": (tfs_tensor([2**61, 8], content=b"\0" * 4), "at most 4096 rows"),
    "one value fills [1, 2**40]": (tfs_tensor([1, 2**40], values=1), "at most 40960 elements"),
}


@pytest.mark.parametrize(("proto", "words"), TFS_ABSURD.values(), ids=TFS_ABSURD.keys())
def test_tfserving_absurd_shapes_are_refused_by_the_limit_they_break(proto, words):
    _refused(lambda: tfserving_codec.decode_inputs("multi_input", {"input_a": proto}, _limits()), words)


@pytest.mark.parametrize("proto", [p for p, _ in TFS_ABSURD.values()], ids=TFS_ABSURD.keys())
def test_tfserving_absurd_shapes_are_invalid_input_without_the_models_limits(proto):
    _refused(lambda: tfserving_codec.decode_tensor("m", "x", proto), "")


def test_one_value_fills_a_tensor_only_as_large_as_the_model_takes():
    proto = tfs_tensor([MAX_ROWS, 10], values=1)
    assert tfserving_codec.decode_tensor("multi_input", "input_a", proto, _limits()).shape == (MAX_ROWS, 10)
    _refused(
        lambda: tfserving_codec.decode_tensor("m", "x", tfs_tensor([1 << 30], values=1)), "one value fills at most"
    )


def test_an_unbatched_model_takes_its_one_shape_at_most():
    message = _refused(
        lambda: oip_codec.decode_inputs("m", oip_input([1000, 10]), _limits(batched=False)), "10 elements"
    )
    assert "no batch dimension" in message
