"""A real server whose model calls the test holds (--test-hold-dir), so that requests really wait in its queues:
merging, cancellation, deadlines and load shedding are then seen from outside, in status codes and metrics.

Every "while the model is busy" here is decided by the test: it closes the hold point, sees the call arrive there,
and releases it when it is done looking. Nothing depends on how fast the machine computes. The module shares one
server; its last test sends SIGTERM to it.
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

from clients import cli
from harness.server import ServerProcess, serving
from modelserver.v1 import modelserver_pb2 as pb
from modelserver.v1 import modelserver_pb2_grpc as pb_grpc
from tests.helpers.models import keras_outputs, random_inputs
from tests.helpers.scrape import Metrics, wait_until

UNMET = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")  # codes of a request whose deadline cannot be met
HELD_SECONDS = 3.0  # how long the test holds one CNN call, so that the server measures a call that long
ARGS = [
    # The CNN unbatched: each request is one model call. multi_input runs one batch at a time, so that requests
    # behind a running (held) batch stay in its queue, where cancelled and expired ones are dropped and counted.
    "--model-batching", "residual_cnn:enabled=false;multi_input:max_batches_in_flight=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def busy_server(model_repository: Path) -> Iterator[ServerProcess]:
    with serving(model_repository, ARGS, holds=True) as process:
        yield process


@pytest.fixture(scope="module")
def stub(busy_server: ServerProcess) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(busy_server.channel)


def hold_model(server: ServerProcess, call: Callable[[], grpc.Future]) -> grpc.Future:
    """Close the model's hold point and make `call`; return once that call is held inside the model."""
    arrived = server.arrived()
    server.hold()
    future = call()
    server.wait_arrived(arrived + 1)
    return future


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


def test_requests_queued_behind_a_busy_model_are_merged_into_few_batches(busy_server, stub, keras_models):
    """Dynamic batching, seen from outside: 40 concurrent requests that all wait behind a held model call run as
    exactly 2 model calls (79 rows, at most 64 per call), never one call each. Every caller gets its own rows."""
    model = keras_models["multi_input"]
    inputs = [random_inputs(model, 1 + i % 3, seed=100 + i) for i in range(40)]
    rows = sum(len(x["input_a"]) for x in inputs)
    requests = [
        pb.PredictMultiInputRequest(input_a=x["input_a"].ravel().tolist(), input_b=x["input_b"].ravel().tolist())
        for x in inputs
    ]
    before = Metrics(busy_server)
    holder = hold_model(busy_server, lambda: stub.PredictMultiInput.future(multi_input_request(1, 0), timeout=300))
    try:
        futures = [stub.PredictMultiInput.future(request, timeout=300) for request in requests]
        queued = wait_until(
            busy_server,
            lambda m: m("modelserver_queue_rows", model="multi_input") == rows,
            "every request to queue behind the held call",
        )
        assert queued.in_flight("multi_input") == len(requests) + 1
        assert queued("modelserver_batch_size_rows_count", model="multi_input") == before(
            "modelserver_batch_size_rows_count", model="multi_input"
        ), "a multi_input batch finished while the model was held"
    finally:
        busy_server.release()
    assert len(holder.result(timeout=300).output) == 1
    for x, future in zip(inputs, futures, strict=True):
        served = np.reshape(future.result(timeout=300).output, (-1, 1))
        np.testing.assert_allclose(served, keras_outputs(model, x)["output"], atol=1e-5)
    after = wait_until(busy_server, lambda m: m.in_flight("multi_input") == 0, "the requests to finish")

    def delta(name: str) -> float:
        return after(name, model="multi_input") - before(name, model="multi_input")

    assert delta("modelserver_batch_size_rows_count") == 1 + math.ceil(rows / 64), "the holder, then full batches"
    assert delta("modelserver_batch_size_rows_sum") == rows + 1
    assert (
        after.requests("multi_input", "typed.PredictMultiInput", "OK")
        - before.requests("multi_input", "typed.PredictMultiInput", "OK")
        == len(requests) + 1
    )
    assert delta("modelserver_queue_duration_seconds_count") == len(requests) + 1
    assert after("modelserver_queue_rows", model="multi_input") == 0


