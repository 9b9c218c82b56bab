"""The session's leak guard, a pytest plugin (tests/conftest.py loads it): after the last test, every thread and
process the tests left running is reported by name, the processes are killed, the run fails, and pytest exits by
itself (issue 21).

Why a guard and not only careful tests: a test that fails half-way skips whatever it meant to stop, and a per-test
timeout (pytest-timeout) ends the test, not what it started. A non-daemon thread still running when pytest returns
makes the interpreter wait for it at exit, for ever if it never ends, and a child process outlives pytest. So:

- threads: every non-daemon thread but the main one, given a few seconds to end; threads cannot be killed, so when
  one is left the guard prints where it is and ends the process with os._exit() once pytest has finished
  (pytest_unconfigure), instead of letting interpreter shutdown join it;
- processes: every live descendant of this process, and every process that carries this session's mark in its
  environment (set here and inherited by whatever the tests start), which also finds a server's workers whose
  supervisor was killed (they are re-parented, no longer our descendants). Each is SIGKILLed.

Read from /proc (Linux), with no dependency. A thread or process is said to be "first seen after" the test after
which the guard first noticed it, to point at the test that started it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Generator
from pathlib import Path

import pytest

from harness.procs import Process, descendants, kill, processes

MARK = "MODELSERVER_TEST_SESSION"  # environment variable: this session's id, inherited by every process it starts
GRACE_SECONDS = 5.0  # for what is ending anyway (a thread finishing its last call, a process exiting) to go
# Container runtime helpers, designed to outlive the `podman` command that started them (and to carry its
# environment); the container tests remove their containers themselves (`podman rm --force`, compose down).
DAEMONS = frozenset({"conmon", "aardvark-dns", "netavark", "catatonit", "slirp4netns", "pasta", "rootlessport"})


def _carries(pid: int, mark: bytes) -> bool:
    try:
        return mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def running_processes(mark: str) -> list[Process]:
    """This process's live descendants, and the live processes started after it that carry `mark`."""
    table = processes()
    me = table.get(os.getpid())
    found = descendants(os.getpid(), table)
    ours = {process.pid for process in found} | {os.getpid()}
    tagged = f"{MARK}={mark}".encode()
    for process in table.values():
        if process.pid in ours or process.name in DAEMONS or me is None or process.start < me.start:
            continue
        if _carries(process.pid, tagged):
            found.append(process)
    return [process for process in found if process.live]


def running_threads() -> list[threading.Thread]:
    """Non-daemon threads other than the main thread: each would hold up interpreter exit."""
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


def _where(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "(no Python frame)"
    stack = traceback.extract_stack(frame)
    own = [f for f in stack if Path(f.filename).name != "threading.py"] or stack  # the thread's code, innermost last
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(own[-3:]))


def _kill(process: Process) -> bool:
    """SIGKILL the process if its pid still names it; reap it if it is our child."""
    if not kill(process):
        return False
    if process.ppid == os.getpid():
        deadline = time.monotonic() + GRACE_SECONDS
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(process.pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.01)
    return True


class LeakGuard:
    """The plugin's state: this session's mark, where each thread or process was first seen, what was left."""

    def __init__(self) -> None:
        self.mark = uuid.uuid4().hex
        os.environ[MARK] = self.mark  # every process started from now on inherits it
        self.first_seen: dict[tuple[str, int, int], str] = {}
        self.session: pytest.Session | None = None
        self.threads_left: list[threading.Thread] = []

    def _note(self, after: str) -> None:
        for thread in running_threads():
            self.first_seen.setdefault(("thread", thread.ident or 0, 0), after)
        for process in running_processes(self.mark):
            self.first_seen.setdefault(("process", process.pid, process.start), after)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, object, object]:
        try:
            return (yield)
        finally:
            self._note(item.nodeid)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.session = session

    @pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down (runner's pytest_sessionfinish)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        deadline = time.monotonic() + GRACE_SECONDS
        for thread in running_threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        while running_processes(self.mark) and time.monotonic() < deadline:
            time.sleep(0.05)
        threads, left = running_threads(), running_processes(self.mark)
        if not threads and not left:
            return
        lines = []
        for thread in threads:
            seen = self._seen("thread", thread.ident or 0, 0)
            lines.append(f"thread {thread.name!r} (non-daemon, {seen}), at {_where(thread)}")
        for process in left:
            described = f"process {process.describe()}, {self._seen('process', process.pid, process.start)}"
            outcome = "killed (SIGKILL)" if _kill(process) else "gone before it could be killed"
            lines.append(f"{described}: {outcome}")
        if threads:
            lines.append("threads cannot be killed: pytest exits at once when it is done, without joining them")
        self._report(session, f"{len(threads)} thread(s) and {len(left)} process(es) left running", lines)
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        self.threads_left = threads

    def _seen(self, kind: str, ident: int, start: int) -> str:
        after = self.first_seen.get((kind, ident, start))
        return f"first seen after {after}" if after else "started after the last test"

    @staticmethod
    def _report(session: pytest.Session, title: str, lines: list[str]) -> None:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            print(f"leak guard: {title}", *lines, sep="\n  ", file=sys.stderr)
            return
        reporter.line("")  # ends the progress line
        reporter.write_sep("=", f"leak guard: {title}", red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if not self.threads_left:
            return
        status = int(self.session.exitstatus) if self.session is not None else int(pytest.ExitCode.TESTS_FAILED)
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)  # interpreter shutdown would join the threads left running


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("leak-guard"):
        config.pluginmanager.register(LeakGuard(), "leak-guard")
