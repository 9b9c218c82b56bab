"""TF Serving's model config file (`--model_config_file`): which models to serve, each from its own folder, with its
version policy and version labels. Read with TF Serving's own `ModelServerConfig` proto (text format), so a file
written for TF Serving works here unchanged; the same message arrives by ModelService/HandleReloadConfigRequest.

```
model_config_list {
  config {
    name: "mnist"
    base_path: "/models/mnist"          # holds the version folders 1/, 2/, ...
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
}
```

A config is checked whole before anything changes (`parse_config`, `from_proto`): a text that does not parse, a
model listed twice, an empty name or base_path, a platform other than TensorFlow's, a policy without versions, a
label on a version below 1. Whether a label may point at its version is the model manager's rule, which knows what
is available (server/registry/manager.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from server.base.errors import InvalidInputError
from server.registry.version_policy import VersionPolicy

if TYPE_CHECKING:
    from tensorflow_serving.config import model_server_config_pb2

# What TF Serving calls a SavedModel's platform; "" is its default too.
PLATFORMS = ("tensorflow", "")


@dataclass(frozen=True)
class ModelEntry:
    """One model of the config: its name, the folder of its versions, its version policy and labels."""

    name: str
    base_path: Path
    policy: VersionPolicy = field(default_factory=lambda: VersionPolicy("latest"))
    labels: Mapping[str, int] = field(default_factory=dict)
    platform: str = "tensorflow"


@dataclass(frozen=True)
class ServingConfig:
    """The models to serve, by name (in the config's order), and the folder relative base paths start from."""

    models: Mapping[str, ModelEntry]
    root: Path = Path()
    source: bytes = b""  # the ModelServerConfig message, serialized: what tells a changed config from the same one

    def labels(self) -> dict[str, dict[str, int]]:
        return {name: dict(entry.labels) for name, entry in self.models.items() if entry.labels}


def _policy(config: model_server_config_pb2.ModelConfig) -> VersionPolicy:
    policy = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy("all")
    if choice == "specific":
        versions = list(policy.specific.versions)
        if not versions or min(versions) < 1:
            raise InvalidInputError(
                f"model {config.name}: model_version_policy specific needs versions >= 1, got {versions or 'none'}"
            )
        return VersionPolicy("specific", versions=frozenset(versions))
    count = policy.latest.num_versions if choice == "latest" else 1
    return VersionPolicy("latest", count=count or 1)  # TF Serving's default: the latest one


def from_proto(message: model_server_config_pb2.ModelServerConfig, root: Path) -> ServingConfig:
    """A ModelServerConfig as the models to serve; relative base paths are taken from `root` (the config file's
    folder). Raises InvalidInputError saying what is wrong, in TF Serving's words where it has them."""
    if message.WhichOneof("config") != "model_config_list":
        raise InvalidInputError(
            "ServerModelConfig type not supported: only model_config_list is (custom_model_config is not)"
        )
    models: dict[str, ModelEntry] = {}
    for config in message.model_config_list.config:
        if not config.name:
            raise InvalidInputError("every model of model_config_list needs a name")
        if config.name in models:
            raise InvalidInputError(f"Illegal to list model {config.name} multiple times in config list")
        if not config.base_path:
            raise InvalidInputError(f"model {config.name} needs a base_path (the folder of its version folders)")
        if config.model_platform not in PLATFORMS:
            raise InvalidInputError(
                f"model {config.name}: model_platform {config.model_platform!r} is not served here; the platform of "
                "a SavedModel is 'tensorflow'"
            )
        labels = dict(config.version_labels)
        for label, version in sorted(labels.items()):
            if not label or version < 1:
                raise InvalidInputError(
                    f"model {config.name}: version label {label!r} must name a version >= 1, got {version}"
                )
        base_path = Path(config.base_path.removeprefix("file://"))
        models[config.name] = ModelEntry(
            config.name, base_path if base_path.is_absolute() else root / base_path, _policy(config), labels
        )
    return ServingConfig(models, root, message.SerializeToString(deterministic=True))


def parse_config(text: str, root: Path) -> ServingConfig:
    """A config file's text (TF Serving's text format) as the models to serve."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    try:
        message = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as error:
        raise InvalidInputError(f"the model config is not a text-format ModelServerConfig: {error}") from None
    return from_proto(message, root)


def read_config(path: Path) -> ServingConfig:
    """The config file at `path` (raises InvalidInputError for a file that cannot be read or parsed)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"cannot read the model config file {path}: {error}") from None
    return parse_config(text, path.parent)
