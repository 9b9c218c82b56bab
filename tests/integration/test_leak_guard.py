"""Nothing a test starts outlives it (issue 21): ServerProcess.kill() ends a real server with everything it started.
The session's leak guard itself: tests/unit/test_leak_guard.py."""

from __future__ import annotations

import signal
import time

from harness.procs import descendants, processes
from harness.server import ServerProcess


def test_a_server_is_killed_with_every_process_it_started_and_kill_can_be_repeated(model_repository, server):
    """ServerProcess.kill() ends the server and everything it started, at once: with --workers, the supervisor,
    its workers (each in a process group of its own) and multiprocessing's resource tracker; and it is harmless
    when called again."""
    with ServerProcess(model_repository, ["--workers", "2"]) as process:
        started = descendants(process.process.pid)
        assert len(started) >= 3 and set(process.server_pids) <= {p.pid for p in started}, started
    assert process.process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while left := [p for p in started if (now := processes().get(p.pid)) and now.start == p.start and now.live]:
        assert time.monotonic() < deadline, f"still running after kill(): {left}"
        time.sleep(0.05)
    process.kill()  # again: nothing left to do, and no error
    process.kill()
