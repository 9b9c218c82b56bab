"""--workers N: N server processes on one gRPC port, under a small supervisor (the parent process).

Why: the server is CPU-bound on its one event loop (README, Benchmark), so more cores need more processes.
How, as grpc's own multiprocessing example does: every worker binds the same port with SO_REUSEPORT and the
kernel hands each new connection to one of them. Workers are *spawned* (a fresh interpreter), never forked:
TensorFlow is not fork-safe (kserve/kserve#2393: forked workers hang with a Keras model). The supervisor never
imports TensorFlow itself: a spawned helper exports the built-in models once, before any worker starts.

Each worker is the ordinary server (server/app.py) with its own health service, batcher and drain; the
supervisor serves the summed metrics (server/workers/metrics.py), forwards SIGTERM/SIGINT to every worker as
SIGTERM and exits 0 once all have drained. A worker that dies ends the server: the others drain and the
supervisor exits 1, so that the orchestrator restarts it whole (see README, Workers).

The workers act as one server where a client could tell them apart (server/grpc/drain.py, Siblings): none is ready
(ServerReady, health, ModelReady, calls taken) before every one serves, which a flag in shared memory says to all of
them at the same instant; and their drains pass the last steps together, agreed through the supervisor over each
worker's pipe, so that a caller sent away by one worker never reaches a sibling that is closing its listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import typing
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from server.base.ports import write_port_file
from server.grpc.drain import STEPS, Siblings
from server.settings import Settings, configure_logging

log = logging.getLogger(__name__)

SPAWN = get_context("spawn")
# Seconds past --shutdown-delay + --grace-period after which a worker still running is killed.
KILL_MARGIN = 10.0
POLL_SECONDS = 0.5
# Supervisor to worker: every worker serves; every running worker has reached a drain step (server/grpc/drain.py).
ALL_SERVING = "all serving"
AGREED = "agreed"


def worker_count(requested: int) -> int:
    """--workers as a number of processes: 0 means one per CPU core this process may run on."""
    if requested:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """Hold the workers' port: a socket bound with SO_REUSEPORT that never listens, so it takes no connections but
    keeps the port ours while workers come and go. Port 0 picks a free port once, for every worker. A port that
    another server already listens on is an error, as without workers, not a silent second listener."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
            probe.bind(address)
    reservation = socket.socket(family, kind, proto)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind(address)
        yield reservation.getsockname()[1]
    finally:
        reservation.close()


def _export(settings: Settings) -> None:
    """Spawned helper: export the built-in models missing from the repository, as a lone server would."""
    configure_logging(settings.log_level)
    from server.app import prepare_repository
    from server.base.hold import HoldPoints

    try:
        prepare_repository(settings, HoldPoints(settings.test_hold_dir))
    except Exception as error:
        log.error("cannot export the built-in models into %s: %s", settings.model_repository, error, exc_info=True)
        sys.exit(1)


