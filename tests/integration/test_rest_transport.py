"""The HTTP port as a transport of the same server (issue 23): a REST and a gRPC request merged into one batch,
overload refused at once with 429 and Retry-After, SIGTERM under 64 HTTP callers on keep-alive connections losing
nothing, slow and idle connections closed without holding up other callers, bearer tokens and TLS as on gRPC, and
every worker of --workers serving HTTP on the shared port."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from clients.client import ModelServerClient
from harness.drain import http_drain_round
from harness.server import ServerProcess, serving
from tests.helpers.models import keras_outputs, random_inputs
from tests.helpers.scrape import Metrics, wait_until
from tests.integration.test_tls import make_certificate, needs_openssl

TOKEN = "rest-token-for-tests"


def predict_body(inputs: dict[str, np.ndarray]) -> dict:
    return {"instances": [{name: value[row].tolist() for name, value in inputs.items()} for row in range(1)]}


def post_predict(server: ServerProcess, inputs: dict[str, np.ndarray], **options) -> requests.Response:
    return requests.post(f"{server.http_url}/v1/models/multi_input:predict", json=predict_body(inputs), timeout=60,
                         **options)  # fmt: skip


@pytest.fixture(scope="module")
def held_server(model_repository: Path, server: ServerProcess) -> Iterator[ServerProcess]:
    """A server whose model calls the test holds, one batch of multi_input at a time (a held batch keeps later
    requests in its queue); admission refuses beyond 8 outstanding calls once 16 are admitted."""
    with serving(
        model_repository,
        ["--max-concurrent-rpcs", "8", "--model-batching", "multi_input:max_batches_in_flight=1"],
        holds=True,
    ) as process:
        yield process


def test_a_rest_and_a_grpc_request_are_merged_into_one_batch(held_server, keras_models):
    inputs = random_inputs(keras_models["multi_input"], 1, seed=5)
    expected = keras_outputs(keras_models["multi_input"], inputs)["output"]
    before = Metrics(held_server)
    with ModelServerClient(held_server.target, timeout=60, retries=0) as client:
        pool = concurrent.futures.ThreadPoolExecutor(3)
        held_server.hold()
        try:
            arrived = held_server.arrived()
            holder = pool.submit(client.predict_multi_input, inputs["input_a"], inputs["input_b"])
            held_server.wait_arrived(arrived + 1)  # the holder's batch runs (held): the next two queue together
            rest = pool.submit(post_predict, held_server, inputs)
            grpc_call = pool.submit(client.predict_multi_input, inputs["input_a"], inputs["input_b"])
            wait_until(held_server, lambda m: m("modelserver_queue_rows", model="multi_input") == 2, "both to queue")
        finally:
            held_server.release()
        reply = rest.result(timeout=120)
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(np.asarray(reply.json()["predictions"]), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grpc_call.result(timeout=120)["output"], expected, rtol=1e-5, atol=1e-6)
        holder.result(timeout=120)
        pool.shutdown()
    after = Metrics(held_server)
    batches = after("modelserver_batch_size_rows_count", model="multi_input") - before(
        "modelserver_batch_size_rows_count", model="multi_input"
    )
    rows = after("modelserver_batch_size_rows_sum", model="multi_input") - before(
        "modelserver_batch_size_rows_sum", model="multi_input"
    )
    assert (batches, rows) == (2, 3), "the holder's batch, then the REST and the gRPC request in one batch"
    ok = {"model": "multi_input", "method": "tfs.Predict", "code": "OK"}
    assert (
        after("modelserver_requests_total", transport="http", **ok)
        - before("modelserver_requests_total", transport="http", **ok)
        == 1
    )


def test_overload_is_refused_at_once_with_429_and_retry_after(held_server, keras_models):
    """16 requests keep the model busy (held); beyond --max-concurrent-rpcs 8 outstanding, a new request is
    refused before its body is read: 429, a Retry-After in seconds, and a message that says to back off."""
    inputs = random_inputs(keras_models["multi_input"], 1, seed=6)
    expected = keras_outputs(keras_models["multi_input"], inputs)["output"]
    pool = concurrent.futures.ThreadPoolExecutor(16)
    held_server.hold()
    try:
        arrived = held_server.arrived()
        busy = [pool.submit(post_predict, held_server, inputs) for _ in range(16)]
        wait_until(held_server, lambda m: m.in_flight("multi_input") >= 16, "16 admitted requests")
        held_server.wait_arrived(arrived + 1)
        refused = post_predict(held_server, inputs)
    finally:
        held_server.release()
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert "overloaded" in refused.json()["error"] and "back off" in refused.json()["error"]
    for future in busy:  # the admitted ones are all answered
        reply = future.result(timeout=120)
        assert reply.status_code == 200, reply.text
        np.testing.assert_allclose(np.asarray(reply.json()["predictions"]), expected, rtol=1e-5, atol=1e-6)
    pool.shutdown()
    assert post_predict(held_server, inputs).status_code == 200  # and the server serves on


def test_sigterm_under_64_http_callers_drains_without_losing_a_call(model_repository, server, keras_models):
    inputs = random_inputs(keras_models["multi_input"], 1, seed=7)
    expected = float(keras_outputs(keras_models["multi_input"], inputs)["output"][0, 0])
    with serving(model_repository, ["--grace-period", "30"], holds=True) as process:
        outcomes, wrong = asyncio.run(http_drain_round(process, predict_body(inputs), expected))
        assert process.process.wait(60) == 0, process.log_text()
    before = {code: n for (when, code), n in outcomes.items() if when == "before"}
    assert before == {"OK": 64}, f"every call sent before the signal succeeds: {dict(outcomes)}"
    after = {code for (when, code), _ in outcomes.items() if when == "after"}
    assert after <= {"OK", "UNAVAILABLE"}, f"later calls are answered or refused as unavailable: {dict(outcomes)}"
    assert ("after", "UNAVAILABLE") in outcomes, "the draining server refused new calls"
    assert not wrong, f"answers that differ from the model's: {wrong[:5]}"


def _slow_head(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # a header that never ends
    return sock


def test_slow_heads_and_idle_connections_are_closed_and_others_served(model_repository, server, keras_models):
    with serving(model_repository, ["--http-header-timeout", "1", "--http-idle-timeout", "2"]) as process:
        assert process.http_port is not None
        slow = _slow_head(process.http_port)
        idle = [socket.create_connection(("127.0.0.1", process.http_port)) for _ in range(2000)]
        inputs = random_inputs(keras_models["multi_input"], 1, seed=8)
        reply = post_predict(process, inputs)  # while 2000 connections sit idle and one sends its head slowly
        assert reply.status_code == 200, reply.text
        # Bounded waits for the server to act (not timings): it closes the slow head, then the idle connections.
        # The slow client sends a byte every half second: a timer of idleness alone would never close it.
        deadline = time.monotonic() + 60
        slow.settimeout(0.5)
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                slow.sendall(b"x")
                closed = slow.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
        assert closed, "a client sending its request head a byte at a time is disconnected"
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert sock.recv(1) == b"", "an idle connection is closed by the server"
            sock.close()
        slow.close()
        assert post_predict(process, inputs).status_code == 200


@needs_openssl
def test_tokens_and_tls_apply_to_http_with_health_and_metrics_open(tmp_path, model_repository, server, keras_models):
    cert, key = make_certificate(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--auth-token-file", str(tokens)]
    with ServerProcess(model_repository, args) as process:
        base = f"https://127.0.0.1:{process.http_port}"
        inputs = random_inputs(keras_models["multi_input"], 1, seed=9)
        body = predict_body(inputs)
        deadline = time.monotonic() + 120
        while requests.get(f"{base}/v2/health/ready", verify=str(cert), timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the TLS server never became ready"  # health needs no token
            time.sleep(0.05)
        assert "modelserver_requests_total" in requests.get(f"{base}/metrics", verify=str(cert), timeout=10).text
        anonymous = requests.post(f"{base}/v1/models/multi_input:predict", json=body, verify=str(cert), timeout=30)
        assert anonymous.status_code == 401
        assert "bearer token" in anonymous.json()["error"]
        assert anonymous.headers["WWW-Authenticate"] == "Bearer"
        wrong = requests.get(f"{base}/v2/models/multi_input", headers={"Authorization": "Bearer nope"},
                             verify=str(cert), timeout=30)  # fmt: skip
        assert wrong.status_code == 401
        granted = requests.post(f"{base}/v1/models/multi_input:predict", json=body, verify=str(cert), timeout=30,
                                headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert granted.status_code == 200, granted.text
        expected = keras_outputs(keras_models["multi_input"], inputs)["output"]
        np.testing.assert_allclose(np.asarray(granted.json()["predictions"]), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(requests.exceptions.ConnectionError):  # plaintext to the TLS port
            requests.get(f"http://127.0.0.1:{process.http_port}/v2/health/ready", timeout=10)
        assert (
            process.metric("modelserver_requests_total", method="tfs.Predict", code="UNAUTHENTICATED", transport="http")
            == 1
        )


def test_every_worker_serves_http_on_the_shared_port_and_metrics_count_them_all(model_repository, server,
                                                                                 keras_models):  # fmt: skip
    inputs = random_inputs(keras_models["multi_input"], 1, seed=10)
    expected = keras_outputs(keras_models["multi_input"], inputs)["output"]
    with serving(model_repository, ["--workers", "2"]) as process:
        assert process.http_port == process.metrics_port
        answered: set[int] = set()
        deadline = time.monotonic() + 120
        calls = 0
        while len(answered) < 2:  # each new connection may land on either worker (SO_REUSEPORT)
            assert time.monotonic() < deadline, "one worker never answered"
            reply = post_predict(process, inputs, headers={"Connection": "close"})
            assert reply.status_code == 200, reply.text
            np.testing.assert_allclose(np.asarray(reply.json()["predictions"]), expected, rtol=1e-5, atol=1e-6)
            calls += 1
            scrape = Metrics(process)
            answered = {
                int(labels["worker"])
                for name, labels, value in scrape.samples
                if name == "modelserver_worker_requests_total" and value > 0
            }
        scrape = Metrics(process)
        assert scrape("modelserver_workers") == 2
        assert scrape("modelserver_requests_total", method="tfs.Predict", code="OK", transport="http") == calls


def _raw_reply(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 reply read from a raw socket (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a reply: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def test_hostile_heads_bodies_and_numbers_are_refused_and_keep_alive_outlives_the_head_timer(
    model_repository, server, keras_models
):
    """Found in review: a keep-alive connection must live for --http-idle-timeout, not the head timer's seconds; a
    head of megabytes, a body that stops arriving, numbers of thousands of digits and a zero beside a huge
    dimension are each refused (never a 500), and the server serves on."""
    inputs = random_inputs(keras_models["multi_input"], 1, seed=11)
    body = json.dumps(predict_body(inputs)).encode()
    request = (
        b"POST /v1/models/multi_input:predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    with serving(model_repository, ["--http-header-timeout", "1", "--http-idle-timeout", "30"]) as process:
        assert process.http_port is not None
        with socket.create_connection(("127.0.0.1", process.http_port), timeout=30) as sock:
            sock.sendall(request)
            assert _raw_reply(sock)[0] == 200
            time.sleep(2.5)  # idle past the head timer: the connection is still open, and serves the next request
            sock.sendall(request)
            assert _raw_reply(sock)[0] == 200
        with socket.create_connection(("127.0.0.1", process.http_port), timeout=30) as sock:
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
            assert _raw_reply(sock)[0] == 400  # uvicorn's answer to a parser stopped at 64 KiB of head
        with socket.create_connection(("127.0.0.1", process.http_port), timeout=30) as sock:
            sock.sendall(b"POST /v1/models/multi_input:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
            status, reply = _raw_reply(sock)  # no body byte for --http-header-timeout seconds
            assert status == 408 and b"stopped arriving" in reply
        url = process.http_url
        shape = [0, 2**62]
        hostile = [
            requests.get(f"{url}/v1/models/multi_input/versions/{'9' * 5000}", timeout=30),
            requests.get(f"{url}/v2/models/multi_input/versions/{'9' * 5000}", timeout=30),
            requests.post(
                f"{url}/v2/models/multi_input/infer",
                data=b'{"inputs": []}',
                timeout=30,
                headers={"Inference-Header-Content-Length": "9" * 5000},
            ),  # fmt: skip
            requests.post(
                f"{url}/v2/models/multi_input/infer",
                timeout=30,
                json={
                    "inputs": [
                        {"name": "input_a", "datatype": "FP32", "shape": shape, "data": []},
                        {"name": "input_b", "datatype": "FP32", "shape": [0, 20], "data": []},
                    ]
                },
            ),  # fmt: skip
        ]
        assert [r.status_code for r in hostile] == [400, 400, 400, 400], [r.text[:200] for r in hostile]
        assert all(len(r.text) < 2000 for r in hostile), "caller-supplied strings are cut short in messages"
        assert post_predict(process, inputs).status_code == 200


def test_a_body_still_arriving_when_sigterm_comes_is_answered(model_repository, server, keras_models):
    """Found in review: a request admitted on its head whose body is still arriving when the drain begins reaches
    the core before the core refuses new work (the drain waits for bodies being read, like gRPC's marker)."""
    inputs = random_inputs(keras_models["multi_input"], 1, seed=12)
    expected = keras_outputs(keras_models["multi_input"], inputs)["output"]
    body = json.dumps(predict_body(inputs)).encode()
    head = b"POST /v1/models/multi_input:predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with serving(model_repository, ["--grace-period", "20"]) as process:
        assert process.http_port is not None
        with socket.create_connection(("127.0.0.1", process.http_port), timeout=30) as sock:
            sock.sendall(head + body[:10])
            deadline = time.monotonic() + 30
            time.sleep(0.2)  # the head is read and admitted (the body has not all come)
            process.process.send_signal(signal.SIGTERM)
            while "signal received" not in process.log_text():
                assert time.monotonic() < deadline, "the server never saw the signal"
                time.sleep(0.05)
            time.sleep(0.5)  # past the drain's in-transit wait: the rest of the body arrives only now
            sock.sendall(body[10:])
            status, reply = _raw_reply(sock)
        assert status == 200, reply
        np.testing.assert_allclose(np.asarray(json.loads(reply)["predictions"]), expected, rtol=1e-5, atol=1e-6)
        assert process.process.wait(60) == 0
