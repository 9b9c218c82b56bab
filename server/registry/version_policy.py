"""Which versions of a model to serve, as TF Serving's `model_version_policy`: latest N, all, or specific ones.

Written as `latest:N` (default `latest:1`), `all`, or `specific:1/3` (versions separated by `/`), for every model
with --version-policy and per model with --model-version-policy 'MODEL=POLICY;MODEL=POLICY'.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class VersionPolicy:
    kind: str  # "latest", "all" or "specific"
    count: int = 1  # for latest
    versions: frozenset[int] = frozenset()  # for specific

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, value = text.strip().partition(":")
        if kind == "latest":
            count = int(value or "1")
            if count < 1:
                raise ValueError(f"latest:N needs N >= 1, got {count}")
            return cls("latest", count=count)
        if kind == "all" and not value:
            return cls("all")
        if kind == "specific":
            versions = frozenset(int(v) for v in value.split("/") if v)
            if not versions or min(versions) < 1:
                raise ValueError(f"specific:V/V... needs versions >= 1, got {value!r}")
            return cls("specific", versions=versions)
        raise ValueError(f"expected latest:N, all or specific:V/V..., got {text!r}")

    def aspired(self, available: Iterable[int]) -> set[int]:
        """The versions to serve among those complete on disk."""
        versions = sorted(set(available))
        if self.kind == "all":
            return set(versions)
        if self.kind == "specific":
            return set(versions) & self.versions
        return set(versions[-self.count :])

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + "/".join(map(str, sorted(self.versions)))
        return "all"


def parse_model_policies(text: str) -> dict[str, VersionPolicy]:
    """'MODEL=POLICY;MODEL=POLICY' into {model: policy}."""
    policies = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        model, sep, policy = entry.partition("=")
        if not sep or not model.strip():
            raise ValueError(f"expected MODEL=POLICY, got {entry!r}")
        policies[model.strip()] = VersionPolicy.parse(policy)
    return policies
