"""The one settings object: command-line flags over MODELSERVER_* environment variables over defaults.

Every field documents itself (its help text feeds --help) and is validated at startup.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import shutil
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.base.errors import InvalidInputError
from server.batching.config import SETTINGS as BATCHING_SETTINGS
from server.batching.config import BatchingConfig, flag_name, parse_bool
from server.registry.model_config import read_config
from server.registry.version_policy import VersionPolicy, parse_model_policies

ENV_PREFIX = "MODELSERVER_"
MIB = 1 << 20


def _setting(default: Any, help: str, parse: Callable[[str], Any] = str) -> Any:
    metadata = {"help": help, "parse": parse, "default": default}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def _optional_int(value: str) -> int | None:
    return int(value) if value.strip() else None


_bool = parse_bool


def _model_batching(value: str) -> dict[str, dict[str, Any]]:
    """Parse 'model:key=value,key=value;model2:key=value' into {model: {key: parsed value}}."""
    overrides: dict[str, dict[str, Any]] = {}
    for entry in filter(None, (e.strip() for e in value.split(";"))):
        model, sep, pairs = entry.partition(":")
        if not sep or not model.strip():
            raise ValueError(f"expected MODEL:KEY=VALUE[,KEY=VALUE...], got {entry!r}")
        raw: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in pairs.split(","))):
            key, eq, text = pair.partition("=")
            if not eq:
                raise ValueError(f"expected KEY=VALUE, got {pair!r}")
            raw[key.strip()] = text.strip()
        overrides.setdefault(model.strip(), {}).update(BatchingConfig.parse(raw))
    return overrides


@dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", "Address the gRPC and metrics servers listen on (0.0.0.0 for all).")
    grpc_port: int = _setting(50051, "gRPC port; 0 picks a free port (logged at startup).", int)
    metrics_port: int = _setting(8000, "Prometheus /metrics HTTP port; 0 picks a free port (logged at startup).", int)
    metrics: bool = _setting(True, "Serve Prometheus /metrics at all.", _bool)
    http_port: int | None = _setting(
        None,
        "HTTP port of the REST APIs (TF Serving's /v1 and the Open Inference Protocol's /v2), which also serves "
        "/metrics, /openapi.json and the health endpoints; empty (the default) = the metrics port, so that one HTTP "
        "port serves everything; 0 = no REST API (/metrics alone on the metrics port).",
        _optional_int,
    )
    http_idle_timeout: float = _setting(
        65.0,
        "Seconds an HTTP keep-alive connection may stay idle before the server closes it (above the 60 s of common "
        "load balancers, so that they close first).",
        float,
    )
    http_header_timeout: float = _setting(
        10.0,
        "Seconds an HTTP connection has to send each request's head (from the connection, or from the previous "
        "reply); slower clients are disconnected.",
        float,
    )
    port_file: Path | None = _setting(
        None,
        'When set, the ports bound are written to this file as JSON ({"grpc_port": N, "metrics_port": M}; '
        "metrics_port null without metrics) once the server listens: how a supervisor or a test learns the ports "
        "that port 0 picked. Written atomically (a temporary file renamed into place).",
        _optional_path,
    )
    model_repository: Path = _setting(
        Path("model_repository"),
        "Model repository folder: <repository>/<model>/<version>/ SavedModels. Built-in models are "
        "exported here at startup when missing.",
        Path,
    )
    metrics_host: str = _setting(
        "", "Address the metrics server listens on; empty = the same as --host (127.0.0.1 keeps it private)."
    )
    grace_period: float = _setting(
        30.0, "Seconds to finish accepted requests after SIGTERM/SIGINT before exiting.", float
    )
    shutdown_delay: float = _setting(
        0.0,
        "Seconds to keep serving normally after SIGTERM/SIGINT (health already NOT_SERVING) before refusing new "
        "requests, so that load balancers stop routing first (Kubernetes' preStop pattern).",
        float,
    )
    max_concurrent_rpcs: int = _setting(
        1024,
        "Calls outstanding at once, server-wide: those gRPC has received and not yet handed to a handler, and "
        "those being answered. Beyond it new inference calls get RESOURCE_EXHAUSTED at once. 0 = no limit.",
        int,
    )
    max_pending_rpcs: int = _setting(
        200_000,
        "Calls gRPC may hold received but not yet handed to a handler (its own backlog). Keep it well above "
        "--max-concurrent-rpcs: past it gRPC cancels calls itself, before our admission control can answer them.",
        int,
    )
    max_concurrent_streams: int = _setting(
        0,
        "Calls in flight at once on each client connection (HTTP/2 MAX_CONCURRENT_STREAMS). gRPC core refuses a "
        "connection's calls beyond it (UNAVAILABLE, the call never started) or the client holds them back, "
        "before the server's Python sees them. 0 = gRPC's default (no limit).",
        int,
    )
    max_receive_message_bytes: int = _setting(
        16 * MIB, "Largest request message accepted; larger ones get RESOURCE_EXHAUSTED.", int
    )
    max_send_message_bytes: int = _setting(16 * MIB, "Largest response message the server sends.", int)
    tls_cert_file: Path | None = _setting(
        None, "PEM certificate chain; enables TLS with --tls-key-file.", _optional_path
    )
    tls_key_file: Path | None = _setting(None, "PEM private key for --tls-cert-file.", _optional_path)
    tls_client_ca_file: Path | None = _setting(
        None,
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).",
        _optional_path,
    )
    auth_token_file: Path | None = _setting(
        None,
        "File of accepted bearer tokens, one per line; when set, every call except health checks needs the header "
        "'authorization: Bearer TOKEN' (else UNAUTHENTICATED).",
        _optional_path,
    )
    reflection: bool = _setting(True, "Serve gRPC server reflection (for grpcurl and similar tools).", _bool)
    seed: int = _setting(1234, "Seed for the built-in models' weights: the same seed gives the same weights.", int)
    test_hold_dir: Path | None = _setting(
        None,
        "Testing aid, off by default: while DIR/predict exists, every model call made after warm-up waits before "
        "it runs (DIR/import: before TensorFlow is imported; DIR/load: before each model loads; DIR/warmup: "
        "before each warm-up call; DIR/export: in each "
        "built-in model's export, its files written but not yet renamed into place), and each call that reaches "
        "such a point appends a line to DIR/<point>.arrived. A test holds the model busy this way, whatever the "
        "machine's speed, and releases it by deleting the file.",
        _optional_path,
    )
    workers: int = _setting(
        1,
        "Server processes sharing the gRPC port (SO_REUSEPORT); 0 = one per CPU core this process may use. One "
        "HTTP/2 connection stays on one worker (see README, Workers).",
        int,
    )
    inference_threads: int = _setting(2, "Threads that run model calls, off the event loop.", int)
    intra_op_threads: int = _setting(0, "TensorFlow intra-op threads per model call; 0 = TensorFlow's default.", int)
    inter_op_threads: int = _setting(0, "TensorFlow inter-op threads; 0 = TensorFlow's default.", int)
    log_level: str = _setting("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.", str.upper)
    repository_poll_seconds: float = _setting(
        2.0,
        "Seconds between scans of the model repository for new, changed and removed versions (SIGHUP scans at "
        "once); 0 = scan only at startup, on SIGHUP and on RepositoryModelLoad. Cheap (a folder listing per model), "
        "and a version copied without a manifest loads only once unchanged over two scans.",
        float,
    )
    version_policy: VersionPolicy = _setting(
        VersionPolicy("latest", 1),
        "Versions of each model to serve: latest:N (the N newest), all, or specific:V/V (as TF Serving's "
        "model_version_policy).",
        VersionPolicy.parse,
    )
    model_version_policy: dict[str, VersionPolicy] = _setting(
        {},
        "Per-model version policies: 'MODEL=POLICY;MODEL=POLICY', e.g. 'multi_input=latest:2'.",
        parse_model_policies,
    )
    model_config_file: Path | None = _setting(
        None,
        "TF Serving's model config file (text-format ModelServerConfig, its --model_config_file): the models to serve, "
        "each from its own base_path with its model_version_policy and version_labels, instead of the folders of "
        "--model-repository (built-in models are then not exported; a config names what is served). Relative "
        "base paths are taken from the file's folder. Reloaded by ModelService/HandleReloadConfigRequest and by "
        "--model-config-file-poll-seconds; --repository-poll-seconds scans the base paths for new versions.",
        _optional_path,
    )
    model_config_file_poll_seconds: float = _setting(
        0.0,
        "Seconds between reads of --model-config-file (TF Serving's --model_config_file_poll_wait_seconds); a changed "
        "file replaces the served set as HandleReloadConfigRequest does, an invalid one is logged and the old config "
        "keeps serving. 0 = read only at startup.",
        float,
    )
    allow_version_labels_for_unavailable_models: bool = _setting(
        False,
        "Let a new version label (or one that keeps its version) name a version that is not available yet, as TF "
        "Serving's flag of the same name; moving a label still needs its new version available.",
        _bool,
    )
    repository_control: bool = _setting(
        False,
        "Accept the Open Inference Protocol's RepositoryModelLoad and RepositoryModelUnload (they need a bearer token "
        "when --auth-token-file is set). Off by default: anyone who reaches the port could unload models. "
        "RepositoryIndex is always served.",
        _bool,
    )
    model_batching: dict[str, dict[str, Any]] = _setting(
        {},
        "Per-model overrides of the batching settings: 'MODEL:KEY=VALUE,...;MODEL:...' with keys "
        + ", ".join(f.name for f in BATCHING_SETTINGS)
        + " (allowed_batch_sizes as 1/8/32/64). Example: 'residual_cnn:max_batch_size=128;multi_input:enabled=false'.",
        _model_batching,
    )
    # The server-wide batching settings given by their flags (--batching, --max-batch-size, ...: one per field of
    # server.batching.config.BatchingConfig, which defines them), by field name.
    batching_defaults: dict[str, Any] = field(default_factory=dict, metadata={"flag": False})

    def validate(self) -> list[str]:
        """Every problem with these settings, each as a message naming the setting; empty when valid."""
        problems = []
        for name in ("grpc_port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                problems.append(f"{name} must be between 0 and 65535, got {value}")
        if (
            self.metrics
            and self.rest_port == self.metrics_port
            and not self.metrics_on_rest_port
            and self.metrics_port != 0
        ):
            problems.append(
                f"metrics_host {self.metrics_host} differs from host {self.host}, and /metrics would share the REST "
                "API's port: give /metrics a --metrics-port of its own, or the REST API an --http-port of its own"
            )
        if self.rest_port and self.rest_port == self.grpc_port:
            problems.append(f"http_port {self.rest_port} is the gRPC port: give REST (--http-port) a port of its own")
        if self.metrics and not self.metrics_on_rest_port and self.metrics_port and self.metrics_port == self.grpc_port:
            problems.append(f"metrics_port {self.metrics_port} is the gRPC port: give /metrics a port of its own")
        for name in ("http_idle_timeout", "http_header_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("grace_period", "shutdown_delay"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        if self.repository_poll_seconds < 0:
            problems.append(f"repository_poll_seconds must be >= 0 (0 = off), got {self.repository_poll_seconds}")
        if self.max_concurrent_rpcs < 0:
            problems.append(f"max_concurrent_rpcs must be >= 0 (0 = no limit), got {self.max_concurrent_rpcs}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0 (0 = one per CPU core), got {self.workers}")
        if self.max_concurrent_streams < 0:
            problems.append(f"max_concurrent_streams must be >= 0 (0 = no limit), got {self.max_concurrent_streams}")
        if self.max_pending_rpcs < 1:
            problems.append(f"max_pending_rpcs must be >= 1, got {self.max_pending_rpcs}")
        for name in ("max_receive_message_bytes", "max_send_message_bytes", "inference_threads"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (0 = TensorFlow's default), got {getattr(self, name)}")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            problems.append("tls_client_ca_file needs tls_cert_file and tls_key_file (mutual TLS)")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                problems.append(f"{name}: no such file {path}")
        problems += _tls_problems(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)
        if self.auth_token_file is not None and self.auth_token_file.is_file() and not self.auth_tokens():
            problems.append(f"auth_token_file {self.auth_token_file} holds no token (one per line)")
        for model in ("", *self.model_batching):
            problems += [
                f"batching{' for ' + model if model else ''}: {p}" for p in self.batching_for(model).problems()
            ]
        if self.model_config_file_poll_seconds < 0:
            problems.append(
                f"model_config_file_poll_seconds must be >= 0 (0 = off), got {self.model_config_file_poll_seconds}"
            )
        if self.model_config_file is not None:
            try:
                read_config(self.model_config_file)
            except InvalidInputError as error:
                problems.append(f"model_config_file: {error}")
        if self.model_repository.exists() and not self.model_repository.is_dir():
            problems.append(f"model_repository {self.model_repository} exists and is not a folder")
        return problems

    def batching_for(self, model: str) -> BatchingConfig:
        """The model's batching settings: defaults, the server-wide flags, then its --model-batching overrides."""
        return BatchingConfig(**{**self.batching_defaults, **self.model_batching.get(model, {})})

    def version_policy_for(self, model: str) -> VersionPolicy:
        return self.model_version_policy.get(model, self.version_policy)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def metrics_address(self) -> str:
        return self.metrics_host or self.host

    @property
    def rest_port(self) -> int | None:
        """The REST API's port: --http-port, by default the metrics port; None when switched off (--http-port 0)."""
        if self.http_port is None:
            return self.metrics_port
        return self.http_port or None

    @property
    def metrics_on_rest_port(self) -> bool:
        """Whether the REST listener serves /metrics instead of a listener of its own (they share the port)."""
        same_port = self.http_port is None or self.http_port == self.metrics_port
        same_host = self.metrics_host in ("", self.host)
        return self.metrics and self.rest_port is not None and same_port and same_host

    def auth_tokens(self) -> tuple[bytes, ...]:
        """The accepted bearer tokens: the token file's non-empty lines, or none when authentication is off."""
        if self.auth_token_file is None:
            return ()
        lines = self.auth_token_file.read_bytes().splitlines()
        return tuple(token for token in (line.strip() for line in lines) if token)


