"""Reliability under the load shapes users create (SPEC §3, §6): drain with 64 callers at SIGTERM, overload far
above capacity, hostile request bytes; every call is counted on the client side."""

from __future__ import annotations

import asyncio
import collections
import functools
import random
import time

import grpc
import numpy as np

from clients.loadtest import LoadTestConfig, run_loadtest
from harness.backoff import Backoff
from harness.deploy_native import wait_until
from harness.drain import CALLERS, drain_round
from harness.server import ServerProcess
from modelserver.v1 import modelserver_pb2 as pb
from tests.helpers.models import keras_outputs, random_inputs

DRAIN_ROUNDS = 3
# Codes a call may end with under SPEC §3; UNKNOWN, INTERNAL and CANCELLED (by the server) are never right here.
SPEC_CODES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}


def _one_row(keras_models) -> tuple[pb.PredictMultiInputRequest, float]:
    inputs = random_inputs(keras_models["multi_input"], 1, seed=11)
    expected = float(keras_outputs(keras_models["multi_input"], inputs)["output"][0, 0])
    request = pb.PredictMultiInputRequest(
        input_a=inputs["input_a"].ravel().tolist(), input_b=inputs["input_b"].ravel().tolist()
    )
    return request, expected


def test_drain_under_load_loses_nothing_and_never_cancels(model_repository, keras_models):
    request, expected = _one_row(keras_models)
    for round_ in range(DRAIN_ROUNDS):
        server = ServerProcess(model_repository, ["--grace-period", "20"], holds=True)
        try:
            server.wait_serving()
            outcomes, wrong = asyncio.run(drain_round(server, request, expected))
            assert server.process.wait(30) == 0, server.log_text()
        finally:
            server.kill()
        codes = {code for _, code in outcomes}
        assert "CANCELLED" not in codes, (round_, outcomes)
        before = {(code, n) for (when, code), n in outcomes.items() if when == "before"}
        assert before == {("OK", CALLERS)}, f"round {round_}: calls sent before SIGTERM must all succeed: {outcomes}"
        after = {code for when, code in outcomes if when == "after"}
        assert after <= {"OK", "UNAVAILABLE"}, (round_, outcomes)
        assert wrong == [], "a drained call returned a wrong prediction"


def test_overload_is_refused_with_resource_exhausted_and_the_server_recovers(model_repository, keras_models):
    # A low admission limit, so that both an open loop and a crowd of callers go far beyond it. The crowd meets
    # it while the test holds the model: admitted calls cannot finish, so the limit is reached on any machine.
    request, expected = _one_row(keras_models)
    server = ServerProcess(model_repository, ["--max-concurrent-rpcs", "100"], holds=True)
    try:
        server.wait_serving()
        refused_before = server.metric(
            "modelserver_requests_total",
            model="multi_input",
            method="typed.PredictMultiInput",
            code="RESOURCE_EXHAUSTED",
        )
        crowd = asyncio.run(_crowd(server, request, callers=1500, seconds_after_release=2.0))
        open_loop = asyncio.run(
            run_loadtest(
                LoadTestConfig(
                    target=server.target,
                    model="multi_input",
                    rate=6000,
                    duration=3.0,
                    timeout=5.0,
                    max_outstanding=100_000,
                )
            )
        )
        for outcome in (crowd, open_loop.errors | {"OK": open_loop.ok}):
            assert set(outcome) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, outcome
            assert outcome.get("OK", 0) > 0, f"the server stopped serving under overload: {outcome}"
        assert crowd.get("RESOURCE_EXHAUSTED", 0) > 0, f"1500 callers never met the admission limit: {crowd}"
        refused = server.metric(
            "modelserver_requests_total",
            model="multi_input",
            method="typed.PredictMultiInput",
            code="RESOURCE_EXHAUSTED",
        )
        client_refused = crowd.get("RESOURCE_EXHAUSTED", 0) + open_loop.errors.get("RESOURCE_EXHAUSTED", 0)
        client_expired = crowd.get("DEADLINE_EXCEEDED", 0) + open_loop.errors.get("DEADLINE_EXCEEDED", 0)
        # Every refusal the clients saw is counted; a refusal can also race a client's own deadline, which the
        # client then reports instead.
        assert client_refused <= refused - refused_before <= client_refused + client_expired
        assert server.metric("modelserver_rejected_requests_total", model="multi_input", reason="overloaded") > 0
        with grpc.insecure_channel(server.target) as channel:
            response = channel.unary_unary(
                "/modelserver.v1.ModelService/PredictMultiInput",
                request_serializer=pb.PredictMultiInputRequest.SerializeToString,
                response_deserializer=pb.PredictMultiInputResponse.FromString,
            )(request, timeout=30)
        assert abs(response.output[0] - expected) < 1e-5
    finally:
        server.kill()


