"""Nothing a test starts outlives it (issue 21). The session's leak guard (tests/helpers/leak_guard.py), run on
tiny pytest sessions of its own: a test that leaves a thread and processes running makes the run fail, names them,
kills the processes, and pytest exits by itself; a test that cleans up after itself does not trip it. That
ServerProcess.kill() ends a server with everything it started: tests/integration/test_leak_guard.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from harness.server import REPO_ROOT

EXIT_BOUND = 60  # seconds: without the guard the leaking session would never end (a thread sleeping 1000 s)

LEAKING = """
import subprocess
import threading
import time
from pathlib import Path


def test_leaves_a_thread_and_processes_running():
    threading.Thread(target=time.sleep, args=(1000,), name="never-ends").start()  # not a daemon
    child = subprocess.Popen(["sleep", "1000"])
    # A grandchild whose parent exits at once: re-parented, no longer this process's descendant.
    orphan = subprocess.run(["sh", "-c", "sleep 1001 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    Path("pids").write_text(f"{child.pid} {orphan.stdout.strip()}")
"""

TIDY = """
import subprocess
import threading


def test_cleans_up_after_itself():
    thread = threading.Thread(target=lambda: None, name="short-lived")
    thread.start()
    thread.join()
    assert subprocess.run(["true"]).returncode == 0
"""


def _session(folder: Path, test: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """A pytest session in `folder` with the guard plugged in as tests/conftest.py plugs it; its result and time."""
    (folder / "conftest.py").write_text('pytest_plugins = ["tests.helpers.leak_guard"]\n')
    (folder / "test_it.py").write_text(textwrap.dedent(test))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_it.py"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=EXIT_BOUND)
    return result, time.monotonic() - started


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that is not us counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def test_a_session_that_leaks_fails_names_the_leaks_kills_the_processes_and_exits(tmp_path):
    result, seconds = _session(tmp_path, LEAKING)
    pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    try:
        output = result.stdout + result.stderr
        assert result.returncode == 1, output  # the test itself passed: the guard failed the run
        assert "1 passed" in output, output
        assert "leak guard: 1 thread(s) and 2 process(es) left running" in output, output
        assert "thread 'never-ends'" in output and "first seen after test_it.py::test_leaves" in output, output
        assert "(sleep 1000)" in output and "(sleep 1001)" in output, output
        assert output.count("killed (SIGKILL)") == 2, output
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, f"still running: {[pid for pid in pids if _alive(pid)]}"
            time.sleep(0.05)
        print(f"leaking session ended by itself in {seconds:.1f}s")
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_session_that_cleans_up_passes_untouched(tmp_path):
    result, _ = _session(tmp_path, TIDY)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "1 passed" in output, output
    assert "leak guard" not in output, output
