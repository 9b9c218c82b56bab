"""Tensor specs and request validation: every request is checked here before it reaches a model,
so a bad request fails alone with a message that says what was expected and what arrived."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from server.base.errors import InvalidInputError, quoted


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output; shape excludes the leading batch (rows) dimension, None = any size."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    # Derived once per spec (a frozen dataclass still has a __dict__ for functools.cached_property): every request
    # is checked against them, and deriving them per request cost microseconds each on the event loop (issue 25).
    @functools.cached_property
    def fixed_shape(self) -> tuple[int, ...] | None:
        """The shape when every dimension has a known size, else None."""
        if any(d is None for d in self.shape):
            return None
        return tuple(d for d in self.shape if d is not None)

    @functools.cached_property
    def values_per_row(self) -> int | None:
        shape = self.fixed_shape
        return None if shape is None else math.prod(shape)

    @functools.cached_property
    def is_float(self) -> bool:
        """Floating point: its values must be finite."""
        return bool(np.issubdtype(self.dtype, np.floating))

    def describe(self) -> str:
        dims = ", ".join(["rows", *("?" if d is None else str(d) for d in self.shape)])
        return f"{self.dtype.name} of shape ({dims})"


# Dimensions a request's tensor may declare. numpy 1.x arrays have at most 32 (NPY_MAXDIMS; numpy 2 allows 64,
# TensorFlow 254), so every accepted shape is an array under either numpy; models use 2 to 6 (an image batch is 4).
MAX_RANK = 32
# The largest dimension a shape may declare (numpy's own limit is lower than a product that a 0 makes harmless).
MAX_DIMENSION = 2**31 - 1
# Elements at most that TF Serving's "one value fills the tensor" rule may fill where the model's per-row size is
# not fixed (or not known): what a 16 MiB message (the default --max-receive-message-bytes) could carry at one byte
# per value. Where the per-row size is fixed, the model's own bound (rows x per-row size) is far tighter.
MAX_FILL_ELEMENTS = 16 * 1024 * 1024
_SHOWN_DIMS = 8  # dimensions of a declared shape shown in a message: the status trailer must stay short


@dataclass(frozen=True)
class InputLimits:
    """What one request may declare for a model version: a declared shape costs a few bytes to send ([2**62, 4],
    10,000 dimensions, one value "filling" a billion), so it is checked against these before anything is decoded,
    allocated or broadcast. `max_rows` is the batcher's rows per request (--max-queued-rows)."""

    specs: Mapping[str, TensorSpec]
    max_rows: int
    batched: bool = True

    def max_elements(self, name: str) -> int | None:
        """Elements at most of input `name` in one request, None where the model does not fix its size."""
        spec = self.specs.get(name)
        per_row = None if spec is None else spec.values_per_row
        if per_row is None:
            return None
        return self.max_rows * per_row if self.batched else per_row


def shape_text(shape: Sequence[int]) -> str:
    """A declared shape for a message, cut after a few dimensions (a request may declare thousands)."""
    if len(shape) <= _SHOWN_DIMS:
        return str(list(shape))
    head = ", ".join(str(d) for d in shape[: _SHOWN_DIMS - 1])
    return f"[{head}, ..., {shape[-1]}] ({len(shape)} dimensions)"


def declared_elements(model: str, name: str, shape: Sequence[int], limits: InputLimits | None = None) -> int:
    """The element count of input `name`'s declared shape, as an exact Python integer (a numpy int64 product wraps:
    2**62 x 4 is 0), once its rank, dimensions and, where the model's `limits` are known, its rows and elements are
    within bounds. Nothing here allocates, so a refused request costs nothing."""
    where = f"model '{model}' input {quoted(name)}"
    spec = None if limits is None else limits.specs.get(name)
    if len(shape) > MAX_RANK:
        wanted = "the model's shape (see its metadata)" if spec is None or limits is None else _wanted(spec, limits)
        raise InvalidInputError(
            f"{where} declares {len(shape)} dimensions; a tensor has at most {MAX_RANK}: send {wanted}"
        )
    if any(d < 0 for d in shape):
        raise InvalidInputError(
            f"{where} has shape {shape_text(shape)}: expected non-negative dimensions (the rows first)"
        )
    count = math.prod(shape)
    if count == 0 and any(d > MAX_DIMENSION for d in shape):  # no elements, but numpy cannot make such a shape
        raise InvalidInputError(
            f"{where} has shape {shape_text(shape)}: a dimension is at most {MAX_DIMENSION}; send the model's shape"
        )
    if limits is None or spec is None:
        return count  # not the model's input: refused by name later, and no larger than the values sent
    if limits.batched and shape and shape[0] > limits.max_rows:
        raise InvalidInputError(
            f"model '{model}' takes at most {limits.max_rows} rows per request, got {shape[0]} in input {quoted(name)} "
            f"(shape {shape_text(shape)}); split the request"
        )
    most = limits.max_elements(name)
    if most is not None and count > most:
        takes = f"{limits.max_rows} rows x {spec.values_per_row} values" if limits.batched else "no batch dimension"
        raise InvalidInputError(
            f"{where} of shape {shape_text(shape)} declares {count} elements; the model takes at most {most} elements "
            f"({takes}): send {_wanted(spec, limits)}"
        )
    return count


