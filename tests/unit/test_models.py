"""The built-in models and their SavedModel export (in-process, no server)."""

from __future__ import annotations

import fcntl
import json

import numpy as np
import pytest

from models.registry import BUILTIN_MODELS
from server.registry import repository
from server.runtimes.keras import KERAS_FILE, KerasRuntime
from server.runtimes.savedmodel import SavedModelRuntime
from tests.helpers.models import random_inputs

EXPECTED_SIGNATURES = {
    "multi_input": ({"input_a": (10,), "input_b": (20,)}, {"output": (1,)}),
    "shared_layer": ({"input_a": (10,), "input_b": (20,)}, {"output_a": (1,), "output_b": (1,)}),
    "residual_cnn": ({"image": (28, 28, 1)}, {"probabilities": (10,)}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIGNATURES))
def test_input_and_output_names_and_shapes(keras_models, name):
    model = keras_models[name]
    inputs, outputs = EXPECTED_SIGNATURES[name]
    assert {t.name: tuple(t.shape[1:]) for t in model.inputs} == inputs
    assert dict(zip(model.output_names, (tuple(t.shape[1:]) for t in model.outputs), strict=True)) == outputs


def test_shared_layer_weights_exist_once():
    model = BUILTIN_MODELS["shared_layer"].build(1234)  # its own copy: this test changes weights
    assert [layer.name for layer in model.layers].count("shared_layer") == 1
    shared = model.get_layer("shared_layer")
    assert shared.count_params() == 16 * 16 + 16
    # projections 10->16 and 20->16, the shared 16->16 once, two 16->1 heads.
    assert model.count_params() == (10 * 16 + 16) + (20 * 16 + 16) + (16 * 16 + 16) + 2 * (16 + 1)
    assert sum(1 for w in model.weights if "shared_layer" in w.path) == 2  # one kernel, one bias
    # Both branches run through that one layer: zero it and both heads lose all dependence on their input.
    shared.set_weights([np.zeros_like(w) for w in shared.get_weights()])
    out_a, out_b = model(random_inputs(model, 5))
    assert np.ptp(np.asarray(out_a)) == 0 and np.ptp(np.asarray(out_b)) == 0


def test_residual_cnn_adds_maps_of_equal_shape(keras_models):
    model = keras_models["residual_cnn"]
    assert tuple(model.get_layer("conv_3").output.shape) == tuple(model.get_layer("conv_2").output.shape)
    assert tuple(model.get_layer("add").output.shape) == (None, 24, 24, 32)


def test_softmax_and_sigmoid_ranges(keras_models):
    probabilities = np.asarray(keras_models["residual_cnn"](random_inputs(keras_models["residual_cnn"], 4)["image"]))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    output = np.asarray(keras_models["multi_input"](random_inputs(keras_models["multi_input"], 4)))
    assert ((output > 0) & (output < 1)).all()


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_same_seed_same_weights_other_seed_other_weights(keras_models, name):
    build = BUILTIN_MODELS[name].build
    again, other = build(1234), build(99)
    for a, b in zip(keras_models[name].get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b) for a, b in zip(keras_models[name].get_weights(), other.get_weights(), strict=True)
    )


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_exported_signature_matches_keras(keras_models, tmp_path, name):
    model = keras_models[name]
    version_dir = tmp_path / name / "1"
    repository.export_saved_model(model, version_dir, seed=1234)
    assert repository.is_intact(version_dir)
    runtime = SavedModelRuntime(name, 1, version_dir, "/device:CPU:0")
    inputs, outputs = EXPECTED_SIGNATURES[name]
    assert {n: s.shape for n, s in runtime.inputs.items()} == inputs
    assert {n: s.shape for n, s in runtime.outputs.items()} == outputs
    for rows in (1, 7):
        x = random_inputs(model, rows, seed=rows)
        served = runtime.predict(x)
        expected = model(x if len(x) > 1 else x["image"])
        expected = expected if isinstance(expected, list) else [expected]
        for output_name, value in zip(model.output_names, expected, strict=True):
            np.testing.assert_allclose(served[output_name], np.asarray(value), atol=1e-6)