def test_max_concurrent_streams_caps_calls_per_connection(model_repository, keras_models):
    """--max-concurrent-streams: a connection's calls beyond the limit never reach the server. gRPC core refuses
    them (RST_STREAM REFUSED_STREAM, UNAVAILABLE to the caller) or, once the client has the limit, they wait on
    the client's side. Another connection still gets in, and the admitted calls are answered right."""
    request, expected = _one_row(keras_models)
    server = ServerProcess(model_repository, ["--max-concurrent-streams", "8"], holds=True)
    busy = grpc.insecure_channel(server.target)
    other = grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        server.wait_serving()
        predict = [
            channel.unary_unary(
                "/modelserver.v1.ModelService/PredictMultiInput",
                request_serializer=pb.PredictMultiInputRequest.SerializeToString,
                response_deserializer=pb.PredictMultiInputResponse.FromString,
            )
            for channel in (busy, other)
        ]
        inflight = functools.partial(server.metric, "modelserver_inflight_requests", model="multi_input")
        server.hold()
        calls = [predict[0].future(request, timeout=120) for _ in range(12)]
        wait_until(lambda: inflight() >= 8, 120, "8 calls in flight", interval=0.02)
        calls.append(predict[1].future(request, timeout=120))
        wait_until(lambda: inflight() >= 9, 120, "the other connection's call in flight", interval=0.02)
        assert inflight() == 9, "calls beyond the first connection's 8 streams reached the server"
        server.release()
        codes = collections.Counter()
        for call in calls:
            if call.exception(timeout=120) is None:
                assert abs(call.result().output[0] - expected) < 1e-5
                codes["OK"] += 1
            else:
                assert call.code() == grpc.StatusCode.UNAVAILABLE and "RST_STREAM" in call.details(), call
                codes["UNAVAILABLE"] += 1
        assert codes["OK"] >= 9, codes
        # Refused in gRPC core, not by us: the server answered no call with UNAVAILABLE.
        unavailable = server.metric(
            "modelserver_requests_total", model="multi_input", method="typed.PredictMultiInput", code="UNAVAILABLE"
        )
        assert unavailable == 0
    finally:
        server.release()
        busy.close()
        other.close()
        server.kill()


async def _crowd(
    server: ServerProcess, request: pb.PredictMultiInputRequest, callers: int, seconds_after_release: float
) -> dict[str, int]:
    """`callers` closed-loop callers, the shape of a sudden crowd: the model is held until the crowd has met the
    admission limit (a refusal came back), then released, and the crowd goes on for `seconds_after_release`."""
    codes: collections.Counter[str] = collections.Counter()
    stop = False
    async with grpc.aio.insecure_channel(server.target) as channel:
        predict = channel.unary_unary(
            "/modelserver.v1.ModelService/PredictMultiInput",
            request_serializer=pb.PredictMultiInputRequest.SerializeToString,
            response_deserializer=pb.PredictMultiInputResponse.FromString,
        )

        async def caller() -> None:
            backoff = Backoff()
            while not stop:
                try:
                    await predict(request, timeout=60)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                    # A crowd keeps coming back when refused (that is the test), not at a server that is down.
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        await asyncio.sleep(backoff.delay())

        server.hold()
        try:
            tasks = [asyncio.create_task(caller()) for _ in range(callers)]
            deadline = time.monotonic() + 120
            while codes["RESOURCE_EXHAUSTED"] == 0:
                assert time.monotonic() < deadline, f"{callers} callers never met the admission limit: {codes}"
                await asyncio.sleep(0.01)
        finally:
            server.release()
        await asyncio.sleep(seconds_after_release)
        stop = True
        await asyncio.gather(*tasks)
    return dict(codes)


def _mutations(valid: bytes, count: int, rng: random.Random) -> list[bytes]:
    """Random bytes, truncations, bit flips and insertions of a valid message: what a broken or hostile client
    sends."""
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 1 and valid:
            out.append(valid[: rng.randrange(0, max(1, len(valid)))])
        elif kind == 2 and valid:
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            out.append(bytes(data))
        elif kind == 0 or not valid:
            out.append(rng.randbytes(rng.randrange(1, 300)))
        else:
            at = rng.randrange(len(valid) + 1)
            out.append(valid[:at] + rng.randbytes(rng.randrange(1, 16)) + valid[at:])
    return out


async def _send_all(
    call: grpc.aio.UnaryUnaryMultiCallable, pending: list[bytes], codes: collections.Counter[str]
) -> None:
    while pending:
        try:
            await call(pending.pop(), timeout=30)
            codes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            codes[error.code().name] += 1