def test_cancelled_and_expired_queued_requests_are_counted_with_their_codes(busy_server, stub):
    """A request cancelled by its client and one whose deadline passes, both while queued behind a held model
    call: each is counted with its real code (CANCELLED, DEADLINE_EXCEEDED; never OK), each is dropped from the
    queue under its own reason, and neither reaches the model. The deadline is counted as such only if the gRPC
    deadline reaches the core (server.grpc.rpc.deadline_of); else the batcher only sees a cancelled request."""
    method = "typed.PredictMultiInput"
    before = Metrics(busy_server)
    # The holder takes multi_input's one batch slot and is held inside the model; the next ones stay queued.
    holder = hold_model(busy_server, lambda: stub.PredictMultiInput.future(multi_input_request(1, 0), timeout=300))
    try:
        doomed = stub.PredictMultiInput.future(multi_input_request(2, seed=1), timeout=300)
        late = stub.PredictMultiInput.future(multi_input_request(3, seed=2), metadata=server_deadline(1.0))
        wait_until(busy_server, lambda m: m("modelserver_queue_rows", model="multi_input") == 5, "both to queue")
        assert doomed.cancel()
        assert late.exception(timeout=60).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.FutureCancelledError):
            doomed.result()
        # The handlers end at once (codes counted), while the model is still held.
        wait_until(
            busy_server,
            lambda m: m.in_flight("multi_input") == 1 and m.calls("multi_input", method) - before.calls(
                "multi_input", method) == 2,
            "both calls to end",
        )  # fmt: skip
        assert not holder.done()
    finally:
        busy_server.release()
    assert len(holder.result(timeout=300).output) == 1
    # The queue drops both once the slot frees (reasons counted).
    after = wait_until(
        busy_server,
        lambda m: (
            m.in_flight("multi_input") == 0
            and m("modelserver_queue_rows", model="multi_input") == 0
            and m.rejected("multi_input", "cancelled") + m.rejected("multi_input", "deadline")
            == before.rejected("multi_input", "cancelled") + before.rejected("multi_input", "deadline") + 2
        ),
        "the queue to drop both",
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


def test_a_deadline_that_the_queued_work_cannot_meet_is_refused_at_once(busy_server, stub):
    """The server knows how long the work ahead takes (the model's measured call time): a request whose deadline
    cannot be met is refused at once, RESOURCE_EXHAUSTED naming the deadline, and counted under
    reason="deadline". This needs the gRPC deadline in the core: without it the request would wait and die
    uncounted. The test makes the server measure a long call: it holds the CNN's first call HELD_SECONDS (the
    only CNN call of this module, so the server's estimate is that call's time), then holds a second one and
    asks for an answer within a third of that."""
    image = np.random.default_rng(3).random(784, dtype=np.float32).tolist()
    request = pb.PredictResidualCnnRequest(image=image)
    before = Metrics(busy_server)
    assert before("modelserver_inference_duration_seconds_count", model="residual_cnn") == 0, "not the first call"
    first = hold_model(busy_server, lambda: stub.PredictResidualCnn.future(request, timeout=300))
    time.sleep(HELD_SECONDS)  # the test decides how long the model is busy
    busy_server.release()
    assert len(first.result(timeout=300).predicted_class) == 1

    running = hold_model(busy_server, lambda: stub.PredictResidualCnn.future(request, timeout=300))
    try:
        call = stub.PredictResidualCnn.future(request, metadata=server_deadline(HELD_SECONDS / 3))
        refused = call.exception(timeout=60)  # the server's deadline ends the call in any case
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "cannot answer within the deadline" in refused.details()
        assert not running.done()
    finally:
        busy_server.release()
    assert len(running.result(timeout=300).predicted_class) == 1
    answered = wait_until(
        busy_server,
        lambda m: (
            sum(m.requests("residual_cnn", "typed.PredictResidualCnn", code) for code in UNMET) > 0
            and m.in_flight("residual_cnn") == 0
        ),
        "the server to answer every call",
    )
    assert answered.rejected("residual_cnn", "deadline") - before.rejected("residual_cnn", "deadline") == 1
    assert (
        answered.requests("residual_cnn", "typed.PredictResidualCnn", "RESOURCE_EXHAUSTED")
        - before.requests("residual_cnn", "typed.PredictResidualCnn", "RESOURCE_EXHAUSTED")
        == 1
    )
    assert answered.requests("residual_cnn", "typed.PredictResidualCnn", "OK") == 2


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().out.strip()


def test_cli_health_exits_1_while_the_server_is_not_serving(busy_server, stub, capsys):
    """Last in this module: SIGTERM turns health NOT_SERVING at once, and a draining server keeps answering until
    its accepted work is done. The test holds one accepted call inside the model, so the CLI gets a real
    NOT_SERVING (not an error) however slow the machine, and must exit 1 on it."""
    target = ["--target", busy_server.target, "--timeout", "10"]
    assert run_cli(capsys, *target, "health") == (0, "SERVING")
    accepted = hold_model(busy_server, lambda: stub.PredictMultiInput.future(multi_input_request(1, 0), timeout=300))
    try:
        busy_server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while busy_server.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.01)
        assert run_cli(capsys, *target, "health") == (1, "NOT_SERVING")
        assert run_cli(capsys, *target, "health", "--service", "residual_cnn") == (1, "NOT_SERVING")
        assert not accepted.done()
    finally:
        busy_server.release()
    assert len(accepted.result(timeout=60).output) == 1
    assert busy_server.process.wait(60) == 0
