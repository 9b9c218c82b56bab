"""TLS: a server started with a certificate answers TLS clients that trust it, and only those."""

from __future__ import annotations

import shutil
import subprocess
import time

import grpc
import pytest

from clients.client import ModelServerClient
from tests.serverproc import ServerProcess


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_server_serves_trusting_clients_only(tmp_path, model_repository, server):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    # `server` first: the shared repository is exported already, so this start only loads.
    tls_server = ServerProcess(model_repository, ["--tls-cert-file", str(cert), "--tls-key-file", str(key)])
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with ModelServerClient(tls_server.target, credentials=credentials, retries=0) as client:
            deadline = time.monotonic() + 120
            while client.health() != "SERVING":
                assert time.monotonic() < deadline, "TLS server never became SERVING"
                time.sleep(0.05)
            assert [m.name for m in client.list_models().models] == ["multi_input", "residual_cnn", "shared_layer"]
        with ModelServerClient(tls_server.target, retries=0, timeout=5) as plaintext:
            with pytest.raises(grpc.RpcError) as caught:
                plaintext.health()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        tls_server.kill()
