"""python -m server: parse settings, then serve until SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import sys


def _stop_while_starting(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT before the server's own handlers are in place (importing TensorFlow, building the server):
    nothing is accepted or written yet, so exit at once. As PID 1 in a container a signal without a handler is
    ignored, so without this `docker stop` / `podman stop` / a Kubernetes rollout would wait for SIGKILL."""
    os.write(2, f"{signal.Signals(signum).name} received while starting: exiting\n".encode())
    os._exit(0)


# First of all, before TensorFlow is imported (seconds): server.app replaces these once it serves the signals itself.
for _signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signum, _stop_while_starting)

import asyncio  # noqa: E402
import logging  # noqa: E402

from server.base.tf_logging import quiet_tensorflow_logs  # noqa: E402

quiet_tensorflow_logs()  # before anything imports TensorFlow

from server.base.hold import HoldPoints  # noqa: E402
from server.settings import configure_logging, parse_settings  # noqa: E402
from server.workers.supervisor import Supervisor, worker_count  # noqa: E402


def main() -> int:
    settings = parse_settings()
    configure_logging(settings.log_level)
    workers = worker_count(settings.workers)
    if workers > 1:  # --workers: a supervisor and spawned server processes on one port (server/workers/supervisor.py)
        return Supervisor(settings, workers).run()
    HoldPoints(settings.test_hold_dir).wait("import")  # tests: a signal before TensorFlow is imported
    from server.app import serve  # here, so that a supervisor never imports TensorFlow (server.app brings it)

    code = asyncio.run(serve(settings))
    # Stopped (drained, or stopped while starting): exit now. A signal during start-up leaves an export or a model
    # load running on a worker thread, which cannot be interrupted and which the interpreter's exit would wait for;
    # nothing else worth waiting for remains (as in server/workers/supervisor.py).
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
