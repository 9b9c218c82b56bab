"""Model repositories of a test's own, and what a server says of their versions (used by the lifecycle and
repository-race tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from harness.server import ServerProcess
from models.registry import BUILTIN_MODELS


def make_repository(base: Path, model_repository: Path) -> Path:
    """A repository of its own with the session's exported built-in models (copied, so nothing is exported)."""
    repo = base / "repository"
    for name in BUILTIN_MODELS:
        shutil.copytree(model_repository / name / "1", repo / name / "1")
    return repo


def status(server: ServerProcess, model: str = "multi_input") -> dict[int, tuple[int, str]]:
    """TF Serving GetModelStatus: each version's state and error message."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    response = model_service_pb2_grpc.ModelServiceStub(server.channel).GetModelStatus(request, timeout=10)
    return {s.version: (s.state, s.status.error_message) for s in response.model_version_status}
