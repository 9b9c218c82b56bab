"""A closed-loop load that runs until told to stop, counting every call's final status code.

The load-test tool runs for a duration or a count fixed up front; a rolling restart takes as long as it takes,
so its test needs a load it can stop when the restart is over. Like the tool it does not retry unless asked
to: every failure that reaches a caller is counted; the caller then waits a back-off before its next call, as a
real client would, instead of spinning on a replica that is down. Use it as a context manager: the callers stop,
and their threads are joined, however the block ends.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from types import TracebackType

import grpc

from clients.client import DEFAULT_MAX_MESSAGE_BYTES, TYPED_MODELS, channel_options
from clients.loadtest import build_request
from harness.backoff import Backoff
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc

STOP_SECONDS = 30  # a caller ends after its current call (at most `timeout`) and its back-off (at most 0.5 s)


class ClosedLoop:
    """`concurrency` threads on one channel, each sending its next multi_input call when the last one returned."""

    def __init__(
        self, target: str, concurrency: int = 8, max_seconds: float = 300, timeout: float = 10, retries: int = 0
    ) -> None:
        # retries > 0: the project's clients' policy (gRPC retries UNAVAILABLE with backoff); 0: no retry at all.
        self._channel = grpc.insecure_channel(target, channel_options(retries, DEFAULT_MAX_MESSAGE_BYTES))
        self._call = getattr(pb_grpc.ModelServiceStub(self._channel), TYPED_MODELS["multi_input"].method)
        self._request = build_request("multi_input", 1)
        self._timeout = timeout
        self._deadline = time.monotonic() + max_seconds  # stops by itself even if nobody calls stop()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.codes: Counter[str] = Counter()
        self.failures: list[str] = []  # "CODE: details" of every failed call, in order
        # Not daemons: one left running is a leak the session's guard (tests/helpers/leak_guard.py) reports.
        self._threads = [
            threading.Thread(target=self._caller, name=f"closed-loop-{i}", daemon=False) for i in range(concurrency)
        ]
        self._stopped = False

    def start(self) -> ClosedLoop:
        for thread in self._threads:
            if thread.ident is None:  # not started yet: start() may be called again
                thread.start()
        return self

    def __enter__(self) -> ClosedLoop:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _caller(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                self._call(self._request, timeout=self._timeout)
                code, detail = "OK", ""
            except grpc.RpcError as error:
                code, detail = error.code().name, error.details() or ""
            with self._lock:
                self.codes[code] += 1
                if code != "OK":
                    self.failures.append(f"{code}: {detail}")
            if code == "OK":
                backoff.reset()
            else:
                self._stop.wait(backoff.delay())  # stop() ends the wait at once

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.codes.values())

    def stop(self) -> Counter[str]:
        """Stop every caller after its current call; returns the final count by status code. Idempotent."""
        self._stop.set()
        if not self._stopped:
            deadline = time.monotonic() + STOP_SECONDS
            for thread in self._threads:
                if thread.ident is not None:
                    thread.join(max(0.0, deadline - time.monotonic()))
            self._stopped = True
            self._channel.close()  # a call still in flight (a thread that did not stop in time) ends CANCELLED
            for thread in self._threads:
                if thread.ident is not None:
                    thread.join(5)
            alive = [thread.name for thread in self._threads if thread.is_alive()]
            assert not alive, f"closed-loop callers did not stop: {alive}"
        return self.codes
