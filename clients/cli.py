"""Command-line client: health, predict, metadata and list, printing JSON (or the health status)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from clients import loadtest
from clients.client import TYPED_MODELS, ModelServerClient, read_token, tls_credentials
from clients.oip import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients", description="modelserver command-line client.")
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address HOST:PORT (default: %(default)s)")
    parser.add_argument(
        "--http-target",
        default="127.0.0.1:8000",
        help="the server's HTTP port, http(s)://HOST:PORT or HOST:PORT, for loadtest's rest-* protocols "
        "(default: %(default)s; https with the --tls* flags)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="deadline per call in seconds (default: %(default)s)"
    )
    parser.add_argument("--tls-ca-file", help="TLS: PEM CA bundle that signed the server's certificate")
    parser.add_argument("--tls-cert-file", help="mutual TLS: PEM client certificate (with --tls-key-file)")
    parser.add_argument("--tls-key-file", help="mutual TLS: PEM private key of --tls-cert-file")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CA roots (implied by --tls-*)")
    parser.add_argument("--token-file", help="file whose first line is a bearer token for the server")
    commands = parser.add_subparsers(dest="command", required=True)

    health = commands.add_parser("health", help="print the health status; exit 0 when SERVING, 1 otherwise")
    health.add_argument("--service", default="", help="a model name or gRPC service name (default: the whole server)")

    predict = commands.add_parser(
        "predict", help="run a prediction with any model (Open Inference Protocol) and print {output: rows} as JSON"
    )
    predict.add_argument("model", help="any model of the repository (`list` shows them)")
    predict.add_argument(
        "--json",
        required=True,
        dest="inputs",
        help='inputs as JSON, each a list of rows: {"input_a": [[...]], "input_b": [[...]]}',
    )
    predict.add_argument("--version", type=int, default=0, help="model version (default: latest)")

    metadata = commands.add_parser("metadata", help="print a model's metadata as JSON")
    metadata.add_argument("model")
    metadata.add_argument("--version", type=int, default=0, help="model version (default: latest)")

    commands.add_parser("list", help="print every model and whether it is ready, as JSON")

    load = commands.add_parser("loadtest", help="load-test a model (closed or open loop) and print a summary")
    load.add_argument(
        "model", help=f"with --protocol typed: one of {', '.join(sorted(TYPED_MODELS))}; the others: any model"
    )
    loop = load.add_mutually_exclusive_group(required=True)
    loop.add_argument("--concurrency", type=int, help="closed loop: N callers, each waits for its reply")
    loop.add_argument("--rate", type=float, help="open loop: R requests/s, sent on schedule")
    bound = load.add_mutually_exclusive_group(required=True)
    bound.add_argument("--duration", type=float, help="measure for S seconds")
    bound.add_argument("--requests", type=int, help="measure N requests")
    load.add_argument("--rows-per-request", type=int, default=1, help="rows per request (default: %(default)s)")
    load.add_argument("--warmup", type=float, default=0.0, help="seconds of load first, not counted (default: 0)")
    load.add_argument("--version", type=int, default=0, help="model version (default: latest)")
    load.add_argument(
        "--max-outstanding", type=int, default=1000, help="open loop: in-flight cap (default: %(default)s)"
    )
    load.add_argument(
        "--channels", type=int, default=1, help="gRPC channels to spread calls over (default: 1; not for rest-*)"
    )
    load.add_argument("--seed", type=int, default=0, help="seed of the random input rows (default: 0)")
    load.add_argument(
        "--protocol",
        choices=loadtest.PROTOCOLS,
        default="typed",
        help="typed: our API; oip: Open Inference Protocol ModelInfer (raw tensors, any OIP server and model); "
        "oip-stream: ModelStreamInfer, one stream per channel; over HTTP to --http-target: rest-oip-json (OIP, JSON "
        "tensors), rest-oip-binary (OIP, Triton's binary tensors), rest-tfserving (TF Serving :predict, row format) "
        "(default: %(default)s)",
    )
    load.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE")
    load.add_argument("--no-progress", action="store_true", help="no live progress on stderr")
    return parser


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS flag is given, else None (plaintext)."""
    if not (args.tls or args.tls_ca_file or args.tls_cert_file or args.tls_key_file):
        return None
    return tls_credentials(args.tls_ca_file, args.tls_cert_file, args.tls_key_file)


def _jsonable(array: Any) -> Any:
    """Rows as JSON lists; BYTES elements as text."""
    if array.dtype == object:
        return [_jsonable(v) if hasattr(v, "dtype") else v.decode(errors="replace") for v in array]
    return array.tolist()


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "loadtest" and args.protocol == "typed" and args.model not in TYPED_MODELS:
        parser.error(f"argument model: with --protocol typed, choose from {', '.join(sorted(TYPED_MODELS))}")
    if args.command == "loadtest":
        return loadtest.main(args)
    try:
        credentials = channel_credentials(args)
        token = read_token(args.token_file)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with ModelServerClient(args.target, timeout=args.timeout, credentials=credentials, token=token) as client:
        try:
            if args.command == "health":
                status = client.health(args.service)
                print(status)
                return 0 if status == "SERVING" else 1
            if args.command == "predict":
                try:
                    inputs = json.loads(args.inputs)
                except json.JSONDecodeError as error:
                    print(f"error: --json is not valid JSON: {error}", file=sys.stderr)
                    return 2
                try:
                    outputs = client.predict_any(args.model, inputs, version=args.version)
                except InputError as error:
                    print(f"error: {error}", file=sys.stderr)
                    return 2
                _print_json({name: _jsonable(value) for name, value in outputs.items()})
            elif args.command == "metadata":
                _print_json(MessageToDict(client.metadata(args.model, args.version), preserving_proto_field_name=True))
            elif args.command == "list":
                _print_json(MessageToDict(client.list_models(), preserving_proto_field_name=True))
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            if args.command == "health":
                print("UNKNOWN")
            return 1
    return 0
