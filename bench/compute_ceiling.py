"""The compute ceiling: rows/s of each model's serving signature called in-process at each batch size, through
the same ModelRuntime.predict the server uses, with no gRPC and no batcher.

Run as its own process by bench/run.py, so its TensorFlow threads are gone before the servers start.
Usage: python -m bench.compute_ceiling REPOSITORY SECONDS_PER_SIZE  (prints JSON)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from server.runtimes.base import ModelRuntime
from server.runtimes.device import select_device
from server.runtimes.savedmodel import SavedModelRuntime

BATCH_SIZES = {"multi_input": (1, 8, 64, 256), "residual_cnn": (1, 8, 32, 64, 128)}


def measure(runtime: ModelRuntime, rows: int, seconds: float) -> dict[str, float]:
    rng = np.random.default_rng(0)
    inputs = {}
    for name, spec in runtime.inputs.items():
        shape = spec.fixed_shape
        if shape is None:
            raise ValueError(f"{runtime.name} input {name} has dimensions of unknown size: {spec.describe()}")
        inputs[name] = rng.random((rows, *shape), dtype=np.float32)
    runtime.predict(inputs)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runtime.predict(inputs)
        calls += 1
    elapsed = time.perf_counter() - start
    return {"calls_per_s": calls / elapsed, "rows_per_s": calls * rows / elapsed}


def main(repository: Path, seconds: float) -> dict:
    device = select_device()
    result: dict = {"device": device}
    for name, sizes in BATCH_SIZES.items():
        runtime = SavedModelRuntime(name, 1, repository / name / "1", device)
        result[name] = {str(rows): measure(runtime, rows, seconds) for rows in sizes}
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), float(sys.argv[2]))))
