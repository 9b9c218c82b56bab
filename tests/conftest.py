"""Shared fixtures: one exported model repository, one real server, and the Keras models to compare with; and the
layers of the suite: each test is marked with the folder it lives in (tests/unit, tests/integration, tests/deploy),
so that `pytest -m unit` runs one layer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytest.register_assert_rewrite("tests.helpers.loadtest")  # checks moved out of test modules keep pytest's messages

from clients.client import ModelServerClient  # noqa: E402
from harness.server import ServerProcess  # noqa: E402

# After the last test, whatever is still running is reported, killed, and fails the run (issue 21).
pytest_plugins = ["tests.helpers.leak_guard"]

SEED = 1234  # the server's default --seed

# The layers of the suite, each a folder tests/<layer>/ and a marker (pyproject.toml says what each holds).
LAYERS = ("unit", "integration", "deploy")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its layer, the folder under tests/ it lives in; a test in no layer's folder is an error."""
    tests = Path(__file__).parent
    for item in items:
        folder = item.path.relative_to(tests).parts[0] if item.path.is_relative_to(tests) else None
        if folder not in LAYERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/unit, tests/integration or tests/deploy")
        item.add_marker(folder)


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