def test_fuzzed_request_bytes_get_spec_codes_and_the_server_keeps_serving(server, keras_models):
    rng = random.Random(7)
    request, expected = _one_row(keras_models)
    image = random_inputs(keras_models["residual_cnn"], 1)["image"]
    valid = {
        "PredictMultiInput": request.SerializeToString(),
        "PredictSharedLayer": pb.PredictSharedLayerRequest(
            input_a=request.input_a, input_b=request.input_b
        ).SerializeToString(),
        "PredictResidualCnn": pb.PredictResidualCnnRequest(image=image.ravel().tolist()).SerializeToString(),
        "GetModelMetadata": pb.GetModelMetadataRequest(name="multi_input").SerializeToString(),
        "ListModels": pb.ListModelsRequest().SerializeToString(),
    }
    invalid_before = sum(
        server.metric("modelserver_requests_total", method=f"typed.{method}", code="INVALID_ARGUMENT", model=model)
        for method in valid
        for model in ("multi_input", "shared_layer", "residual_cnn", "unknown", "")
    )

    async def fuzz() -> collections.Counter[str]:
        codes: collections.Counter[str] = collections.Counter()
        async with grpc.aio.insecure_channel(server.target) as channel:
            for method, good in valid.items():
                call = channel.unary_unary(f"/modelserver.v1.ModelService/{method}")  # raw bytes both ways
                pending = _mutations(good, 2000, rng)

                await asyncio.gather(*(_send_all(call, pending, codes) for _ in range(16)))
        return codes

    codes = asyncio.run(fuzz())
    assert sum(codes.values()) == 2000 * len(valid)
    assert set(codes) <= SPEC_CODES, codes
    assert codes["INVALID_ARGUMENT"] > 0
    invalid_after = sum(
        server.metric("modelserver_requests_total", method=f"typed.{method}", code="INVALID_ARGUMENT", model=model)
        for method in valid
        for model in ("multi_input", "shared_layer", "residual_cnn", "unknown", "")
    )
    assert invalid_after - invalid_before == codes["INVALID_ARGUMENT"], "every refused message is counted"
    assert "Traceback" not in server.log_text()
    with grpc.insecure_channel(server.target) as channel:
        answer = channel.unary_unary("/modelserver.v1.ModelService/PredictMultiInput")(valid["PredictMultiInput"])
    assert abs(pb.PredictMultiInputResponse.FromString(answer).output[0] - expected) < 1e-5


def test_extreme_finite_inputs_that_overflow_the_model_fail_alone(client, keras_models):
    extreme = {"input_a": np.full((2, 10), 3.4e38, np.float32), "input_b": np.full((2, 20), 3.4e38, np.float32)}
    extreme["input_a"][0] = 0.5  # row 0 is fine, row 1 overflows
    extreme["input_b"][0] = 0.5
    with np.errstate(all="ignore"):
        assert not np.isfinite(keras_outputs(keras_models["multi_input"], extreme)["output"]).all()
    try:
        client.predict("multi_input", extreme)
        raise AssertionError("NaN left the server with status OK")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "output 'output'" in error.details() and "row 1" in error.details(), error.details()
    normal = random_inputs(keras_models["multi_input"], 3)
    np.testing.assert_allclose(
        client.predict("multi_input", normal)["output"],
        keras_outputs(keras_models["multi_input"], normal)["output"],
        atol=1e-5,
    )


def test_a_huge_model_name_is_not_found_with_a_bounded_message(client):
    try:
        client.metadata("m" * 16_000)
        raise AssertionError("a model named m*16000 exists?")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert len(error.details()) < 400 and "16000 characters" in error.details()


def test_startup_heap_is_frozen_and_gc_pauses_are_measured(server, client, keras_models):
    """Full collections of the TensorFlow heap set the p99 (SPEC §11): the heap is frozen after warm-up, and every
    collection's pause is visible in the metrics."""
    frozen = [line for line in server.log if "froze" in line and "garbage collector" in line]
    assert frozen and int(frozen[0].split("froze ")[1].split()[0]) > 100_000, frozen
    assert server.log_text().index("froze") < server.log_text().index("SERVING multi_input")
    inputs = random_inputs(keras_models["multi_input"], 64)
    before = server.metric("modelserver_gc_pause_seconds_count", generation="0")
    # Requests allocate container objects that live until their call ends; enough of them start young collections.
    for _ in range(200):
        client.predict("multi_input", inputs)
    assert server.metric("modelserver_gc_pause_seconds_count", generation="0") > before
