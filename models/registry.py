"""The registry of built-in models: name -> version and builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models import multi_input, residual_cnn, shared_layer

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class ModelDefinition:
    name: str
    version: int
    build: Callable[[int], keras.Model]


BUILTIN_MODELS: dict[str, ModelDefinition] = {
    module.NAME: ModelDefinition(module.NAME, module.VERSION, module.build)
    for module in (multi_input, shared_layer, residual_cnn)
}
