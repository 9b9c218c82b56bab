"""Settings: flags over MODELSERVER_* variables over defaults, validated with messages that name the setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

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
    ],
)
def test_bad_values_exit_2_with_a_clear_message(capsys, argv, environ, message):
    with pytest.raises(SystemExit) as caught:
        parse_settings(argv, environ=environ)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_help_documents_every_setting():
    text = build_parser().format_help()
    for field in dataclasses.fields(Settings):
        assert "--" + field.name.replace("_", "-") in text
        assert "MODELSERVER_" + field.name.upper() in text


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
