"""multi_input: two inputs, one Dense(32, relu) branch each, concatenated into one sigmoid output."""

from __future__ import annotations

import keras

NAME = "multi_input"
VERSION = 1


def build(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    input_a = keras.Input(shape=(10,), name="input_a")
    input_b = keras.Input(shape=(20,), name="input_b")
    branch_a = keras.layers.Dense(32, activation="relu", name="branch_a")(input_a)
    branch_b = keras.layers.Dense(32, activation="relu", name="branch_b")(input_b)
    merged = keras.layers.Concatenate(name="concatenate")([branch_a, branch_b])
    output = keras.layers.Dense(1, activation="sigmoid", name="output")(merged)
    return keras.Model(inputs=[input_a, input_b], outputs=output, name=NAME)
