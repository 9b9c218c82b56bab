"""A real server whose only inference thread is held busy, so that requests really wait in its queues: merging,
cancellation, deadlines and load shedding are then seen from outside, in status codes and metrics.

The model is held by big unbatched residual_cnn calls (`hold_busy`): with `--inference-threads 1` every model
call of every model waits behind them, in the executor's order. Nothing here measures time; each test waits (in
bounded loops) for the server's own counters to show that the requests are queued, and checks that the backlog
is still there when it matters.

The module shares one server; its last test sends SIGTERM to it.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients import cli
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from tests.serverproc import ServerProcess
from tests.test_api import keras_outputs
from tests.test_models import random_inputs

BACKLOG = 10  # big residual_cnn calls that hold the one inference thread
ROWS = 1500  # rows of each: one call takes a noticeable time on any CPU
UNMET = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")  # codes of a request whose deadline cannot be met
ARGS = [
    "--inference-threads", "1",
    "--shutdown-delay", "5",
    # The CNN unbatched: each big request is one long model call. multi_input runs one batch at a time, so that
    # requests behind a running batch stay in its queue (where cancelled and expired ones are dropped and counted).
    "--model-batching", f"residual_cnn:enabled=false,max_queued_rows={BACKLOG * ROWS * 10};"
    "multi_input:max_batches_in_flight=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def busy_server(model_repository: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(model_repository, ARGS)
    try:
        process.wait_serving()
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def stub(busy_server: ServerProcess) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(busy_server.channel)


@pytest.fixture(scope="module")
def big_requests() -> list[pb.PredictResidualCnnRequest]:
    """Built once, so that the calls leave together instead of queueing behind each other's encoding."""
    rng = np.random.default_rng(7)
    return [
        pb.PredictResidualCnnRequest(image=rng.random(ROWS * 784, dtype=np.float32).tolist()) for _ in range(BACKLOG)
    ]


class Metrics:
    """One scrape of the server's metrics, read by name and labels."""

    def __init__(self, server: ServerProcess) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(server.metrics_text())
            for sample in family.samples
        ]

    def __call__(self, name: str, **labels: str) -> float:
        for sample_name, sample_labels, value in self.samples:
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
        return 0.0

    def requests(self, model: str, method: str, code: str) -> float:
        return self("modelserver_requests_total", model=model, method=method, code=code)

    def calls(self, model: str, method: str) -> float:
        """Every finished call, whatever its code."""
        return sum(
            value
            for name, labels, value in self.samples
            if name == "modelserver_requests_total" and labels.get("model") == model and labels.get("method") == method
        )

    def rejected(self, model: str, reason: str) -> float:
        return self("modelserver_rejected_requests_total", model=model, reason=reason)

    def in_flight(self, model: str) -> float:
        return self("modelserver_inflight_requests", model=model)


def wait_until(server: ServerProcess, condition: Callable[[Metrics], bool], what: str, timeout: float = 120) -> Metrics:
    """Scrape until `condition` holds (bounded); returns the scrape that satisfied it."""
    deadline = time.monotonic() + timeout
    while True:
        scrape = Metrics(server)
        if condition(scrape):
            return scrape
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def hold_busy(server: ServerProcess, stub: pb_grpc.ModelServiceStub, requests: list) -> list[grpc.Future]:
    """Send the big CNN calls; return once every one has reached the server (handed to the executor, or done)."""
    done_before = Metrics(server).requests("residual_cnn", "PredictResidualCnn", "OK")
    futures = [stub.PredictResidualCnn.future(request, timeout=300) for request in requests]
    wait_until(
        server,
        lambda m: (
            m.requests("residual_cnn", "PredictResidualCnn", "OK") - done_before + m.in_flight("residual_cnn")
            == len(requests)
        ),
        "the CNN backlog to reach the server",
    )
    return futures


def release(futures: list[grpc.Future]) -> None:
    """Wait for the backlog to finish; every call of it succeeds."""
    for future in futures:
        assert len(future.result(timeout=300).predicted_class) == ROWS


def server_deadline(seconds: float) -> tuple[tuple[str, str], ...]:
    """Call metadata that gives the server a deadline the client does not enforce itself.

    With a client-side timeout the client expires the call too, and its cancellation can reach the server before
    the server's own deadline (which starts later, when the call arrives): the server then sees a cancelled call,
    not an expired one, and which of the two happens is a race (see the report on this branch). The
    grpc-timeout header alone is exactly what a client deadline sends, so the server's handling is the same.
    """
    return (("grpc-timeout", f"{max(1, round(seconds * 1000))}m"),)


