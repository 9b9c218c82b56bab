"""TLS and bearer tokens: a server started with a certificate and a token file answers TLS clients that trust it
and present a token, and only those; health stays open for probes; the CLI and the load tester speak both."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients import cli
from clients.client import ModelServerClient, tls_credentials
from clients.loadtest import LoadTestConfig, run_loadtest
from harness.server import ServerProcess
from server.settings import parse_settings

TOKEN = "s3cret-token-for-tests"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def make_certificate(folder: Path, name: str = "server") -> tuple[Path, Path]:
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@needs_openssl
def test_tls_and_token_server_serves_trusting_clients_with_a_token_only(tmp_path, model_repository, server, capsys):
    cert, key = make_certificate(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"other-token\n\n{TOKEN}\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    # `server` first: the shared repository is exported already, so this start only loads.
    args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--auth-token-file", str(tokens)]
    tls_server = ServerProcess(model_repository, [*args, "--reflection", "false"])
    credentials = tls_credentials(str(cert))
    try:
        with ModelServerClient(tls_server.target, credentials=credentials, retries=0) as anonymous:
            deadline = time.monotonic() + 120
            while anonymous.health() != "SERVING":  # health needs no token: probes keep working
                assert time.monotonic() < deadline, "TLS server never became SERVING"
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as caught:
                anonymous.list_models()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in caught.value.details()
        with ModelServerClient(tls_server.target, credentials=credentials, retries=0, token="wrong") as wrong:
            with pytest.raises(grpc.RpcError) as caught:
                wrong.predict_multi_input(np.zeros((1, 10)), np.zeros((1, 20)))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with ModelServerClient(tls_server.target, credentials=credentials, retries=0, token=TOKEN) as client:
            assert [m.name for m in client.list_models().models] == ["multi_input", "residual_cnn", "shared_layer"]
            reflection = reflection_pb2_grpc.ServerReflectionStub(client._channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as caught:
                list(reflection.ServerReflectionInfo(iter([request]), metadata=client._metadata, timeout=5))
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # --reflection false
        assert (
            tls_server.metric(
                "modelserver_requests_total", model="unknown", method="typed.PredictMultiInput", code="UNAUTHENTICATED"
            )
            == 1
        )
        with ModelServerClient(tls_server.target, retries=0, timeout=5) as plaintext:
            with pytest.raises(grpc.RpcError) as caught:
                plaintext.health()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        tls_flags = ["--target", tls_server.target, "--tls-ca-file", str(cert), "--token-file", str(token_file)]
        assert cli.main([*tls_flags, "health"]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        inputs = '{"input_a": [[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]], "input_b": [[0.5]]}'
        assert cli.main([*tls_flags, "predict", "multi_input", "--json", inputs]) == 1  # one value in input_b
        assert "INVALID_ARGUMENT" in capsys.readouterr().err  # past authentication, refused by validation
        result = asyncio.run(
            run_loadtest(
                LoadTestConfig(
                    target=tls_server.target, model="multi_input", concurrency=4, requests=40,
                    tls_ca_file=str(cert), token_file=str(token_file),
                )
            )
        )  # fmt: skip
        assert (result.ok, result.errors) == (40, {})
    finally:
        tls_server.kill()


def test_metrics_answer_only_at_metrics(server):
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/anything", timeout=5)
    assert caught.value.code == 404
    assert "modelserver_requests_total" in server.metrics_text()


@needs_openssl
def test_a_certificate_that_does_not_match_its_key_stops_startup_naming_the_setting(tmp_path, capsys):
    cert, _ = make_certificate(tmp_path, "one")
    _, other_key = make_certificate(tmp_path, "two")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for cert_file, key_file in ((cert, other_key), (not_pem, other_key)):
        with pytest.raises(SystemExit) as exited:
            parse_settings(["--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file)], environ={})
        assert exited.value.code == 2
        assert "tls_cert_file" in capsys.readouterr().err
