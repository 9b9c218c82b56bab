"""Tensor specs and request validation: every request is checked here before it reaches a model,
so a bad request fails alone with a message that says what was expected and what arrived."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from server.errors import InvalidInputError, quoted


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output; shape excludes the leading batch (rows) dimension, None = any size."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def values_per_row(self) -> int | None:
        if any(d is None for d in self.shape):
            return None
        return math.prod(d for d in self.shape if d is not None)

    def describe(self) -> str:
        dims = ", ".join(["rows", *("?" if d is None else str(d) for d in self.shape)])
        return f"{self.dtype.name} of shape ({dims})"


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def rows_from_flat(model: str, spec: TensorSpec, flat: np.ndarray) -> np.ndarray:
    """Reshape a flat, row-major array (a packed proto field) into (rows, *spec.shape)."""
    per_row = spec.values_per_row
    if per_row is None:
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}' has dimensions of unknown size {spec.describe()}; "
            "it cannot be sent as a flat list"
        )
    if flat.size == 0:
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}' is empty: expected at least one row of {per_row} values"
        )
    if flat.size % per_row:
        raise InvalidInputError(
            f"model '{model}' input '{spec.name}' has {flat.size} values, which is not a whole number of "
            f"rows: expected a multiple of {per_row} ({per_row} values per row: {spec.describe()})"
        )
    return flat.reshape((-1, *spec.shape))


def validate_inputs(model: str, specs: Mapping[str, TensorSpec], inputs: Mapping[str, np.ndarray]) -> int:
    """Check names, dtypes, shapes, equal row counts and finiteness; return the number of rows."""
    expected = ", ".join(sorted(specs))
    unknown = sorted(set(inputs) - set(specs))
    if unknown:
        shown = ", ".join(quoted(n) for n in unknown[:3])
        if len(unknown) > 3:
            shown += f" and {len(unknown) - 3} more"
        raise InvalidInputError(f"model '{model}' has no input named {shown}; expected inputs: {expected}")
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise InvalidInputError(
            f"model '{model}' is missing input {', '.join(repr(n) for n in missing)}; expected inputs: {expected}"
        )
    rows: dict[str, int] = {}
    for name, spec in specs.items():
        array = inputs[name]
        if array.dtype != spec.dtype:
            raise InvalidInputError(f"model '{model}' input '{name}' must be {spec.dtype.name}, got {array.dtype.name}")
        shape_ok = array.ndim == len(spec.shape) + 1 and all(
            want is None or want == got for want, got in zip(spec.shape, array.shape[1:], strict=True)
        )
        if not shape_ok:
            raise InvalidInputError(
                f"model '{model}' input '{name}' must be {spec.describe()}, got shape {_shape_str(array.shape)}"
            )
        if array.shape[0] == 0:
            raise InvalidInputError(f"model '{model}' input '{name}' is empty: expected at least one row")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad_row = int(np.argmin(np.isfinite(array).reshape(array.shape[0], -1).all(axis=1)))
            raise InvalidInputError(
                f"model '{model}' input '{name}' holds NaN or infinity (first in row {bad_row}); "
                "the model needs finite values"
            )
        rows[name] = array.shape[0]
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{n}: {r}" for n, r in sorted(rows.items()))
        raise InvalidInputError(f"model '{model}' inputs must have the same number of rows, got {counts}")
    return next(iter(rows.values()))


def check_finite_outputs(model: str, outputs: Mapping[str, np.ndarray]) -> None:
    """Refuse to return NaN or infinity that the model computed from finite inputs (extreme values overflow
    float32 inside the model): the request fails with a message naming the output and row, instead of
    leaving with status OK."""
    for name, array in sorted(outputs.items()):
        if not np.issubdtype(array.dtype, np.floating):
            continue
        finite = np.isfinite(array)
        if not finite.all():
            bad_row = int(np.argmin(finite.reshape(array.shape[0], -1).all(axis=1))) if array.ndim else 0
            raise InvalidInputError(
                f"model '{model}' computed NaN or infinity in output '{name}' (first in row {bad_row}) from finite "
                "inputs: the input values are too large for the model's float32 arithmetic; scale them into the "
                "range the model was trained on"
            )
