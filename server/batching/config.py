"""One model's batching settings, each defined once: its name (the --model-batching key), its server-wide flag,
default, help, parsing, validation and its field in GetModelMetadata's BatchingSettings all come from its field
below. server/settings.py makes the flags and --model-batching keys from these fields, server/grpc/typed.py the
metadata message, server/grpc/oip.py Triton's ModelConfig; none of them names a setting on its own.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

POLICIES = ("cost", "fixed")


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def parse_sizes(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split("/") if v)


def default_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below max_batch_size, and max_batch_size itself."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return (*sizes, max_batch_size)


Check = Callable[["BatchingConfig"], str]  # a problem with the setting's value ("" when none)


def _setting(
    default: Any,
    help: str,
    parse: Callable[[str], Any],
    check: Check,
    *,
    flag: str = "",
    message_field: str = "",
) -> Any:
    """A batching setting. `flag`: its server-wide flag's name when not the field's; `message_field`: its name in
    BatchingSettings when not the field's."""
    return dataclasses.field(
        default=default,
        metadata={"help": help, "parse": parse, "check": check, "flag": flag, "message_field": message_field},
    )


def _sizes_problem(c: BatchingConfig) -> str:
    sizes = c.allowed_batch_sizes
    if not sizes:
        return ""
    if list(sizes) != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != c.max_batch_size:
        return (
            f"allowed_batch_sizes must be increasing, positive and end with max_batch_size ({c.max_batch_size}), "
            f"got {list(sizes)}"
        )
    return ""


@dataclass(frozen=True)
class BatchingConfig:
    """One model's batching settings (README, Dynamic batching)."""

    enabled: bool = _setting(
        True,
        "Merge concurrent requests into one model call; false: each request is its own model call.",
        parse_bool,
        lambda c: "",
        flag="batching",
    )
    max_batch_size: int = _setting(
        64,
        "Rows per model call at most; larger requests are split and reassembled.",
        int,
        lambda c: "" if c.max_batch_size >= 1 else f"max_batch_size must be >= 1, got {c.max_batch_size}",
    )
    batch_timeout: float = _setting(
        0.01,
        "Seconds the oldest queued request may wait for its batch to fill: the fixed window under policy 'fixed', "
        "an upper bound under 'cost' (which waits only while waiting pays).",
        float,
        lambda c: "" if c.batch_timeout >= 0 else f"batch_timeout must be >= 0 seconds, got {c.batch_timeout}",
        message_field="batch_timeout_seconds",
    )
    max_queued_rows: int = _setting(
        4096,
        "Rows queued per model at most; beyond it requests fail at once with RESOURCE_EXHAUSTED.",
        int,
        lambda c: (
            ""
            if c.max_queued_rows >= c.max_batch_size
            else f"max_queued_rows ({c.max_queued_rows}) must be >= max_batch_size ({c.max_batch_size})"
        ),
    )
    policy: str = _setting(
        "cost",
        "When a batch runs. 'cost': from the model's measured call time (a + b*rows, refitted online), a free "
        "batch slot takes what is queued unless the rows expected to arrive within one call's fixed cost outnumber "
        "those queued; it then waits for them, never past --batch-timeout or a queued deadline's slack. 'fixed': "
        "every batch waits for max_batch_size rows or --batch-timeout.",
        str,
        lambda c: "" if c.policy in POLICIES else f"policy must be one of {', '.join(POLICIES)}; got {c.policy!r}",
        flag="batching_policy",
    )
    max_batches_in_flight: int = _setting(
        2,
        "Batches of one model running at once, so preparing the next overlaps the current one.",
        int,
        lambda c: (
            "" if c.max_batches_in_flight >= 1 else f"max_batches_in_flight must be >= 1, got {c.max_batches_in_flight}"
        ),
    )
    allowed_batch_sizes: tuple[int, ...] = _setting(
        (),
        "Sizes batches are padded up to, each warmed up before SERVING, as 1/8/32/64; empty: powers of two up to "
        "max_batch_size.",
        parse_sizes,
        _sizes_problem,
    )

    def __post_init__(self) -> None:
        if not self.allowed_batch_sizes and self.max_batch_size >= 1:
            object.__setattr__(self, "allowed_batch_sizes", default_batch_sizes(self.max_batch_size))

    @classmethod
    def parse(cls, raw: Mapping[str, str]) -> dict[str, Any]:
        """Setting values from their text (raises ValueError naming the key for an unknown one)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, text in raw.items():
            if key not in known:
                raise ValueError(f"unknown batching key {key!r}; keys: {', '.join(known)}")
            values[key] = known[key].metadata["parse"](text)
        return values

    def problems(self) -> list[str]:
        return [p for f in dataclasses.fields(self) if (p := f.metadata["check"](self))]

    def message_fields(self) -> dict[str, Any]:
        """The settings as GetModelMetadata's BatchingSettings fields."""
        return {f.metadata["message_field"] or f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def padded_size(self, rows: int) -> int:
        return self.allowed_batch_sizes[bisect.bisect_left(self.allowed_batch_sizes, rows)]


SETTINGS = dataclasses.fields(BatchingConfig)


def flag_name(setting: dataclasses.Field[Any]) -> str:
    """The server-wide setting's name (--max-batch-size, MODELSERVER_MAX_BATCH_SIZE)."""
    return setting.metadata["flag"] or setting.name