def multi_input_request(rows: int, seed: int) -> pb.PredictMultiInputRequest:
    rng = np.random.default_rng(seed)
    return pb.PredictMultiInputRequest(
        input_a=rng.random(rows * 10, dtype=np.float32).tolist(),
        input_b=rng.random(rows * 20, dtype=np.float32).tolist(),
    )


def test_requests_queued_behind_a_busy_model_are_merged_into_few_batches(busy_server, stub, big_requests, keras_models):
    """Dynamic batching, seen from outside: 40 concurrent requests that all wait behind a busy model run as 2 or
    3 model calls (79 rows, at most 64 per call, plus possibly one call that started before the others arrived),
    never one call each. Every caller still gets its own rows."""
    model = keras_models["multi_input"]
    inputs = [random_inputs(model, 1 + i % 3, seed=100 + i) for i in range(40)]
    rows = sum(len(x["input_a"]) for x in inputs)
    requests = [
        pb.PredictMultiInputRequest(input_a=x["input_a"].ravel().tolist(), input_b=x["input_b"].ravel().tolist())
        for x in inputs
    ]
    before = Metrics(busy_server)

    backlog = hold_busy(busy_server, stub, big_requests)
    futures = [stub.PredictMultiInput.future(request, timeout=300) for request in requests]
    queued = wait_until(
        busy_server, lambda m: m.in_flight("multi_input") == len(requests), "every request to reach the server"
    )
    assert queued.in_flight("residual_cnn") > 0, "the backlog ended before the requests queued: nothing was held"
    assert queued("modelserver_batch_size_rows_count", model="multi_input") == before(
        "modelserver_batch_size_rows_count", model="multi_input"
    ), "a multi_input batch ran before every request had arrived"
    release(backlog)

    for x, future in zip(inputs, futures, strict=True):
        served = np.reshape(future.result(timeout=300).output, (-1, 1))
        np.testing.assert_allclose(served, keras_outputs(model, x)["output"], atol=1e-5)
    after = wait_until(busy_server, lambda m: m.in_flight("multi_input") == 0, "the requests to finish")
    batches = after("modelserver_batch_size_rows_count", model="multi_input") - before(
        "modelserver_batch_size_rows_count", model="multi_input"
    )
    assert math.ceil(rows / 64) <= batches <= 3, f"{batches} model calls for {len(requests)} queued requests"
    assert (
        after("modelserver_batch_size_rows_sum", model="multi_input")
        - before("modelserver_batch_size_rows_sum", model="multi_input")
        == rows
    )
    assert after.requests("multi_input", "PredictMultiInput", "OK") - before.requests(
        "multi_input", "PredictMultiInput", "OK"
    ) == len(requests)
    assert after("modelserver_queue_duration_seconds_count", model="multi_input") - before(
        "modelserver_queue_duration_seconds_count", model="multi_input"
    ) == len(requests)
    assert after("modelserver_queue_rows", model="multi_input") == 0


def test_cancelled_and_expired_queued_requests_are_counted_with_their_codes(busy_server, stub, big_requests):
    """A request cancelled by its client and one whose deadline passes, both while queued behind a busy model:
    each is counted with its real code (CANCELLED, DEADLINE_EXCEEDED; never OK), each is dropped from the queue
    under its own reason, and neither reaches the model. The deadline is counted as such only if the gRPC
    deadline reaches the core (server.rpc.deadline_of); else the batcher only sees a cancelled request."""
    method = "PredictMultiInput"
    before = Metrics(busy_server)
    backlog = hold_busy(busy_server, stub, big_requests)

    # The first request takes multi_input's one batch slot (waiting for the thread); the next ones stay queued.
    holder = stub.PredictMultiInput.future(multi_input_request(1, seed=0), timeout=300)
    wait_until(
        busy_server,
        lambda m: m.in_flight("multi_input") == 1 and m("modelserver_queue_rows", model="multi_input") == 0,
        "the first request to take the batch slot",
    )
    doomed = stub.PredictMultiInput.future(multi_input_request(2, seed=1), timeout=300)
    late = stub.PredictMultiInput.future(multi_input_request(3, seed=2), metadata=server_deadline(1.0))
    queued = wait_until(
        busy_server, lambda m: m("modelserver_queue_rows", model="multi_input") == 5, "both requests to queue"
    )
    assert queued.in_flight("residual_cnn") > 0 and not holder.done(), "the model was not held busy"
    assert doomed.cancel()
    assert late.exception(timeout=60).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.FutureCancelledError):
        doomed.result()
    # The handlers end at once (codes counted); the queue drops both once the slot frees (reasons counted).
    ended = wait_until(
        busy_server,
        lambda m: (
            m.in_flight("multi_input") <= 1
            and m.calls("multi_input", method) - before.calls("multi_input", method) >= 2
        ),
        "both calls to end",
    )
    assert ended.in_flight("residual_cnn") > 0, "the backlog ended before the calls did: they were not queued"
    release(backlog)
    assert len(holder.result(timeout=300).output) == 1
    after = wait_until(
        busy_server,
        lambda m: m.in_flight("multi_input") == 0 and m("modelserver_queue_rows", model="multi_input") == 0,
        "the queue to empty",
    )

    def delta(read: Callable[[Metrics], float]) -> float:
        return read(after) - read(before)

    assert delta(lambda m: m.requests("multi_input", method, "CANCELLED")) == 1
    assert delta(lambda m: m.requests("multi_input", method, "DEADLINE_EXCEEDED")) == 1
    assert delta(lambda m: m.requests("multi_input", method, "OK")) == 1  # the holder only
    assert delta(lambda m: m.rejected("multi_input", "cancelled")) == 1
    assert delta(lambda m: m.rejected("multi_input", "deadline")) == 1
    # Only the holder's row was computed (padding not counted), neither dropped request's rows.
    assert delta(lambda m: m("modelserver_batch_size_rows_sum", model="multi_input")) == 1


