"""python -m server: parse settings, then serve until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import os
import sys

# Quiet TensorFlow's C++ start-up chatter before anything imports it (SPEC §11).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from server.settings import configure_logging, parse_settings  # noqa: E402
from server.workers import Supervisor, worker_count  # noqa: E402


def main() -> int:
    settings = parse_settings()
    configure_logging(settings.log_level)
    workers = worker_count(settings.workers)
    if workers > 1:  # --workers: a supervisor and spawned server processes on one port (server/workers.py)
        return Supervisor(settings, workers).run()
    from server.app import serve  # here, so that a supervisor never imports TensorFlow (server.app brings it)

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
