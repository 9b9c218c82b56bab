"""A closed-loop load that runs until told to stop, counting every call's final status code.

The load-test tool runs for a duration or a count fixed up front; a rolling restart takes as long as it takes,
so its test needs a load it can stop when the restart is over. Like the tool it does not retry unless asked
to: every failure that reaches a caller is counted.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc

from clients.client import DEFAULT_MAX_MESSAGE_BYTES, TYPED_MODELS, channel_options
from clients.loadtest import build_request
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc


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
        self._threads = [threading.Thread(target=self._caller, daemon=True) for _ in range(concurrency)]

    def start(self) -> ClosedLoop:
        for thread in self._threads:
            thread.start()
        return self

    def _caller(self) -> None:
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

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.codes.values())

    def stop(self) -> Counter[str]:
        """Stop every caller after its current call; returns the final count by status code."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._channel.close()
        return self.codes