class _SupervisorLink(Siblings):
    """A worker's side of its pipe to the supervisor, and of the flag that says every worker serves.

    Messages: the worker sends its states ("listening", "serving") and the drain steps it reaches; the supervisor
    sends ALL_SERVING once every worker serves, and (AGREED, step) once every running worker has reached a step.
    A thread reads the pipe; when it closes (the supervisor died, even by SIGKILL) the worker drains alone and
    exits rather than hold the port."""

    def __init__(self, conn: Connection, serving: ctypes.c_bool) -> None:
        self._conn = conn
        self._serving = serving
        self._ready = False  # the flag read true once: it never turns false again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_all_serving: Callable[[], None] = lambda: None
        self._agreed: set[str] = set()
        self._waiting: dict[str, asyncio.Event] = {}
        self._alone = False  # the supervisor is gone: nothing left to agree with
        threading.Thread(target=self._read, name="supervisor-watch", daemon=True).start()

    def notify(self, state: str) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(state)

    def attach(self, on_all_serving: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_all_serving = on_all_serving

    def all_serving(self) -> bool:
        if not self._ready:
            self._ready = bool(self._serving.value)
        return self._ready

    async def agree(self, step: str, timeout: float) -> bool:
        if self._alone or step in self._agreed:
            return True
        agreed = self._waiting.setdefault(step, asyncio.Event())
        self.notify(step)
        try:
            await asyncio.wait_for(agreed.wait(), timeout)
        except TimeoutError:
            log.warning("the other workers did not reach drain step %r within %.1fs; going on alone", step, timeout)
            return False
        return True

    def _read(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while True:
                message = self._conn.recv()
                if message == ALL_SERVING:
                    self._post(self._on_all_serving)
                elif isinstance(message, tuple) and message[0] == AGREED:
                    self._post(self._agree, message[1])
        self._alone = True
        self._post(self._agree, *STEPS)
        log.warning("supervisor gone; shutting down")
        os.kill(os.getpid(), signal.SIGTERM)

    def _post(self, callback: Callable[..., None], *args: str) -> None:
        """Run `callback` on the server's event loop (dropped before the server runs, or once it has stopped)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is exiting
                self._loop.call_soon_threadsafe(callback, *args)

    def _agree(self, *steps: str) -> None:
        for step in steps:
            self._agreed.add(step)
            if step in self._waiting:
                self._waiting[step].set()


def _worker(settings: Settings, index: int, conn: Connection, serving: ctypes.c_bool, metrics_dir: Path | None) -> None:
    """Spawned worker: the ordinary server on the shared ports, reporting its state to the supervisor; with
    `metrics_dir`, its /metrics shows the whole server."""
    os.setpgrp()  # signals come from the supervisor alone (a terminal's Ctrl-C reaches it, and it forwards SIGTERM)
    configure_logging(settings.log_level)
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s [worker {index} pid %(process)d] %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    link = _SupervisorLink(conn, serving)
    from server.app import serve

    if metrics_dir is None:
        code = asyncio.run(serve(settings, reuse_port=True, notify=link.notify, siblings=link))
    else:
        from server.workers.metrics import worker_registry

        registry = worker_registry(metrics_dir)
        code = asyncio.run(serve(settings, reuse_port=True, notify=link.notify, siblings=link, registry=registry))
    # Drained and stopped: exit now. The interpreter's own teardown (TensorFlow's and gRPC's threads) took 5-10 s
    # more and holds nothing worth waiting for; metrics live in files already, logs are flushed here.
    logging.shutdown()
    os._exit(code)


@dataclasses.dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    state: str = "starting"  # then "listening", "serving", and "exited"
    pid: int = 0
    signalled: bool = False
    reached: set[str] = dataclasses.field(default_factory=set)  # the drain steps it has reached (server/grpc/drain.py)


def _describe(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


class Supervisor:
    """Starts `count` workers, reports the server's state from theirs, and stops them all on a signal or a death."""

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.workers: list[_Worker] = []
        self.stop_requested = False
        self.failed = False
        self.metrics_port: int | None = None
        self.http_port: int | None = None  # every worker's REST port (None: --http-port 0)
        self._kill_at = float("inf")
        # Set once every worker serves, read by every worker at each readiness question: they turn ready together.
        self._all_serving = typing.cast(ctypes.c_bool, SPAWN.Value(ctypes.c_bool, False, lock=False))
        self._agreed: set[str] = set()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT or a worker's death; returns the exit code (0: every worker drained)."""
        started = time.perf_counter()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        try:
            self.settings.model_repository.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            log.error("cannot start: %s", error)
            return 1
        if not self._export():
            return 0 if self.stop_requested else 1
        metrics_dir = Path(tempfile.mkdtemp(prefix="modelserver-metrics-"))
        # Before any worker starts: prometheus_client picks multiprocess mode when it is first imported.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        try:
            with reserve_port(self.settings.host, self.settings.grpc_port) as port, contextlib.ExitStack() as stack:
                rest_port = self.settings.rest_port
                if rest_port is not None:
                    self.http_port = stack.enter_context(reserve_port(self.settings.host, rest_port))
                if not self._serve_metrics(metrics_dir):
                    return 1
                return self._supervise(port, metrics_dir, started)
        except OSError as error:
            log.error("cannot listen on %s:%d: %s (is the port in use?)", self.settings.host, self.settings.grpc_port,
                      error)  # fmt: skip
            return 1
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.stop_requested:
            log.info("%s received: draining %d worker(s)", signal.Signals(signum).name, len(self._running()))
        self._stop()

    def _stop(self) -> None:
        """Ask every worker to drain (SIGTERM: each runs the normal shutdown) and allow them the grace period."""
        self.stop_requested = True
        self._kill_at = min(
            self._kill_at, time.monotonic() + self.settings.shutdown_delay + self.settings.grace_period + KILL_MARGIN
        )
        for worker in self.workers:
            if worker.state != "exited" and not worker.signalled and worker.pid > 0:
                worker.signalled = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def _table(self) -> tuple[dict[int, int], dict[int, int], int]:
        return self._running(), self._started(), self._serving()

    def _running(self) -> dict[int, int]:
        return {w.index: w.pid for w in self.workers if w.state != "exited"}

    def _started(self) -> dict[int, int]:
        return {w.index: w.pid for w in self.workers}

    def _serving(self) -> int:
        return sum(w.state == "serving" for w in self.workers)

    def _export(self) -> bool:
        """Export the built-in models once, in a spawned helper (the supervisor stays free of TensorFlow)."""
        helper = SPAWN.Process(target=_export, args=(self.settings,), name="modelserver-export")
        helper.start()
        while helper.exitcode is None:
            helper.join(POLL_SECONDS)
            if self.stop_requested and helper.exitcode is None:
                helper.terminate()  # a half-written export stays in a staging folder that is never loaded
                helper.join()
        if helper.exitcode != 0 and not self.stop_requested:
            log.error("startup failed: exporting the built-in models %s", _describe(helper.exitcode))
        return helper.exitcode == 0 and not self.stop_requested

    def _serve_metrics(self, metrics_dir: Path) -> bool:
        if not self.settings.metrics:
            return True
        if self.settings.metrics_on_rest_port:  # every worker serves the whole server's /metrics on the REST port
            self.metrics_port = self.http_port
            return True
        from server.base.metrics import serve_metrics
        from server.workers.metrics import supervisor_registry

        registry = supervisor_registry(metrics_dir, self._running, self._started, self._serving)
        try:
            self.metrics_port = serve_metrics(self.settings.metrics_address, self.settings.metrics_port, registry)
        except OSError as error:
            log.error("cannot serve metrics on %s:%d: %s", self.settings.metrics_address, self.settings.metrics_port,
                      error)  # fmt: skip
            return False
        log.info("metrics of all workers on http://%s:%d/metrics", self.settings.metrics_address,
                 self.metrics_port)  # fmt: skip
        return True

    def _start_worker(self, index: int, port: int, metrics_dir: Path) -> None:
        # The REST port is shared like gRPC's; /metrics with it when they share a port (each worker then answers a
        # scrape for the whole server, from the metrics files and the workers' table, write_workers_table).
        shared = self.settings.metrics_on_rest_port
        settings = dataclasses.replace(
            self.settings,
            grpc_port=port,
            http_port=self.http_port if self.http_port is not None else 0,
            metrics=shared,
            metrics_port=self.http_port if shared and self.http_port is not None else self.settings.metrics_port,
            port_file=None,
            workers=1,
        )
        conn, child_conn = SPAWN.Pipe()
        process = SPAWN.Process(
            target=_worker,
            args=(settings, index, child_conn, self._all_serving, metrics_dir if shared else None),
            name=f"modelserver-worker-{index}",
        )
        process.start()
        child_conn.close()
        self.workers.append(_Worker(index, process, conn, pid=process.pid or 0))

    def _supervise(self, port: int, metrics_dir: Path, started: float) -> int:
        from prometheus_client.multiprocess import mark_process_dead

        for index in range(self.count):
            if not self.stop_requested:
                self._start_worker(index, port, metrics_dir)
        announced: set[str] = set()
        table: object = None
        while any(w.state != "exited" for w in self.workers):
            if self.settings.metrics_on_rest_port and table != (now := self._table()):
                from server.workers.metrics import write_workers_table

                table = now
                write_workers_table(metrics_dir, *now)
            if self.stop_requested:
                self._stop()  # reaches a worker started while the signal arrived too
            if self.stop_requested and time.monotonic() > self._kill_at:
                for worker in self.workers:
                    if worker.state != "exited":
                        log.error("worker %d (pid %d) still running after the grace period; killing it",
                                  worker.index, worker.pid)  # fmt: skip
                        worker.process.kill()
                self.failed = True
                self._kill_at = float("inf")
            live = [w for w in self.workers if w.state != "exited"]
            ready = wait([w.conn for w in live] + [w.process.sentinel for w in live], POLL_SECONDS)
            for worker in live:
                if worker.conn in ready:
                    with contextlib.suppress(EOFError, OSError):  # EOF: it exited, and its sentinel says so too
                        self._on_message(worker, worker.conn.recv())
                if worker.process.sentinel in ready or not worker.process.is_alive():
                    worker.process.join()
                    worker.state = "exited"
                    worker.conn.close()
                    mark_process_dead(worker.pid, str(metrics_dir))  # type: ignore[no-untyped-call]  # unannotated
                    self._on_exit(worker)
            states = [w.state for w in self.workers]
            if "listening" not in announced and all(s in ("listening", "serving") for s in states):
                announced.add("listening")
                log.info("gRPC listening on %s:%d (%s; %d workers)", self.settings.host, port,
                         "TLS" if self.settings.tls_enabled else "plaintext", self.count)  # fmt: skip
                if self.settings.port_file is not None:
                    write_port_file(self.settings.port_file, port, self.metrics_port, [w.pid for w in self.workers],
                                    self.http_port)  # fmt: skip
            if "serving" not in announced and all(s == "serving" for s in states) and not self.stop_requested:
                announced.add("serving")
                self._all_serving.value = True  # before the messages: a worker told reads the flag true
                for worker in self.workers:
                    self._send(worker, ALL_SERVING)
                log.info("SERVING with %d workers (pids %s) after %.2fs", self.count,
                         " ".join(str(w.pid) for w in self.workers), time.perf_counter() - started)  # fmt: skip
            self._agree()
        log.info("stopped")
        return 1 if self.failed else 0

    def _on_message(self, worker: _Worker, message: str) -> None:
        if message not in STEPS:
            worker.state = message
            return
        worker.reached.add(message)
        if not self.stop_requested:  # SIGTERM reached this worker alone: it leaves, and a server without it stops
            log.error("worker %d (pid %d) is draining on its own; draining the other workers and exiting with code 1",
                      worker.index, worker.pid)  # fmt: skip
            self.failed = True
            self._stop()

    def _agree(self) -> None:
        """Tell every running worker each drain step that all of them have reached; a worker that has exited has
        passed every step (it holds no caller and no listener any more)."""
        live = [w for w in self.workers if w.state != "exited"]
        for step in STEPS:
            if step not in self._agreed and live and all(step in w.reached for w in live):
                self._agreed.add(step)
                for worker in live:
                    self._send(worker, (AGREED, step))

    @staticmethod
    def _send(worker: _Worker, message: object) -> None:
        if worker.state != "exited":
            with contextlib.suppress(OSError):  # it is exiting: its sentinel will say so
                worker.conn.send(message)

    def _on_exit(self, worker: _Worker) -> None:
        code = worker.process.exitcode
        if self.stop_requested and code in (0, -signal.SIGTERM):
            log.info("worker %d (pid %d) stopped", worker.index, worker.pid)
            return
        self.failed = True
        if self.stop_requested:
            log.error("worker %d (pid %d) %s while stopping", worker.index, worker.pid, _describe(code))
            return
        log.error("worker %d (pid %d) %s; draining the other workers and exiting with code 1, so that the "
                  "orchestrator restarts the server", worker.index, worker.pid, _describe(code))  # fmt: skip
        self._stop()
