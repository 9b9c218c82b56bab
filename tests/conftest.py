"""Shared fixtures: one exported model repository, one real server, and the Keras models to compare with."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from clients.client import ModelServerClient  # noqa: E402
from tests.helpers.server import ServerProcess  # noqa: E402

# After the last test, whatever is still running is reported, killed, and fails the run (issue 21).
pytest_plugins = ["tests.helpers.leak_guard"]

SEED = 1234  # the server's default --seed


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_repository")


@pytest.fixture(scope="session")
def server(model_repository: Path) -> Iterator[ServerProcess]:
    """A real server, started once per session on port 0, exporting the built-in models on its first start. It is
    held before loading its first model until the test has seen it reachable and NOT_SERVING."""
    with ServerProcess(model_repository, ["--grace-period", "10"], held=["load"]) as process:
        process.wait_arrived(1, "load", timeout=300)
        process.health_seen.append(process.health())
        process.release("load")
        process.wait_serving()
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[ModelServerClient]:
    with ModelServerClient(server.target, timeout=30, retries=0) as c:
        yield c


@pytest.fixture(scope="session")
def keras_models() -> dict:
    """The built-in Keras models, built in this process with the server's seed."""
    from models.registry import BUILTIN_MODELS

    return {name: definition.build(SEED) for name, definition in BUILTIN_MODELS.items()}
