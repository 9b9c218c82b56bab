"""shared_layer: one Dense(16, relu) layer object applied to both branches, a sigmoid head per branch.

The textbook version feeds input_a (width 10) and input_b (width 20) straight into one Dense layer,
which cannot work: the layer's kernel is built for the first input's width. The smallest fix that keeps
the intent is a linear per-branch projection to a common width (16) before the shared layer, so the
shared layer's weights still exist once and are applied to both branches.
"""

from __future__ import annotations

import keras

NAME = "shared_layer"
VERSION = 1
COMMON_WIDTH = 16


def build(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    input_a = keras.Input(shape=(10,), name="input_a")
    input_b = keras.Input(shape=(20,), name="input_b")
    projected_a = keras.layers.Dense(COMMON_WIDTH, name="project_a")(input_a)
    projected_b = keras.layers.Dense(COMMON_WIDTH, name="project_b")(input_b)
    shared = keras.layers.Dense(16, activation="relu", name="shared_layer")
    output_a = keras.layers.Dense(1, activation="sigmoid", name="output_a")(shared(projected_a))
    output_b = keras.layers.Dense(1, activation="sigmoid", name="output_b")(shared(projected_b))
    return keras.Model(inputs=[input_a, input_b], outputs=[output_a, output_b], name=NAME)
