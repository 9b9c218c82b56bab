"""Reading the deployment files the way their tools do, for tests/deploy/test_files.py (no Docker engine here).

Compose: YAML with anchors and merge keys resolved, `${VAR:-default}` interpolated from the defaults (as with
an empty environment), override files merged over the base (mappings merge key by key, other values are
replaced: the only kinds of change our override files make). Kubernetes: a kustomize overlay's JSON 6902
patch applied to the base manifests.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from harness.server import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_OVERRIDES = {
    "replicated": REPO_ROOT / "docker-compose.replicated.yml",
    "gpu": REPO_ROOT / "docker-compose.gpu.yml",
}
KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"

_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: m.group(2) or "", value.replace("$$", "\0")).replace("\0", "$")
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    return value


def merge(base: Any, override: Any) -> Any:
    """Compose's merge for what our overrides do: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def compose_model(*overrides: str) -> dict[str, Any]:
    """The effective compose model of docker-compose.yml with the named override files on top."""
    model = yaml.safe_load(COMPOSE_FILE.read_text())
    for name in overrides:
        model = merge(model, yaml.safe_load(COMPOSE_OVERRIDES[name].read_text()))
    model = _interpolate(model)
    # x-* extension fields are for anchors only; compose ignores them once the anchors are resolved.
    return {k: v for k, v in model.items() if not k.startswith("x-")}


def active_services(model: dict[str, Any], profiles: set[str]) -> set[str]:
    """Services that `docker compose --profile P ...` starts: those without profiles, and those in an active one."""
    return {
        name
        for name, service in model["services"].items()
        if not service.get("profiles") or profiles & set(service["profiles"])
    }


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 `add` and `replace` (the operations the GPU overlay uses) on a copy of `document`."""
    document = copy.deepcopy(document)
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) else last
        if operation["op"] == "replace" and key not in (range(len(node)) if isinstance(node, list) else node):
            raise KeyError(f"replace of a missing path {operation['path']}")
        if operation["op"] not in ("add", "replace"):
            raise ValueError(f"unsupported op {operation['op']}")
        node[key] = copy.deepcopy(operation["value"])
    return document


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization renders: its resources (files or bases) with its patches applied."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        if path.is_dir():
            documents += kustomize(path)
        else:
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch["target"]
        documents = [
            json_patch(d, operations) if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"] else d
            for d in documents
        ]
    for image in kustomization.get("images", []):
        for document in documents:
            for container in document.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return documents
