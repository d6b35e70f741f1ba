"""One settings object for `llmtap serve`: command-line flags > LLMTAP_* environment > YAML file.

Every option is declared once in OPTIONS; the flag, its environment twin, the YAML key and the
README's configuration table all come from that declaration, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

UPSTREAM_KINDS = ("auto", "ollama", "llama.cpp", "openai")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (a name other than localhost is not resolved)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host_port(text: str) -> HostPort:
    """`HOST:PORT`, `:PORT` (all interfaces) or `[v6]:PORT`."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    host = host.strip("[]") or "0.0.0.0"
    return HostPort(host, port)


def parse_upstream(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {text!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ValueError(f"bad port in {text!r}: {exc}") from None
    return text.rstrip("/")


def parse_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"expected a number of seconds > 0, got {text!r}")
    return value


def whole_number(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(f"expected a whole number ≥ {minimum}, got {text!r}")
        return value

    return parse


parse_positive_int = whole_number(1)
parse_non_negative_int = whole_number(0)


def parse_cidrs(text: str) -> tuple[str, ...]:
    import ipaddress

    cidrs = parse_list(text)
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"expected CIDRs such as 10.0.0.0/8 or 127.0.0.1, got {cidr!r}")\
                from None
    return cidrs


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in str(text).split(",") if item.strip())


def choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return text

    return parse


@dataclass(frozen=True)
class Option:
    name: str  # attribute name; the flag is --name-with-dashes, the env var LLMTAP_NAME
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str = ""
    repeatable: bool = False  # flag may be given several times (values joined)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "LLMTAP_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("upstream", parse_upstream, None,
           "URL of the model server llmtap sits in front of (required), e.g. "
           "http://127.0.0.1:11434 for Ollama, http://127.0.0.1:8080 for llama-server "
           "(9931 in builds after llama.cpp PR 26508); the kind is detected, not guessed "
           "from the port",
           "URL"),
    Option("upstream_kind", choice(UPSTREAM_KINDS), "auto",
           "what the upstream is: auto detects it (/api/version answers → ollama, /props → "
           "llama.cpp, else openai); it sets the gen_ai_provider_name label",
           "|".join(UPSTREAM_KINDS)),
    Option("listen", parse_host_port, parse_host_port("0.0.0.0:11435"),
           "address of the proxy port clients use instead of the upstream's", "HOST:PORT"),
    Option("admin_listen", parse_host_port, parse_host_port("0.0.0.0:9464"),
           "address of the admin port: /metrics, /healthz, /readyz, /llmtap/v1/state. Bind it "
           "to 127.0.0.1 or a private interface when the proxy port is public", "HOST:PORT"),
    Option("connect_timeout", parse_seconds, 5.0,
           "seconds to establish a connection to the upstream", "SECONDS"),
    Option("first_byte_timeout", parse_seconds, 600.0,
           "seconds to wait for the upstream's response headers (cold model loads take "
           "minutes)", "SECONDS"),
    Option("idle_timeout", parse_seconds, 300.0,
           "seconds of silence allowed between two chunks of a response; there is no total "
           "limit", "SECONDS"),
    Option("models", parse_list, (),
           "model names that always get their own metric label (comma-separated, or repeat "
           "the flag); models the upstream lists are added automatically, any other name "
           "is labelled 'other'", "NAME[,NAME...]", repeatable=True),
    Option("max_models", parse_positive_int, 100,
           "most model label values learned from answers when the upstream has no model "
           "list; past it, new names are labelled 'other'", "N"),
    Option("inventory_interval", parse_seconds, 30.0,
           "seconds between refreshes of the upstream's model list", "SECONDS"),
    Option("health_interval", parse_seconds, 5.0,
           "seconds between upstream health probes (they drive /readyz and llmtap_upstream_up)",
           "SECONDS"),
    Option("api_key_file", str, "",
           "admit only requests carrying a key listed (hashed) in this file, as "
           "'Authorization: Bearer KEY' or 'x-api-key: KEY'; make keys with `llmtap key NAME`",
           "FILE"),
    Option("max_waiting_per_model", parse_non_negative_int, 0,
           "most requests per model waiting at llmtap for a first token; past it llmtap "
           "answers 503 with Retry-After instead of queueing more (0: no limit)", "N"),
    Option("max_body_bytes", parse_positive_int, 64 << 20,
           "largest request body accepted, streamed ones included; larger ones get 413 in "
           "the client's dialect", "BYTES"),
    Option("header_timeout", parse_seconds, 15.0,
           "seconds a client connection may take to send a complete request head (against "
           "slowloris); also how long an idle keep-alive connection stays open", "SECONDS"),
    Option("client_idle_timeout", parse_seconds, 60.0,
           "seconds a client may go without sending a byte of a request body it owes, or "
           "without reading a byte of its answer, before llmtap disconnects it (the upstream "
           "request is closed and counted as client_timeout)", "SECONDS"),
    Option("trusted_proxies", parse_cidrs, (),
           "peers (CIDRs, comma-separated) whose X-Forwarded-For, -Proto and -Host llmtap "
           "passes on; from any other peer they are set from the connection",
           "CIDR[,CIDR...]", repeatable=True),
    Option("pin", parse_list, (),
           "pin a model to a digest, MODEL=DIGEST (sha256, 12+ hex digits; repeat the flag "
           "or separate with commas); llmtap_model_digest_mismatch says when the installed "
           "model differs (Ollama)", "MODEL=DIGEST", repeatable=True),
    Option("pin_file", str, "",
           "file of pins, one MODEL=DIGEST per line (# comments)", "FILE"),
    Option("enforce_pins", parse_bool, False,
           "refuse requests for a pinned model whose installed digest differs, with an error "
           "in the client's dialect, instead of serving a different build (until the first "
           "model list is read, every request gets 503 with Retry-After: 1)", "true|false"),
    Option("gpu", choice(("off", "auto", "on")), "auto",
           "GPU metrics through NVML: auto samples when the NVIDIA driver loads, on also "
           "logs an error when it cannot, off never loads NVML", "off|auto|on"),
    Option("gpu_interval", parse_seconds, 2.0,
           "seconds between GPU samples", "SECONDS"),
    Option("access_log", parse_bool, True,
           "write one JSON access-log line per request to stdout (lines are written "
           "together, at most 50 ms after the first)", "true|false"),
    Option("log_format", choice(LOG_FORMATS), "json",
           "log line format: json (one object per line) or console (for humans)",
           "|".join(LOG_FORMATS)),
    Option("log_level", choice(LOG_LEVELS), "info",
           "lowest level of diagnostic log lines written", "|".join(LOG_LEVELS)),
    Option("shutdown_timeout", parse_seconds, 10.0,
           "seconds in-flight requests may take to finish after SIGTERM", "SECONDS"),
)
OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    upstream: str
    upstream_kind: str = "auto"
    listen: HostPort = field(default_factory=lambda: parse_host_port("0.0.0.0:11435"))
    admin_listen: HostPort = field(default_factory=lambda: parse_host_port("0.0.0.0:9464"))
    connect_timeout: float = 5.0
    first_byte_timeout: float = 600.0
    idle_timeout: float = 300.0
    models: tuple[str, ...] = ()
    max_models: int = 100
    inventory_interval: float = 30.0
    health_interval: float = 5.0
    api_key_file: str = ""
    max_waiting_per_model: int = 0
    max_body_bytes: int = 64 << 20
    header_timeout: float = 15.0
    client_idle_timeout: float = 60.0
    trusted_proxies: tuple[str, ...] = ()
    pin: tuple[str, ...] = ()
    pin_file: str = ""
    enforce_pins: bool = False
    gpu: str = "auto"
    gpu_interval: float = 2.0
    access_log: bool = True
    log_format: str = "json"
    log_level: str = "info"
    shutdown_timeout: float = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every option on a parser; defaults stay None so we can tell 'not given'."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of settings (keys as the flags, with - or _); env: LLMTAP_CONFIG",
    )
    for option in OPTIONS:
        default = option.default
        if isinstance(default, tuple):
            default = ",".join(default) or "none"
        parser.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.metavar or None,
            action="append" if option.repeatable else "store",
            default=None,
            help=f"{option.help} [env: {option.env}; default: {default}]",
        )


