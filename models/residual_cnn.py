"""residual_cnn: three 3x3 convolutions with a residual add, then a 10-way softmax.

In the textbook version the third convolution is "valid", so it maps the 24x24 residual to 22x22 and
the add fails. The smallest fix is padding="same" on the third convolution: it keeps 24x24 and the add
joins two maps of the same shape.
"""

from __future__ import annotations

import keras

NAME = "residual_cnn"
VERSION = 1


def build(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    image = keras.Input(shape=(28, 28, 1), name="image")
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv_1")(image)
    residual = keras.layers.Conv2D(32, 3, activation="relu", name="conv_2")(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", padding="same", name="conv_3")(residual)
    x = keras.layers.Add(name="add")([x, residual])
    x = keras.layers.Flatten(name="flatten")(x)
    probabilities = keras.layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs=image, outputs=probabilities, name=NAME)
