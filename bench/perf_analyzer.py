"""Bring Triton's perf_analyzer in from the package registries, outside our venv (`make perf-analyzer`).

The binary ships in the tritonclient 2.41.1 wheel (a version our venv does not use: it would pin an older
protobuf), and needs libb64 (Debian's libb64-0d) and the CUDA runtime library (the nvidia-cuda-runtime-cu12
wheel) even to talk gRPC to a CPU-only server. Wheels are downloaded, never installed: the binary goes to
.perf_analyzer/bin, the library to .perf_analyzer/lib. Usage: python -m bench.perf_analyzer [DEST]
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TRITONCLIENT = "tritonclient==2.41.1"
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12==12.9.79"
DEST = Path(__file__).resolve().parent.parent / ".perf_analyzer"


def binary(dest: Path = DEST) -> Path:
    return dest / "bin" / "perf_analyzer"


def environment(dest: Path = DEST) -> dict[str, str]:
    """The environment to run the binary in: our copy of libcudart on the library path."""
    return {**os.environ, "LD_LIBRARY_PATH": str(dest / "lib")}


def _ensure_libb64() -> None:
    if ctypes.util.find_library("b64"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("perf_analyzer needs libb64 from Debian: apt-get install libb64-0d")
    install = ["apt-get", "install", "-y", "-q", "libb64-0d"]
    if subprocess.run(install, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, stdout=subprocess.DEVNULL, check=True)


def _extract(wheel: Path, suffix: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith(suffix)]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.read(member))


def install(dest: Path = DEST) -> Path:
    _ensure_libb64()
    with tempfile.TemporaryDirectory() as tmp:
        for requirement, platform in ((TRITONCLIENT, "manylinux1_x86_64"), (CUDA_RUNTIME, "manylinux2014_x86_64")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                 "--platform", platform, "--dest", tmp, requirement],
                check=True,
            )  # fmt: skip
        _extract(next(Path(tmp).glob("tritonclient-*.whl")), "/bin/perf_analyzer", binary(dest))
        _extract(
            next(Path(tmp).glob("nvidia_cuda_runtime_cu12-*.whl")), "/libcudart.so.12", dest / "lib" / "libcudart.so.12"
        )
    binary(dest).chmod(0o755)
    subprocess.run([str(binary(dest)), "--version"], env=environment(dest), check=True)
    return binary(dest)


if __name__ == "__main__":
    install(Path(sys.argv[1]) if len(sys.argv) > 1 else DEST)