def _load_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of setting: value")
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS_BY_NAME:
            known = ", ".join(option.name.replace("_", "-") for option in OPTIONS)
            raise ConfigError(f"config file {path}: unknown setting {key!r} (known: {known})")
        if isinstance(value, list):
            value = ",".join(str(item) for item in value)
        values[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return values


def resolve(args: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Merge flags (args), environment and the YAML file into Settings; ConfigError if wrong."""
    env = os.environ if env is None else env
    config_path = args.get("config") or env.get("LLMTAP_CONFIG")
    from_file = _load_file(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = args.get(option.name)
        source = option.flag
        if isinstance(raw, list):
            raw = ",".join(raw)
        if raw is None and option.env in env:
            raw, source = env[option.env], option.env
        if raw is None and option.name in from_file:
            raw, source = from_file[option.name], f"{config_path}: {option.name}"
        if raw is None:
            if option.default is None:
                raise ConfigError(
                    f"{option.flag} is required ({option.help.split('(')[0].strip()}); "
                    f"or set {option.env}"
                )
            values[option.name] = option.default
            continue
        try:
            values[option.name] = option.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    settings = Settings(**values)
    settings_pins(settings)  # malformed pins are configuration errors, reported now
    return settings


def settings_pins(settings: Settings) -> dict[str, str]:
    """The pins from --pin and --pin-file (the flag wins for a model in both)."""
    from exporter.upstream import pins

    try:
        found = pins.load_pin_file(settings.pin_file) if settings.pin_file else {}
        found.update(pins.parse_pins(settings.pin))
    except ValueError as exc:
        raise ConfigError(f"--pin/--pin-file: {exc}") from None
    return found