def _wanted(spec: TensorSpec, limits: InputLimits) -> str:
    """What to send instead, in the model's terms."""
    if limits.batched:
        return f"{spec.describe()} with at most {limits.max_rows} rows"
    dims = ", ".join("?" if d is None else str(d) for d in spec.shape)
    return f"one {spec.dtype.name} tensor of shape [{dims}]"


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def rows_from_flat(model: str, spec: TensorSpec, flat: np.ndarray) -> np.ndarray:
    """Reshape a flat, row-major array (a packed proto field) into (rows, *spec.shape)."""
    shape = spec.fixed_shape
    if shape is None:
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}' has dimensions of unknown size {spec.describe()}; "
            "it cannot be sent as a flat list"
        )
    per_row = math.prod(shape)
    if flat.size == 0:
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}' is empty: expected at least one row of {per_row} values"
        )
    if flat.size % per_row:
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}' has {flat.size} values, which is not a whole number of "
            f"rows: expected a multiple of {per_row} ({per_row} values per row: {spec.describe()})"
        )
    return flat.reshape((-1, *shape))


def validate_inputs(model: str, specs: Mapping[str, TensorSpec], inputs: Mapping[str, np.ndarray]) -> int:
    """Check names, dtypes, shapes, equal row counts and finiteness; return the number of rows.

    Runs on the event loop for every request: the common case (right names, fixed shapes) costs a few comparisons
    and one finiteness check per input; the messages are built only when something is wrong."""
    if inputs.keys() != specs.keys():
        _refuse_names(model, specs, inputs)
    rows = -1
    for name, spec in specs.items():
        array = inputs[name]
        if array.dtype != spec.dtype:
            raise InvalidInputError(f"model '{model}' input '{name}' must be {spec.dtype.name}, got {array.dtype.name}")
        shape = array.shape
        fixed = spec.fixed_shape
        if fixed is not None:
            shape_ok = shape[1:] == fixed
        else:
            shape_ok = array.ndim == len(spec.shape) + 1 and all(
                want is None or want == got for want, got in zip(spec.shape, shape[1:], strict=True)
            )
        if not shape_ok:
            raise InvalidInputError(
                f"model '{model}' input '{name}' must be {spec.describe()}, got shape {_shape_str(shape)}"
            )
        if shape[0] == 0:
            raise InvalidInputError(f"model '{model}' input '{name}' is empty: expected at least one row")
        if spec.is_float and not np.isfinite(array).all():
            bad_row = int(np.argmin(np.isfinite(array).reshape(shape[0], -1).all(axis=1)))
            raise InvalidInputError(
                f"model '{model}' input '{name}' holds NaN or infinity (first in row {bad_row}); "
                "the model needs finite values"
            )
        if rows == -1:
            rows = shape[0]
        elif shape[0] != rows:
            rows = -2
    if rows == -2:  # checked once every input is known to be sound, as each has rows
        counts = ", ".join(f"{n}: {inputs[n].shape[0]}" for n in sorted(specs))
        raise InvalidInputError(f"model '{model}' inputs must have the same number of rows, got {counts}")
    return rows


def _refuse_names(model: str, specs: Mapping[str, TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """The error for inputs whose names are not the model's: the unknown ones first, then the missing ones."""
    expected = ", ".join(sorted(specs))
    unknown = sorted(set(inputs) - set(specs))
    if unknown:
        shown = ", ".join(quoted(n) for n in unknown[:3])
        if len(unknown) > 3:
            shown += f" and {len(unknown) - 3} more"
        raise InvalidInputError(f"model '{model}' has no input named {shown}; expected inputs: {expected}")
    missing = sorted(set(specs) - set(inputs))
    raise InvalidInputError(
        f"model '{model}' is missing input {', '.join(repr(n) for n in missing)}; expected inputs: {expected}"
    )


def check_finite_outputs(model: str, outputs: Mapping[str, np.ndarray]) -> None:
    """Refuse to return NaN or infinity that the model computed from finite inputs (extreme values overflow
    float32 inside the model): the request fails with a message naming the output and row, instead of
    leaving with status OK."""
    for name, array in sorted(outputs.items()):
        if array.dtype.kind != "f":
            continue
        finite = np.isfinite(array)
        if not finite.all():
            bad_row = int(np.argmin(finite.reshape(array.shape[0], -1).all(axis=1))) if array.ndim else 0
            raise InvalidInputError(
                f"model '{model}' computed NaN or infinity in output '{name}' (first in row {bad_row}) from finite "
                "inputs: the input values are too large for the model's float32 arithmetic; scale them into the "
                "range the model was trained on"
            )
