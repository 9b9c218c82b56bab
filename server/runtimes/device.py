"""Device placement: the first GPU TensorFlow sees (memory growth on), else the CPU."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def select_device(intra_op_threads: int = 0, inter_op_threads: int = 0) -> str:
    """Configure TensorFlow before it initialises devices and return the device name to run on."""
    import tensorflow as tf

    if intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        # Grow memory on demand so several replicas (or other processes) can share one GPU.
        tf.config.experimental.set_memory_growth(gpu, True)
    device = "/device:GPU:0" if gpus else "/device:CPU:0"
    log.info("running models on %s (%d GPU(s) visible)", device, len(gpus))
    return device
