"""Processes as /proc shows them (Linux; no dependency): who started whom, and killing a process together with
everything it started. Used by ServerProcess.kill() and the session's leak guard.

A process is named by its pid and its start time: a pid is reused once its process is gone, so a process seen
earlier is killed only while that pid still names the process that was seen.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    group: int  # process group id
    name: str
    state: str  # "Z": exited, waiting for its parent to reap it
    start: int  # clock ticks after boot

    @property
    def live(self) -> bool:
        return self.state not in ("Z", "X")

    def describe(self) -> str:
        """Its pid, name and command line (read now, only for a report: most processes listed are not reported)."""
        try:
            command = Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            command = ""
        return f"pid {self.pid} {self.name!r} ({command.strip()[:200] or '[' + self.name + ']'})"


def process(pid: int) -> Process | None:
    """The process with this pid now (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3, "state", on
    return Process(pid, int(fields[1]), int(fields[2]), name, fields[0], int(fields[19]))


def processes() -> dict[int, Process]:
    """Every process on the machine, by pid."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (seen := process(int(entry.name))) is not None:
            found[seen.pid] = seen
    return found


def descendants(pid: int, table: dict[int, Process] | None = None) -> list[Process]:
    """The processes `pid` started, theirs, and so on (parents before their children)."""
    table = processes() if table is None else table
    children: dict[int, list[Process]] = {}
    for each in table.values():
        children.setdefault(each.ppid, []).append(each)
    found: list[Process] = []
    todo = list(children.get(pid, []))
    while todo:
        found.append(todo.pop(0))
        todo.extend(children.get(found[-1].pid, []))
    return found


def same(seen: Process) -> bool:
    """Whether `seen`'s pid still names that process, alive."""
    now = process(seen.pid)
    return now is not None and now.start == seen.start and now.live


def kill(seen: Process) -> bool:
    """SIGKILL the process if its pid still names it; whether it did."""
    if not same(seen):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(seen.pid, signal.SIGKILL)
    return True


def kill_tree(pid: int, others: Iterable[Process] = ()) -> None:
    """SIGKILL `pid` (which must not be reaped yet: its pid is still its own) and every process it started, and
    `others` that are still the processes seen. It is stopped (SIGSTOP) first, so that it starts nothing new while
    its descendants are listed; they are killed whatever process group they moved to."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    try:
        for each in [*descendants(pid), *others]:
            kill(each)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
