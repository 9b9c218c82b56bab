"""Regenerate the Python gRPC stubs from proto/ (the one code-generation command).

Runs protoc as its own process: grpc_tools.protoc crashes inside a process that has
imported tensorflow (SPEC §11). Usage: python proto/generate.py [OUTPUT_ROOT]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(output_root: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto under proto/ into output_root."""
    output_root.mkdir(parents=True, exist_ok=True)
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={output_root}",
            f"--pyi_out={output_root}",
            f"--grpc_python_out={output_root}",
            *sources,
        ],
        check=True,
        cwd=PROTO_ROOT,
    )
    # Packages for the generated modules, so they import as modelserver.v1.modelserver_pb2.
    for source in sources:
        package_dir = output_root / Path(source).parent
        while package_dir != output_root:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent
    return sorted(p for p in output_root.rglob("*") if p.is_file())


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT)