def test_a_keras_file_is_a_runtime_of_its_own_kind(keras_models, tmp_path):
    """A .keras file opens through the base runtime like a SavedModel (specs, batch probe, hold point, warm-up)
    and says what it is: metadata reports platform 'keras', not 'tensorflow_savedmodel'."""
    model = keras_models["shared_layer"]
    (tmp_path / "1").mkdir()
    model.save(tmp_path / "1" / KERAS_FILE)
    runtime = KerasRuntime("shared_layer", 1, tmp_path / "1", "/device:CPU:0")
    saved = SavedModelRuntime.platform
    assert (runtime.platform, saved) == ("keras", "tensorflow_savedmodel")
    assert runtime.batched and runtime.unbatched_reason == ""
    inputs, outputs = EXPECTED_SIGNATURES["shared_layer"]
    assert {n: s.shape for n, s in runtime.inputs.items()} == inputs
    assert {n: s.shape for n, s in runtime.outputs.items()} == outputs
    calls = []
    runtime.before_call = calls.append  # the base class's hold point works for every runtime
    x = random_inputs(model, 3, seed=3)
    served = runtime.predict(x)
    for output_name, value in zip(model.output_names, model(x), strict=True):
        np.testing.assert_allclose(served[output_name], np.asarray(value), atol=1e-6)
    assert calls == ["shared_layer"]


def test_export_is_skipped_when_intact_and_redone_when_damaged(tmp_path):
    definition = BUILTIN_MODELS["multi_input"]
    built = []

    def build(seed):
        built.append(seed)
        return definition.build(seed)

    assert repository.ensure_exported(tmp_path, "multi_input", 1, build, 1234)
    marker = tmp_path / "multi_input" / "1" / repository.MANIFEST
    first_export = marker.stat().st_mtime_ns
    assert not repository.ensure_exported(tmp_path, "multi_input", 1, build, 1234)
    assert built == [1234] and marker.stat().st_mtime_ns == first_export

    # A damaged file: the version is moved aside and exported again.
    variables = next((tmp_path / "multi_input" / "1" / "variables").glob("*.data*"))
    variables.write_bytes(b"garbage")
    assert not repository.is_intact(tmp_path / "multi_input" / "1")
    assert repository.discover(tmp_path) == {}
    assert repository.ensure_exported(tmp_path, "multi_input", 1, build, 1234)
    assert built == [1234, 1234]
    assert repository.is_intact(tmp_path / "multi_input" / "1")
    assert [p.name.startswith(".damaged-1-") for p in (tmp_path / "multi_input").iterdir()].count(True) == 1


def test_discover_skips_half_written_and_takes_user_models(tmp_path, keras_models):
    repository.export_saved_model(keras_models["multi_input"], tmp_path / "multi_input" / "3", seed=1234)
    # An export interrupted before its rename, and a folder that is not a version.
    (tmp_path / "multi_input" / ".tmp-4-abc").mkdir()
    (tmp_path / "multi_input" / ".tmp-4-abc" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "multi_input" / "notes").mkdir()
    # A user's own SavedModel, copied in without a manifest.
    user = tmp_path / "my_model" / "2"
    repository.export_saved_model(keras_models["shared_layer"], user, seed=1)
    (user / repository.MANIFEST).unlink()
    found = repository.discover(tmp_path)
    assert {name: [v.version for v in versions] for name, versions in found.items()} == {
        "multi_input": [3],
        "my_model": [2],
    }


