"""Settings: flags > LLMTAP_* environment > YAML file, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from exporter.cli import build_parser
from exporter.config import OPTIONS, ConfigError, HostPort, Settings, resolve


def settings_from(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    args = build_parser().parse_args(["serve", *argv])
    return resolve(vars(args), env or {})


def test_defaults_match_the_design() -> None:
    s = settings_from(["--upstream", "http://127.0.0.1:11434/"])
    assert s.upstream == "http://127.0.0.1:11434"
    assert s.listen == HostPort("0.0.0.0", 11435)
    assert s.admin_listen == HostPort("0.0.0.0", 9464)
    assert (s.connect_timeout, s.first_byte_timeout, s.idle_timeout) == (5.0, 600.0, 300.0)
    assert s.upstream_kind == "auto"


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "llmtap.yaml"
    config.write_text("upstream: http://file:1\nidle-timeout: 7\nmodels: [a, b]\n"
                      "access_log: false\nlisten: 127.0.0.1:1\n")
    env = {"LLMTAP_CONFIG": str(config), "LLMTAP_IDLE_TIMEOUT": "8",
           "LLMTAP_LISTEN": "127.0.0.1:2"}
    s = settings_from(["--listen", "127.0.0.1:3"], env)
    assert s.upstream == "http://file:1"  # only the file sets it
    assert s.idle_timeout == 8.0  # env beats file
    assert s.listen.port == 3  # flag beats env
    assert s.models == ("a", "b") and s.access_log is False


def test_repeatable_models_flag() -> None:
    s = settings_from(["--upstream", "http://h:1", "--models", "a,b", "--models", "c"])
    assert s.models == ("a", "b", "c")


@pytest.mark.parametrize(("argv", "message"), [
    ([], "--upstream is required"),
    (["--upstream", "ftp://x"], "--upstream: expected an http:// or https:// URL"),
    (["--upstream", "http://h:1", "--listen", "nope"], "--listen: expected HOST:PORT"),
    (["--upstream", "http://h:1", "--listen", ":70000"], "out of range"),
    (["--upstream", "http://h:1", "--idle-timeout", "0"], "expected a number of seconds > 0"),
    (["--upstream", "http://h:1", "--upstream-kind", "vllm"], "expected one of auto"),
])
def test_errors_name_the_setting(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from(argv)


def test_env_error_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="LLMTAP_MAX_MODELS"):
        settings_from(["--upstream", "http://h:1"], {"LLMTAP_MAX_MODELS": "lots"})


def test_unknown_file_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("upstream: http://h:1\nlisten_port: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'listen_port'"):
        settings_from(["--config", str(config)])


def test_cli_reports_errors_in_one_line_and_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "exporter", "serve"], capture_output=True,
                          text=True, env={"PATH": ""}, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("llmtap serve: error: --upstream is required")


def test_help_documents_every_flag_and_its_env_var() -> None:
    commands = build_parser()._subparsers
    assert commands is not None
    choices: Any = commands._group_actions[0].choices
    text = choices["serve"].format_help()
    for option in OPTIONS:
        assert option.flag in text and option.env in text


def test_pins_from_flags_and_file(tmp_path: Path) -> None:
    from exporter.config import settings_pins

    pins = tmp_path / "pins.txt"
    pins.write_text("# production pins\nllama3.2=sha256:A80C4F17ACD55265\n\n"
                    "qwen3:8b = 500a1f067a9f782620 # comment\n")
    s = settings_from(["--upstream", "http://h:1", "--pin-file", str(pins),
                       "--pin", "qwen3:8b=111122223333"])
    assert settings_pins(s) == {"llama3.2:latest": "a80c4f17acd55265",
                                "qwen3:8b": "111122223333"}  # the flag wins


@pytest.mark.parametrize(("pin", "message"), [
    ("llama3", "expected MODEL=DIGEST"),
    ("llama3=abc", "at least 12 hex digits"),
    ("llama3=zzzzzzzzzzzzzzzz", "at least 12 hex digits"),
])
def test_bad_pins_are_configuration_errors(pin: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from(["--upstream", "http://h:1", "--pin", pin])
