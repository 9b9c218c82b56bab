"""Settings: flags over MODELSERVER_* variables over defaults, validated with messages that name the setting."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.server import REPO_ROOT
from modelserver.v1 import modelserver_pb2 as pb
from server.base.tf_logging import nvidia_driver_present
from server.batching.config import SETTINGS as BATCHING_SETTINGS
from server.batching.config import BatchingConfig, flag_name
from server.settings import Settings, build_parser, parse_settings


def test_defaults():
    settings = parse_settings([], environ={})
    assert (settings.host, settings.grpc_port, settings.metrics_port) == ("127.0.0.1", 50051, 8000)
    assert settings.model_repository == Path("model_repository")
    assert settings.grace_period == 30.0 and not settings.tls_enabled


def test_environment_then_flags_win():
    environ = {"MODELSERVER_GRPC_PORT": "6000", "MODELSERVER_GRACE_PERIOD": "2.5", "MODELSERVER_LOG_LEVEL": "debug"}
    settings = parse_settings([], environ=environ)
    assert (settings.grpc_port, settings.grace_period, settings.log_level) == (6000, 2.5, "DEBUG")
    assert parse_settings(["--grpc-port", "7000"], environ=environ).grpc_port == 7000


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--grpc-port", "70000"], {}, "grpc_port must be between 0 and 65535, got 70000"),
        ([], {"MODELSERVER_METRICS_PORT": "eight"}, "MODELSERVER_METRICS_PORT='eight' is not valid"),
        (["--grace-period", "-1"], {}, "grace_period must be >= 0 seconds"),
        (["--max-receive-message-bytes", "0"], {}, "max_receive_message_bytes must be >= 1"),
        (["--tls-cert-file", "/etc/hostname"], {}, "tls_cert_file and tls_key_file must be set together"),
        (["--tls-cert-file", "/no/cert", "--tls-key-file", "/no/key"], {}, "tls_cert_file: no such file /no/cert"),
        (["--log-level", "chatty"], {}, "log_level must be DEBUG, INFO, WARNING or ERROR"),
        (["--model-repository", "/etc/hostname"], {}, "exists and is not a folder"),
        (["--shutdown-delay", "-2"], {}, "shutdown_delay must be >= 0 seconds"),
        (["--max-concurrent-rpcs", "-1"], {}, "max_concurrent_rpcs must be >= 0 (0 = no limit)"),
        (["--max-pending-rpcs", "0"], {}, "max_pending_rpcs must be >= 1"),
        (["--auth-token-file", "/no/tokens"], {}, "auth_token_file: no such file /no/tokens"),
        (["--reflection", "maybe"], {}, "--reflection='maybe' is not valid"),
        (["--version-policy", "newest"], {}, "--version-policy='newest' is not valid"),
        (["--version-policy", "latest:0"], {}, "--version-policy='latest:0' is not valid"),
        (["--model-version-policy", "multi_input:all"], {}, "--model-version-policy='multi_input:all' is not valid"),
        (["--repository-poll-seconds", "-1"], {}, "repository_poll_seconds must be >= 0 (0 = off)"),
        (["--model-config-file-poll-seconds", "-1"], {}, "model_config_file_poll_seconds must be >= 0 (0 = off)"),
        (["--model-config-file", "/no/models.config"], {}, "model_config_file: cannot read the model config file"),
        (["--model-config-file", "/etc/hostname"], {}, "model_config_file: the model config is not a text-format"),
        (["--allow-version-labels-for-unavailable-models", "perhaps"], {}, "is not valid"),
    ],
)
def test_bad_values_exit_2_with_a_clear_message(capsys, argv, environ, message):
    with pytest.raises(SystemExit) as caught:
        parse_settings(argv, environ=environ)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_setting():
    text = build_parser().format_help()
    names = [f.name for f in dataclasses.fields(Settings) if f.metadata.get("flag", True)]
    for name in [*names, *(flag_name(f) for f in BATCHING_SETTINGS)]:
        assert "--" + name.replace("_", "-") in text
        assert "MODELSERVER_" + name.upper() in text


# A value other than the default for each batching setting, as text, and as parsed.
OTHER_VALUES = {
    "enabled": ("false", False),
    "max_batch_size": ("32", 32),
    "batch_timeout": ("0.02", 0.02),
    "max_queued_rows": ("100", 100),
    "policy": ("fixed", "fixed"),
    "max_batches_in_flight": ("3", 3),
    "allowed_batch_sizes": ("1/8/32", (1, 8, 32)),
}


def test_each_batching_setting_comes_from_its_one_definition():
    """A batching setting defined in BatchingConfig is a server-wide flag and variable, a --model-batching key,
    validated, and a field of GetModelMetadata's BatchingSettings, with nothing else to write."""
    assert set(OTHER_VALUES) == {f.name for f in BATCHING_SETTINGS}, "a new setting: add a value to OTHER_VALUES"
    message_fields = set(pb.BatchingSettings.DESCRIPTOR.fields_by_name)
    assert set(BatchingConfig().message_fields()) == message_fields
    flags, env, per_model = [], {}, []
    for setting in BATCHING_SETTINGS:
        text, _ = OTHER_VALUES[setting.name]
        flags += ["--" + flag_name(setting).replace("_", "-"), text]
        env["MODELSERVER_" + flag_name(setting).upper()] = text
        per_model.append(f"{setting.name}={text}")
    expected = BatchingConfig(**{name: value for name, (_, value) in OTHER_VALUES.items()})
    assert parse_settings(flags, environ={}).batching_for("any") == expected
    assert parse_settings([], environ=env).batching_for("any") == expected
    overridden = parse_settings(["--model-batching", "m:" + ",".join(per_model)], environ={})
    assert overridden.batching_for("m") == expected
    assert overridden.batching_for("other") == BatchingConfig()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch-size", "0"], "batching: max_batch_size must be >= 1, got 0"),
        (["--batch-timeout", "-1"], "batching: batch_timeout must be >= 0 seconds"),
        (["--max-queued-rows", "8"], "max_queued_rows (8) must be >= max_batch_size (64)"),
        (["--batching-policy", "idle"], "policy must be one of cost, fixed; got 'idle'"),
        (["--max-batches-in-flight", "0"], "max_batches_in_flight must be >= 1, got 0"),
        (["--allowed-batch-sizes", "1/8"], "allowed_batch_sizes must be increasing, positive and end with"),
        (["--model-batching", "m:max_batch_size=0"], "batching for m: max_batch_size must be >= 1"),
        (["--model-batching", "m:colour=red"], "unknown batching key 'colour'"),
        (["--batching", "perhaps"], "--batching='perhaps' is not valid"),
    ],
)
def test_bad_batching_values_exit_2_naming_the_setting(capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        parse_settings(argv, environ={})
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_an_empty_token_file_is_refused_and_tokens_are_its_lines(tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokens.write_text("\n  \n")
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--auth-token-file", str(tokens)], environ={})
    assert exited.value.code == 2 and "holds no token" in capsys.readouterr().err
    tokens.write_text("one\n\n two \n")
    assert parse_settings(["--auth-token-file", str(tokens)], environ={}).auth_tokens() == (b"one", b"two")


def test_version_policies_choose_among_complete_versions():
    settings = parse_settings(
        ["--version-policy", "latest:2", "--model-version-policy", "a=all; b=specific:1/3"], environ={}
    )
    on_disk = [1, 2, 3, 5]
    assert settings.version_policy_for("other").aspired(on_disk) == {3, 5}
    assert settings.version_policy_for("a").aspired(on_disk) == {1, 2, 3, 5}
    assert settings.version_policy_for("b").aspired(on_disk) == {1, 3}
    assert settings.version_policy_for("b").aspired([2]) == set()
    assert parse_settings([], environ={}).version_policy_for("x").aspired(on_disk) == {5}


def test_tensorflow_probing_for_a_gpu_logs_no_error_where_there_is_none():
    """TensorFlow's CUDA probe logs "failed call to cuInit" as an error on every machine without an NVIDIA driver;
    the server sets TensorFlow's log level before importing it so that a CPU start logs no error."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = (
        "from server.base.tf_logging import quiet_tensorflow_logs; quiet_tensorflow_logs()\n"
        "import os, tensorflow as tf\n"
        "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], len(tf.config.list_physical_devices('GPU')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    level, gpus = run.stdout.split()
    assert level == ("2" if nvidia_driver_present() else "3")
    assert "cuInit" not in run.stderr, run.stderr