def test_a_flipped_byte_of_the_same_size_is_damage(tmp_path):
    """is_intact must compare hashes, not only names and sizes: bit rot keeps a file's size."""
    definition = BUILTIN_MODELS["multi_input"]
    assert repository.ensure_exported(tmp_path, "multi_input", 1, definition.build, 1234)
    version_dir = tmp_path / "multi_input" / "1"
    variables = next((version_dir / "variables").glob("*.data*"))
    data = bytearray(variables.read_bytes())
    data[len(data) // 2] ^= 0xFF
    variables.write_bytes(bytes(data))
    assert variables.stat().st_size == len(data)  # same size: only the hash can tell

    assert not repository.is_intact(version_dir)
    assert repository.ensure_exported(tmp_path, "multi_input", 1, definition.build, 1234)
    assert repository.is_intact(version_dir)
    aside = [p for p in (tmp_path / "multi_input").iterdir() if p.name.startswith(".damaged-1-")]
    assert len(aside) == 1
    assert (aside[0] / "variables" / variables.name).read_bytes() == bytes(data)  # the damaged copy, kept as it was


def test_staging_folders_left_by_exports_that_ended_early_are_removed_under_the_export_lock(tmp_path):
    """Whoever holds a model's export lock knows that no export of it runs anywhere: every .tmp-* folder is a
    leftover (a signal during start-up, a crash, SIGKILL), however recent, and goes; version folders stay."""
    model_dir = tmp_path / "multi_input"
    model_dir.mkdir()
    left = model_dir / ".tmp-1-left"
    left.mkdir()
    (left / "saved_model.pb").write_bytes(b"partial")
    (model_dir / "1").mkdir()

    with repository.export_lock(model_dir):
        assert repository.remove_abandoned_staging(model_dir) == [left]
    assert not left.exists()
    assert (model_dir / "1").is_dir()


def test_an_export_holds_the_lock_from_check_to_rename(tmp_path):
    """Replicas sharing a volume: while one exports (files written, not yet renamed into place), nobody else can
    take the lock, so nobody removes its staging folder or exports the same version beside it."""
    definition = BUILTIN_MODELS["multi_input"]
    seen = {}

    def before_commit() -> None:
        seen["staging"] = [p.name for p in (tmp_path / "multi_input").glob(".tmp-1-*")]
        with (tmp_path / "multi_input" / repository.EXPORT_LOCK).open("a") as other:  # another open file: another owner
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen["locked"] = False
            except BlockingIOError:
                seen["locked"] = True

    assert repository.ensure_exported(tmp_path, "multi_input", 1, definition.build, 1234, before_commit)
    assert seen["locked"] is True and len(seen["staging"]) == 1
    assert repository.is_intact(tmp_path / "multi_input" / "1")
    assert not list((tmp_path / "multi_input").glob(".tmp-*"))
    with (tmp_path / "multi_input" / repository.EXPORT_LOCK).open("a") as other:  # released after the export
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_version_exported_with_another_seed_is_moved_aside_and_exported_again(tmp_path, keras_models):
    """--seed decides the weights: a repository left by a run with another seed must not be served as it is."""
    definition = BUILTIN_MODELS["multi_input"]
    version_dir = tmp_path / "multi_input" / "1"
    assert repository.ensure_exported(tmp_path, "multi_input", 1, definition.build, 1234)
    old_manifest = json.loads((version_dir / repository.MANIFEST).read_text())

    assert repository.ensure_exported(tmp_path, "multi_input", 1, definition.build, 99)
    manifest = json.loads((version_dir / repository.MANIFEST).read_text())
    assert (old_manifest["seed"], manifest["seed"]) == (1234, 99)
    aside = [p for p in (tmp_path / "multi_input").iterdir() if p.name.startswith(".seed-1234-1-")]
    assert len(aside) == 1 and json.loads((aside[0] / repository.MANIFEST).read_text()) == old_manifest
    assert repository.discover(tmp_path)["multi_input"][0].path == version_dir  # the copy aside is never loaded

    # The served weights are seed 99's, not seed 1234's.
    inputs = random_inputs(keras_models["multi_input"], 4, seed=5)
    served = SavedModelRuntime("multi_input", 1, version_dir, "/device:CPU:0").predict(inputs)["output"]
    np.testing.assert_allclose(served, np.asarray(definition.build(99)(inputs)), atol=1e-6)
    assert not np.allclose(served, np.asarray(keras_models["multi_input"](inputs)), atol=1e-4)
    # An intact copy with the requested seed is kept.
    assert not repository.ensure_exported(tmp_path, "multi_input", 1, definition.build, 99)
