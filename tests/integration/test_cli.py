"""The command-line client against a real server, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from harness.server import REPO_ROOT
from tests.helpers.models import keras_outputs, random_inputs


def cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clients", "--target", server.target, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_health(server):
    done = cli(server, "health")
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING")
    done = cli(server, "health", "--service", "residual_cnn")
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING")
    done = cli(server, "health", "--service", "nope")
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr


def test_health_of_an_unreachable_server_exits_1():
    done = subprocess.run(
        [sys.executable, "-m", "clients", "--target", "127.0.0.1:1", "--timeout", "2", "health"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


def test_predict_prints_outputs_as_json(server, keras_models):
    inputs = random_inputs(keras_models["multi_input"], 2)
    done = cli(server, "predict", "multi_input", "--json", json.dumps({k: v.tolist() for k, v in inputs.items()}))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    np.testing.assert_allclose(
        printed["output"], keras_outputs(keras_models["multi_input"], inputs)["output"], atol=1e-5
    )


def test_predict_with_bad_input_prints_the_servers_message(server):
    done = cli(server, "predict", "multi_input", "--json", '{"input_a": [[1, 2]], "input_b": [[1, 2]]}')
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "(rows, 10)" in done.stderr


def test_metadata_and_list(server):
    done = cli(server, "metadata", "residual_cnn")
    assert done.returncode == 0
    meta = json.loads(done.stdout)
    assert meta["name"] == "residual_cnn" and meta["inputs"][0]["name"] == "image"
    done = cli(server, "list")
    assert [m["name"] for m in json.loads(done.stdout)["models"]] == ["multi_input", "residual_cnn", "shared_layer"]
