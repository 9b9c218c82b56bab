"""TF Serving's model config file (server/registry/model_config.py), read with its own ModelServerConfig proto, and
the model manager's rule for version labels (server/registry/manager.py): no server, no model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from server.base.errors import InvalidInputError, ModelNotFoundError, NotAllowedError
from server.registry.manager import ModelManager, State
from server.registry.model_config import ModelEntry, ServingConfig, parse_config, read_config
from server.registry.version_policy import VersionPolicy

# As TF Serving's documentation writes one (https://www.tensorflow.org/tfx/serving/serving_config).
CONFIG = """
model_config_list {
  config {
    name: 'mnist'
    base_path: '/models/mnist'
    model_platform: 'tensorflow'
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: 'stable' value: 1 }
    version_labels { key: 'canary' value: 2 }
  }
  config {
    name: 'resnet'
    base_path: 'resnet'
    model_platform: 'tensorflow'
    model_version_policy { all {} }
  }
  config {
    name: 'plain'
    base_path: 'file:///models/plain'
  }
}
"""


def test_a_tf_serving_config_file_reads_as_it_is():
    config = parse_config(CONFIG, Path("/etc/serving"))
    assert list(config.models) == ["mnist", "resnet", "plain"]
    mnist = config.models["mnist"]
    assert mnist.base_path == Path("/models/mnist") and mnist.policy == VersionPolicy("specific", versions={1, 2})
    assert dict(mnist.labels) == {"stable": 1, "canary": 2}
    assert config.models["resnet"].base_path == Path("/etc/serving/resnet")  # relative: from the file's folder
    assert config.models["resnet"].policy == VersionPolicy("all")
    assert config.models["plain"].base_path == Path("/models/plain")
    assert config.models["plain"].policy == VersionPolicy("latest", count=1)  # TF Serving's default
    assert config.labels() == {"mnist": {"stable": 1, "canary": 2}}
    assert parse_config(CONFIG.replace("'", '"'), Path("/")).source == config.source  # the same, written differently


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("model_config_list { config { name: 'a' base_path: '/a' } ", "not a text-format ModelServerConfig"),
        ("model_config_list { config { nme: 'a' } }", "not a text-format ModelServerConfig"),
        (
            "model_config_list { config { name: 'a' base_path: '/a' } config { name: 'a' base_path: '/b' } }",
            "Illegal to list model a multiple times in config list",
        ),
        ("model_config_list { config { name: 'a' } }", "model a needs a base_path"),
        ("model_config_list { config { base_path: '/a' } }", "every model of model_config_list needs a name"),
        (
            "model_config_list { config { name: 'a' base_path: '/a' model_platform: 'pytorch' } }",
            "model_platform 'pytorch' is not served here",
        ),
        (
            "model_config_list { config { name: 'a' base_path: '/a' version_labels { key: 'x' value: 0 } } }",
            "version label 'x' must name a version >= 1, got 0",
        ),
        (
            "model_config_list { config { name: 'a' base_path: '/a' model_version_policy { specific {} } } }",
            "specific needs versions >= 1",
        ),
        ("custom_model_config {}", "only model_config_list is"),
    ],
)
def test_an_invalid_config_is_refused_saying_why(text, words):
    with pytest.raises(InvalidInputError, match=words):
        parse_config(text, Path("/"))


def test_a_missing_file_is_refused_by_name(tmp_path):
    with pytest.raises(InvalidInputError, match="cannot read the model config file .*models.config"):
        read_config(tmp_path / "models.config")


def _config(labels: dict[str, int]) -> ServingConfig:
    return ServingConfig({"m": ModelEntry("m", Path("/m"), VersionPolicy("all"), labels)})


def _label_series(label: str) -> dict[str, float]:
    return {
        s.labels["version"]: s.value
        for family in REGISTRY.collect()
        if family.name == "modelserver_version_label_info"
        for s in family.samples
        if s.labels["model"] == "m" and s.labels["label"] == label
    }


def test_labels_name_available_versions_unless_allowed_and_move_at_once():
    """TF Serving's rule (server_core.cc): a label may name only an available version; with the flag, a new label
    (or one that keeps its version) may name any, but moving one still needs its new version available."""

    async def scenario() -> None:
        manager = ModelManager(Path("/nowhere"), lambda found: None, lambda runtime: None, lambda name: None)  # type: ignore[arg-type,return-value]
        for number in (1, 2):
            manager.add_available(SimpleNamespace(name="m", version=number))  # type: ignore[arg-type]
        manager.use_config(_config({"stable": 1, "canary": 2}))
        manager.check_labels(_config({"stable": 1, "canary": 2}))
        assert manager.version_for_label("m", "canary") == 2
        assert _label_series("canary") == {"2": 1.0}
        with pytest.raises(NotAllowedError, match="label to version 3 of model m, which is not currently available"):
            manager.check_labels(_config({"stable": 1, "canary": 3}))
        manager.allow_unavailable_labels = True
        manager.check_labels(_config({"stable": 1, "canary": 2, "next": 3}))  # a new label: allowed
        with pytest.raises(NotAllowedError, match="version 3 .*label 'canary'"):
            manager.check_labels(_config({"stable": 1, "canary": 3}))  # moving one: not
        manager.use_config(_config({"stable": 2}))
        assert manager.version_for_label("m", "stable") == 2
        assert _label_series("canary") == {} and _label_series("stable") == {"2": 1.0}  # old series are gone
        with pytest.raises(ModelNotFoundError, match="no version label 'canary'; its labels: stable -> 2$"):
            manager.version_for_label("m", "canary")
        manager._models["m"].versions[2].state = State.LOADING
        manager.allow_unavailable_labels = False
        with pytest.raises(NotAllowedError, match="version 2 of model m"):
            manager.check_labels(_config({"stable": 2}))
        await manager.close()

    asyncio.run(scenario())