def _tls_problems(cert: Path | None, key: Path | None, client_ca: Path | None) -> list[str]:
    """Load the certificate, key and CA as a TLS server would, so that a bad file stops startup by name."""
    problems: list[str] = []
    if cert is not None and key is not None and cert.is_file() and key.is_file():
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, ValueError) as error:
            problems.append(
                f"tls_cert_file {cert} and tls_key_file {key} are not a PEM certificate chain and its private key "
                f"({error})"
            )
    if client_ca is not None and client_ca.is_file():
        try:
            ssl.create_default_context(cafile=str(client_ca))
        except (ssl.SSLError, ValueError) as error:
            problems.append(f"tls_client_ca_file {client_ca} is not a PEM CA bundle ({error})")
    return problems


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


@dataclass(frozen=True)
class _Flag:
    name: str  # the flag without "--", with underscores
    help: str
    default: Any
    parse: Callable[[str], Any]
    batching: str = ""  # the BatchingConfig field it sets server-wide, if any


def _flags() -> list[_Flag]:
    """Every flag: one per Settings field, then one per batching setting (defined in server/batching/config.py)."""
    flags = [
        _Flag(f.name, f.metadata["help"], f.metadata["default"], f.metadata["parse"])
        for f in dataclasses.fields(Settings)
        if f.metadata.get("flag", True)
    ]
    flags += [
        _Flag(flag_name(f), f.metadata["help"], f.default, f.metadata["parse"], batching=f.name)
        for f in BATCHING_SETTINGS
    ]
    return flags


