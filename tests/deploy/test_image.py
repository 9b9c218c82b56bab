"""The image, built and run for real (issue 16): `make image` builds the Dockerfile with podman, offline from a
wheelhouse, on a stand-in base made from Debian's packages; containers of it are checked for what users rely on.
Skipped, with the reason, only where podman cannot run (.ci/install-debian-tools installs it on Debian).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clients.client import ModelServerClient
from harness.drain import CALLERS, drain_round
from modelserver.v1 import modelserver_pb2 as pb
from tests.helpers import containers
from tests.helpers.containers import Container, podman
from tests.helpers.models import keras_outputs, random_inputs

pytestmark = pytest.mark.timeout(containers.BUILD_SECONDS + 600)
OK_CALLS = {"model": "multi_input", "method": "typed.PredictMultiInput", "code": "OK"}


@pytest.fixture(scope="module")
def image() -> str:
    reason = containers.unavailable()
    if reason:
        pytest.skip(reason)
    return containers.build_image()


def _volume() -> str:
    name = f"modelserver-test-{uuid.uuid4().hex[:10]}"
    podman("volume", "create", name)
    return name


def _volume_path(name: str) -> Path:
    return Path(podman("volume", "inspect", name, "--format", "{{.Mountpoint}}").stdout.strip())


@pytest.fixture(scope="module")
def volume(image: str) -> Iterator[str]:
    """A named volume, as the README's `docker run -v models:/models`; empty at first."""
    name = _volume()
    yield name
    podman("volume", "rm", "--force", name, check=False)


def test_the_image_serves_checks_health_and_drains_under_64_callers(image, volume, keras_models):
    """From an empty volume: SERVING, the HEALTHCHECK passes, PID 1 is the server as uid 10001, predictions equal
    the in-process model's, /metrics counts them, and `podman stop` under 64 callers answers every call sent
    before the signal (held in the model until then) and exits 0. Then a new container reuses the volume."""
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    assert "python -m clients" in " ".join(inspected["Healthcheck"]["Test"])  # kept: built with --format docker
    assert inspected["Config"]["User"] == "10001:10001"

    container = Container(image, volume, holds=True)
    try:
        container.wait_serving()
        assert "exported multi_input version 1" in container.logs()
        assert "cuInit" not in container.logs()  # TensorFlow's CUDA probe is not an error where there is no GPU
        healthcheck = podman("healthcheck", "run", container.name, check=False)
        assert healthcheck.returncode == 0, healthcheck.stdout + healthcheck.stderr

        status = podman("exec", container.name, "cat", "/proc/1/status", "/proc/1/cmdline").stdout
        assert "\nUid:\t10001\t10001\t10001\t10001\n" in status
        assert "python\0-m\0server" in status

        inputs = random_inputs(keras_models["multi_input"], 5, seed=3)
        with ModelServerClient(container.target, timeout=60, retries=0) as client:
            served = client.predict("multi_input", inputs)["output"]
        np.testing.assert_allclose(served, keras_outputs(keras_models["multi_input"], inputs)["output"], atol=1e-5)
        assert container.metric("modelserver_requests_total", **OK_CALLS) == 1

        one = random_inputs(keras_models["multi_input"], 1, seed=4)
        request = pb.PredictMultiInputRequest(input_a=one["input_a"].ravel().tolist(),
                                              input_b=one["input_b"].ravel().tolist())  # fmt: skip
        expected = float(keras_outputs(keras_models["multi_input"], one)["output"][0, 0])
        outcomes, wrong = asyncio.run(drain_round(container, request, expected))  # type: ignore[arg-type]
        assert outcomes[("before", "OK")] == CALLERS, outcomes
        assert {code for when, code in outcomes if when == "before"} == {"OK"}, outcomes
        assert {code for _, code in outcomes} <= {"OK", "UNAVAILABLE"}, outcomes
        assert wrong == []
        assert container.process.wait(120) == 0, container.logs()
    finally:
        container.remove()

    again = Container(image, volume)
    try:
        again.wait_serving()
        assert "exported" not in again.logs()  # the models the first container exported, loaded as they are
        with ModelServerClient(again.target, timeout=60, retries=0) as client:
            np.testing.assert_allclose(client.predict("multi_input", inputs)["output"], served, atol=1e-6)
        assert again.stop() == 0
    finally:
        again.remove()


@pytest.mark.parametrize("phase", ["import", "export", "load", "warmup"])
def test_podman_stop_during_start_up_exits_0_at_once(image, volume, phase):
    """The server is PID 1 with the Dockerfile's own entrypoint (no --init). Held in each start-up phase, a
    container that ignored SIGTERM would wait for SIGKILL and exit 137; it exits 0. After an export cut short,
    the next container finds the volume consistent and serves."""
    own_volume = _volume() if phase in ("import", "export") else volume
    container = Container(image, own_volume, held=(phase,))
    try:
        container.wait_arrived(1, phase)
        if phase == "import":
            container.release("import")  # it imports TensorFlow now, and the signal comes
        assert container.stop(timeout=60) == 0, container.logs()
        assert "received while starting" in container.logs()
    finally:
        container.remove()
    if phase == "export":
        repository = _volume_path(own_volume)
        assert list(repository.glob("multi_input/.tmp-1-*")) and not (repository / "multi_input" / "1").exists()
        after = Container(image, own_volume)
        try:
            after.wait_serving()
            assert "left by an export that did not finish" in after.logs()
            assert not list(repository.glob("*/.tmp-*"))
            assert after.stop() == 0
        finally:
            after.remove()
    if own_volume != volume:
        podman("volume", "rm", "--force", own_volume, check=False)
