"""TensorFlow's C++ log level, chosen before anything imports TensorFlow (SPEC §11)."""

from __future__ import annotations

import ctypes.util
import os


def nvidia_driver_present() -> bool:
    """Whether a GPU could be used here: the NVIDIA kernel driver is loaded, or its user-space library is installed."""
    return os.path.exists("/proc/driver/nvidia/version") or ctypes.util.find_library("cuda") is not None


def quiet_tensorflow_logs() -> None:
    """Hide TensorFlow's C++ info and warning lines (level 2); without an NVIDIA driver, its error lines too (3).

    There, TensorFlow's CUDA probe logs "failed call to cuInit" as an error at every start, although running on the
    CPU is the expected outcome, and operators learn to ignore error lines. TensorFlow's real failures still reach
    us as Python exceptions, which we log. A value the user set wins.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if nvidia_driver_present() else "3")