def test_a_deadline_that_the_queued_work_cannot_meet_is_refused_at_once(busy_server, stub, big_requests):
    """The server knows how long the work queued ahead takes (the model's recent call time): a request whose
    deadline cannot be met is refused at once, RESOURCE_EXHAUSTED naming the deadline, and counted under
    reason="deadline". This needs the gRPC deadline in the core: without it the request would wait and die
    uncounted. The deadline is half of one measured backlog call, so it cannot be met behind even one of them."""
    before = Metrics(busy_server)
    backlog = hold_busy(busy_server, stub, big_requests)
    first_done = wait_until(
        busy_server,
        lambda m: (
            m.requests("residual_cnn", "PredictResidualCnn", "OK")
            > before.requests("residual_cnn", "PredictResidualCnn", "OK")
        ),
        "a backlog call to finish (its duration is the server's estimate)",
    )
    assert first_done.in_flight("residual_cnn") >= 2, "the backlog is too short for this test"
    calls = first_done("modelserver_inference_duration_seconds_count", model="residual_cnn") - before(
        "modelserver_inference_duration_seconds_count", model="residual_cnn"
    )
    seconds = first_done("modelserver_inference_duration_seconds_sum", model="residual_cnn") - before(
        "modelserver_inference_duration_seconds_sum", model="residual_cnn"
    )
    one_call = seconds / calls

    image = np.random.default_rng(3).random(784, dtype=np.float32).tolist()
    call = stub.PredictResidualCnn.future(
        pb.PredictResidualCnnRequest(image=image), metadata=server_deadline(one_call / 2)
    )
    refused = call.exception(timeout=60)  # the server's deadline ends the call in any case
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert "cannot answer within the deadline" in refused.details()
    answered = wait_until(
        busy_server,
        lambda m: (
            sum(m.requests("residual_cnn", "PredictResidualCnn", code) for code in UNMET)
            > sum(before.requests("residual_cnn", "PredictResidualCnn", code) for code in UNMET)
        ),
        "the server to answer the request",
    )
    release(backlog)
    assert answered.rejected("residual_cnn", "deadline") - before.rejected("residual_cnn", "deadline") == 1
    assert (
        answered.requests("residual_cnn", "PredictResidualCnn", "RESOURCE_EXHAUSTED")
        - before.requests("residual_cnn", "PredictResidualCnn", "RESOURCE_EXHAUSTED")
        == 1
    )


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().out.strip()


def test_cli_health_exits_1_while_the_server_is_not_serving(busy_server, capsys):
    """Last in this module: SIGTERM with --shutdown-delay 5 turns health NOT_SERVING at once while the server
    keeps answering for 5 s, so the CLI gets a real NOT_SERVING (not an error) and must exit 1 on it."""
    target = ["--target", busy_server.target, "--timeout", "10"]
    assert run_cli(capsys, *target, "health") == (0, "SERVING")
    busy_server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while busy_server.health() != "NOT_SERVING":
        assert time.monotonic() < deadline, "health never turned NOT_SERVING"
        time.sleep(0.01)
    assert run_cli(capsys, *target, "health") == (1, "NOT_SERVING")
    assert run_cli(capsys, *target, "health", "--service", "residual_cnn") == (1, "NOT_SERVING")
    assert busy_server.process.wait(60) == 0