def build_parser() -> argparse.ArgumentParser:
    # At least 100 columns: the help column then holds the longest variable name whole
    # (MODELSERVER_ALLOW_VERSION_LABELS_FOR_UNAVAILABLE_MODELS), which argparse would otherwise cut in two.
    width = max(100, shutil.get_terminal_size().columns - 2)
    parser = argparse.ArgumentParser(
        prog="python -m server",
        formatter_class=functools.partial(argparse.HelpFormatter, width=width),
        description="Serve the models of a model repository over gRPC, with health, reflection and metrics. "
        f"Every flag can also be set by the environment variable named beside it ({ENV_PREFIX}*); "
        "a flag wins over its variable.",
    )
    for flag in _flags():
        default = "unset" if flag.default in (None, {}, ()) else flag.default
        parser.add_argument(
            _flag(flag.name),
            dest=flag.name,
            default=None,
            metavar=flag.name.split("_")[-1].upper(),
            help=f"{flag.help} [env {_env(flag.name)}; default: {default}]",
        )
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Parse flags and environment into validated Settings; exits with status 2 and a clear message otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    batching: dict[str, Any] = {}
    for flag in _flags():
        raw, source = getattr(args, flag.name), _flag(flag.name)
        if raw is None and _env(flag.name) in environ:
            raw, source = environ[_env(flag.name)], _env(flag.name)
        if raw is None:
            continue
        try:
            parsed = flag.parse(raw)
        except ValueError as error:
            detail = f" ({error})" if flag.name == "model_batching" else ""
            parser.error(f"{source}={raw!r} is not valid{detail}: {flag.help}")
        if flag.batching:
            batching[flag.batching] = parsed
        else:
            values[flag.name] = parsed
    settings = Settings(**values, batching_defaults=batching)
    problems = settings.validate()
    if problems:
        parser.error("invalid settings:\n  " + "\n  ".join(problems))
    return settings


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # TensorFlow logs every SavedModel write at INFO through its own handler; keep its warnings only.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
