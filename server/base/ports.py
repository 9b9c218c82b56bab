"""The port file (--port-file): the ports a server bound, for whoever started it (a supervisor, a test)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path


def write_port_file(
    path: Path, grpc_port: int, metrics_port: int | None, pids: Sequence[int], http_port: int | None = None
) -> None:
    """Write the ports as JSON, atomically: a reader sees the whole file or none. `pids` are the processes that
    serve the port (the server itself, or its workers); `http_port` is the REST APIs' (None: switched off)."""
    content = {
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "http_port": http_port,
        "pid": os.getpid(),
        "server_pids": list(pids),
    }
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(content) + "\n")
    staging.replace(path)
