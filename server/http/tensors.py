"""JSON values <-> numpy arrays, for both REST APIs: nested or flat lists checked to be rectangular and of the kind
the tensor takes (no silent float -> int truncation, no overflow wrap), strings for BYTES, and bodies parsed with
orjson (the non-standard NaN and Infinity that TF Serving's REST API reads are parsed by the standard library)."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import orjson

from server.base.errors import InvalidInputError
from server.base.tensors import MAX_RANK

STRING = np.dtype(object)


def parse_json(body: bytes, what: str) -> Any:
    """The body as JSON; `what` names it in the error ("the request body", "the JSON header")."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        try:  # NaN, Infinity and -Infinity, which TF Serving's JSON allows and orjson refuses
            value = json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; nesting beyond orjson's limit
            raise InvalidInputError(f"{what} is not valid JSON: {error}") from None
    # What orjson refused for another reason the standard library may take: strings with lone surrogates (not
    # text: no reply or error message could hold them) and integers beyond 64 bits. Only what orjson can write is
    # taken (it writes NaN as null, without complaint).
    try:
        orjson.dumps(value)
    except TypeError as error:
        raise InvalidInputError(f"{what} is not valid JSON: {error}") from None
    return value


def array_from_json(where: str, value: Any, dtype: np.dtype) -> np.ndarray:
    """A (nested) JSON list or scalar as an array of `dtype`; strings (or TF Serving's {"b64": ...}) for BYTES."""
    if dtype == STRING:
        return _strings(where, value)
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as error:
        raise InvalidInputError(f"{where}: the values are not a rectangular list of numbers ({error})") from None
    if array.size == 0:
        return array.astype(dtype)
    kind = array.dtype.kind
    if kind in "OSU":
        raise InvalidInputError(
            f"{where} takes {dtype.name} numbers, got {_described(value)}: send a (nested) list of numbers of the "
            "same depth everywhere"
        )
    if dtype.kind == "b" and kind != "b":
        raise InvalidInputError(f"{where} takes booleans (true/false), got {array.dtype.name} values")
    if dtype.kind in "iu":
        if kind not in "iu":
            raise InvalidInputError(f"{where} takes integers ({dtype.name}), got {array.dtype.name} values")
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise InvalidInputError(
                f"{where} of {dtype.name} takes values from {info.min} to {info.max}, got {low} to {high}"
            )
    elif dtype.kind == "f" and kind not in "iuf":
        raise InvalidInputError(f"{where} takes numbers ({dtype.name}), got {array.dtype.name} values")
    return array.astype(dtype, copy=False)


def _described(value: Any) -> str:
    text = orjson.dumps(value)[:60].decode("utf-8", "replace")
    return f"{text}..." if len(text) == 60 else text


def _strings(where: str, value: Any) -> np.ndarray:
    """BYTES elements: JSON strings (UTF-8) or {"b64": "..."} objects, in rectangular nested lists."""
    shape: list[int] = []
    flat: list[bytes] = []
    leaf_depth: list[int] = []  # the depth of the first string: every string is at that depth

    def ragged() -> InvalidInputError:
        return InvalidInputError(f"{where}: the strings are not a rectangular nested list")

    def walk(item: Any, depth: int) -> None:
        if isinstance(item, list):
            if leaf_depth and depth >= leaf_depth[0]:
                raise ragged()
            if depth >= MAX_RANK:  # before Python's recursion limit: JSON may nest lists a thousand deep
                raise InvalidInputError(f"{where}: the strings are nested deeper than {MAX_RANK} lists")
            if depth == len(shape):
                shape.append(len(item))
            elif shape[depth] != len(item):
                raise ragged()
            for element in item:
                walk(element, depth + 1)
            return
        if depth != (leaf_depth[0] if leaf_depth else len(shape)):
            raise ragged()
        leaf_depth[:] = [depth]
        if isinstance(item, str):
            flat.append(item.encode())
        elif isinstance(item, dict) and set(item) == {"b64"} and isinstance(item["b64"], str):
            try:
                flat.append(base64.b64decode(item["b64"], validate=True))
            except ValueError as error:  # binascii.Error, or a character that is not ASCII
                raise InvalidInputError(f"{where}: a 'b64' value is not base64 ({error})") from None
        else:
            raise InvalidInputError(
                f'{where} takes strings: JSON strings, or {{"b64": "..."}} for binary ones, got {_described(item)}'
            )

    walk(value, 0)
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array.reshape(shape)


def strings_to_json(array: np.ndarray, b64: bool = False) -> Any:
    """A BYTES array as nested lists of strings (UTF-8, undecodable bytes replaced), or of {"b64": ...}."""

    def one(item: Any) -> Any:
        data = item if isinstance(item, bytes) else str(item).encode()
        return {"b64": base64.b64encode(data).decode()} if b64 else data.decode("utf-8", "replace")

    flat = np.empty(array.size, dtype=object)
    flat[:] = [one(item) for item in array.ravel().tolist()]
    return flat.reshape(array.shape).tolist()


def jsonable(array: np.ndarray) -> Any:
    """What orjson writes for an output array: numpy arrays of its numeric types as they are (contiguous), others
    (bfloat16) as float32, strings as lists of str."""
    if array.dtype == STRING:
        return strings_to_json(array)
    if array.dtype.kind not in "biuf" or array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return np.ascontiguousarray(array)
