"""`llmtap route --config router.yaml`: the router's YAML file, read into frozen dataclasses.

Every key is checked here, once, at startup: an unknown key, a wrong type or a reference to
something that does not exist (a policy, a cloud model alias) is a ConfigError naming the key
by its path (`routes[1].hybrid.slo_ttft`), so a typo never turns into a silent default.
docs/routing.md lists every key.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    HostPort,
    parse_host_port,
    parse_upstream,
)
from exporter.routing.keep_local import DETECTORS
from exporter.routing.policies import DEFAULT_POLICY, POLICIES

RESIDENCIES = ("any", "local")
FALLBACKS = ("light", "heavy")
TARGETS = ("threshold", "cloud_share", "quality")  # how a route says where heavy begins
BUDGET_PERIODS = ("day", "total")


@dataclass(frozen=True)
class SidecarSpec:
    """One llmtap sidecar: where clients' requests go and where its state is read."""

    name: str
    proxy_url: str
    admin_url: str
    parallel: int | None = None  # requests its server runs at once per model; None: ask it
    # Other names its llama-server answers to: llama-server serves its one model whatever
    # name a request gives, so the router sends it only its own name(s) and these.
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class DnsSpec:
    """Sidecars found by resolving a name (a Kubernetes headless service): one per address."""

    dns: str
    proxy_port: int = 11435
    admin_port: int = 9464
    refresh_interval: float = 10.0
    scheme: str = "http"
    parallel: int | None = None


@dataclass(frozen=True)
class CloudSpec:
    name: str
    base_url: str  # OpenAI-compatible, with its version prefix: https://api.openai.com/v1
    api_key_env: str
    models: Mapping[str, str]  # alias clients (and routes) use -> the provider's model name
    price_per_input_token: float = 0.0
    price_per_output_token: float = 0.0
    budget: float | None = None  # currency units per budget_period; None: no limit
    budget_period: str = "day"  # "day" (resets at 00:00 UTC) or "total" (since start)
    rate_limit: float | None = None  # requests per second; None: no limit
    expected_ttft: float = 1.0  # seconds, the estimate used before any answer was measured
    # What a request without max_tokens reserves of the budgets, in output tokens.
    max_output_tokens: int = 4096

    @property
    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "")


@dataclass(frozen=True)
class KeyLimitSpec:
    """One client key's limits (a name from api_key_file, or "*" for every other key)."""

    budget: float | None = None  # cloud spend per UTC day, currency units; None: no limit
    rate_limit: float | None = None  # requests per second through the router; None: none


@dataclass(frozen=True)
class SharedStateSpec:
    """Spend, rate limits, ejections and in-flight counts shared by router replicas, in
    Redis."""

    redis_url: str
    prefix: str = "llmtap"  # key prefix: one Redis can serve several router fleets
    refresh_interval: float = 1.0  # seconds between reads of budgets and ejections (and
    # rewrites of this replica's in-flight counts)


@dataclass(frozen=True)
class Target:
    """Where the learned model's heavy begins, said one of three ways (exactly one is set):
    `threshold`, a raw p(heavy); `cloud_share`, the share of requests to send to the cloud;
    `quality`, the quality to reach (local answers right + cloud answers, over all). The last
    two become a threshold at load time, from the calibration the model file carries."""

    kind: str  # one of TARGETS
    value: float


@dataclass(frozen=True)
class HybridSpec:
    light: str  # local model for light requests
    heavy: str  # cloud model alias (a key of some cloud's `models`) for heavy ones
    slo_ttft: float = 2.0  # spill light requests to `heavy` when the best local E[TTFT] exceeds it
    hysteresis: float = 0.25  # stop spilling only once E[TTFT] < slo_ttft x (1 - hysteresis)
    fallback: str = "light"  # the class when the learned model or plugin fails or is late
    target: Target | None = None  # this route's heavy/light cut; None: the classifier's


@dataclass(frozen=True)
class RouteSpec:
    model: str  # exact model name or a glob ("*", "llama*")
    policy: str = DEFAULT_POLICY
    hybrid: HybridSpec | None = None
    residency: str = "any"  # "local": never leaves the local fleet

    def matches(self, model: str) -> bool:
        return self.model == model or fnmatch.fnmatchcase(model, self.model)


@dataclass(frozen=True)
class ClassifierSpec:
    """Light or heavy: the rules' thresholds, then a learned model or a plugin."""

    plugin: str = ""  # "package.module:callable" (or package.module.callable)
    model: str = ""  # "builtin" (shipped) or a model file from `llmtap classifier train`
    target: Target | None = None  # where heavy begins (Target); None: the model's own
    deadline: float = 0.05  # seconds the model or plugin may take; then the route's fallback
    embeddings_url: str = ""  # a model trained on a server's embeddings: its endpoint
    embeddings_model: str = ""
    rules: bool = True  # the rules first (they settle code and reasoning requests)
    long_prompt_chars: int = 8000
    heavy_max_tokens: int | None = None  # off: a max_tokens cap is not a need (rules.py)
    code_markers: bool = True
    reasoning_markers: bool = True


@dataclass(frozen=True)
class BreakerSpec:
    failures: int = 3  # consecutive failed requests or polls that eject a backend
    cooldown: float = 5.0  # seconds ejected before a probe; doubles per failed probe
    max_cooldown: float = 60.0
    probe_timeout: float = 30.0  # a half-open probe with no answer by then has failed


@dataclass(frozen=True)
class RouterConfig:
    listen: HostPort = field(default_factory=lambda: parse_host_port("0.0.0.0:8080"))
    admin_listen: HostPort = field(default_factory=lambda: parse_host_port("0.0.0.0:9465"))
    poll_interval: float = 0.5
    stale_after: float = 1.5
    backends: tuple[SidecarSpec, ...] = ()
    dns: tuple[DnsSpec, ...] = ()
    cloud: tuple[CloudSpec, ...] = ()
    routes: tuple[RouteSpec, ...] = ()
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    keep_local: tuple[str, ...] = DETECTORS  # the keep-local gate's detectors (keep_local.py)
    breaker: BreakerSpec = field(default_factory=BreakerSpec)
    expected_output_tokens: int = 256
    connect_timeout: float = 5.0
    first_byte_timeout: float = 600.0
    # One backend's time to its answer's head, before the router tries the next: a hung
    # backend fails over instead of holding the request for the whole first_byte_timeout.
    attempt_timeout: float = 120.0
    idle_timeout: float = 300.0
    access_log: bool = True
    log_level: str = "info"
    log_format: str = "json"
    # Client keys, in the sidecar's key-file format (exporter/auth.py); "" : none.
    api_key_file: str = ""
    # Without keys, a router with a cloud backend lets anyone who can reach it spend the
    # cloud budget: it refuses to start unless this says that is meant.
    allow_unauthenticated_cloud: bool = False
    key_limits: Mapping[str, KeyLimitSpec] = field(default_factory=dict)
    shared_state: SharedStateSpec | None = None  # None: each replica keeps its own

    def route_for(self, model: str) -> RouteSpec:
        """Exact names win over globs; globs are tried in file order; nothing: the default."""
        for route in self.routes:
            if route.model == model:
                return route
        for route in self.routes:
            if route.matches(model):
                return route
        return DEFAULT_ROUTE

    def cloud_for(self, alias: str) -> CloudSpec | None:
        for cloud in self.cloud:
            if alias in cloud.models:
                return cloud
        return None


DEFAULT_ROUTE = RouteSpec(model="*")


# --------------------------------------------------------------------------- reading


class _Section:
    """One mapping of the file, read key by key; `done()` rejects keys nobody asked for."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where or 'the config'}: expected a mapping, got "
                              f"{type(raw).__name__}")
        self.raw = raw
        self.where = where
        self.seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise ConfigError(f"{self.path(key)} is required")
            return default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.path(key)}: expected {names}, got {value!r}")
        return value

    def positive(self, key: str, default: float | None, allow_zero: bool = False) -> Any:
        value = self.get(key, float, default)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"{self.path(key)}: expected a number > 0, got {value!r}")
        return value

    def count(self, key: str, default: int | None, minimum: int = 1) -> Any:
        value = self.get(key, int, default)
        if value is not None and value < minimum:
            raise ConfigError(f"{self.path(key)}: expected a whole number ≥ {minimum}, "
                              f"got {value!r}")
        return value

    def url(self, key: str, required: bool = True) -> str:
        text = self.get(key, str, required=required)
        try:
            return parse_upstream(text)
        except ValueError as exc:
            raise ConfigError(f"{self.path(key)}: {exc}") from None

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise ConfigError(f"{self.path(key)}: expected one of {', '.join(options)}, "
                              f"got {value!r}")
        return str(value)

    def host_port(self, key: str, default: str) -> HostPort:
        text = self.get(key, (str, int), default)
        try:
            return parse_host_port(str(text) if not isinstance(text, int) else f":{text}")
        except ValueError as exc:
            raise ConfigError(f"{self.path(key)}: {exc}") from None

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen, key=str)
        if unknown:
            raise ConfigError(f"{self.path(str(unknown[0]))}: unknown key (known here: "
                              f"{', '.join(sorted(self.seen))})")


def _items(section: _Section, key: str) -> list[tuple[Any, str]]:
    items = section.get(key, list, [])
    return [(item, f"{section.path(key)}[{i}]") for i, item in enumerate(items)]


def _backend(raw: Any, where: str) -> SidecarSpec | DnsSpec:
    s = _Section(raw, where)
    if "dns" in s.raw:
        spec: SidecarSpec | DnsSpec = DnsSpec(
            dns=s.get("dns", str, required=True),
            proxy_port=s.count("proxy_port", 11435), admin_port=s.count("admin_port", 9464),
            refresh_interval=s.positive("refresh_interval", 10.0),
            scheme=s.choice("scheme", ("http", "https"), "http"),
            parallel=s.count("parallel", None))
    else:
        spec = SidecarSpec(name=s.get("name", str, required=True),
                           proxy_url=s.url("proxy_url"), admin_url=s.url("admin_url"),
                           parallel=s.count("parallel", None),
                           aliases=tuple(str(alias) for alias in s.get("aliases", list, [])))
    s.done()
    return spec


def _cloud(raw: Any, where: str) -> CloudSpec:
    s = _Section(raw, where)
    models = s.get("models", dict, required=True)
    if not models or not all(isinstance(k, str) and isinstance(v, str)
                             for k, v in models.items()):
        raise ConfigError(f"{s.path('models')}: expected a non-empty mapping of alias: "
                          "provider model name")
    spec = CloudSpec(
        name=s.get("name", str, required=True), base_url=s.url("base_url"),
        api_key_env=s.get("api_key_env", str, required=True), models=dict(models),
        price_per_input_token=s.positive("price_per_input_token", 0.0, allow_zero=True),
        price_per_output_token=s.positive("price_per_output_token", 0.0, allow_zero=True),
        budget=s.positive("budget", None, allow_zero=True),
        budget_period=s.choice("budget_period", BUDGET_PERIODS, "day"),
        rate_limit=s.positive("rate_limit", None),
        expected_ttft=s.positive("expected_ttft", 1.0),
        max_output_tokens=s.count("max_output_tokens", 4096))
    s.done()
    return spec


def _route(raw: Any, where: str) -> RouteSpec:
    s = _Section(raw, where)
    policy = s.get("policy", str, DEFAULT_POLICY)
    if policy not in POLICIES:
        raise ConfigError(f"{s.path('policy')}: unknown policy {policy!r} (known: "
                          f"{', '.join(sorted(POLICIES))})")
    hybrid = None
    if (raw_hybrid := s.get("hybrid", dict)) is not None:
        h = _Section(raw_hybrid, s.path("hybrid"))
        hysteresis = h.positive("hysteresis", 0.25, allow_zero=True)
        if hysteresis >= 1:
            raise ConfigError(f"{h.path('hysteresis')}: expected a fraction in [0, 1), "
                              f"got {hysteresis!r}")
        hybrid = HybridSpec(light=h.get("light", str, required=True),
                            heavy=h.get("heavy", str, required=True),
                            slo_ttft=h.positive("slo_ttft", 2.0), hysteresis=hysteresis,
                            fallback=h.choice("fallback", FALLBACKS, "light"),
                            target=_target(h))
        h.done()
    spec = RouteSpec(model=s.get("model", str, required=True), policy=policy, hybrid=hybrid,
                     residency=s.choice("residency", RESIDENCIES, "any"))
    s.done()
    return spec


def _key_limits(s: _Section) -> dict[str, KeyLimitSpec]:
    raw = s.get("key_limits", dict, {})
    limits: dict[str, KeyLimitSpec] = {}
    for name, item in raw.items():
        k = _Section(item, f"key_limits.{name}")
        limits[str(name)] = KeyLimitSpec(budget=k.positive("budget", None, allow_zero=True),
                                         rate_limit=k.positive("rate_limit", None))
        k.done()
    return limits


def _shared_state(s: _Section) -> SharedStateSpec | None:
    raw = s.get("shared_state", dict)
    if raw is None:
        return None
    r = _Section(raw, "shared_state")
    url = r.get("redis_url", str, required=True)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"shared_state.redis_url: expected redis://host:port/db, "
                          f"rediss://... or unix://..., got {url!r}")
    spec = SharedStateSpec(redis_url=url, prefix=r.get("prefix", str, "llmtap"),
                           refresh_interval=r.positive("refresh_interval", 1.0))
    r.done()
    return spec


def _target(s: _Section) -> Target | None:
    """At most one of threshold, cloud_share, quality: each a number in [0, 1]."""
    given = [(kind, s.get(kind, float)) for kind in TARGETS]
    given = [(kind, value) for kind, value in given if value is not None]
    if len(given) > 1:
        raise ConfigError(f"{s.where}: {' and '.join(k for k, _ in given)} are ways to say "
                          "one thing (where heavy begins); set one of "
                          f"{', '.join(TARGETS)}")
    if not given:
        return None
    kind, value = given[0]
    if not 0 <= value <= 1:
        what = {"threshold": "a probability", "cloud_share": "a share of requests",
                "quality": "a quality (share of requests answered right)"}[kind]
        raise ConfigError(f"{s.path(kind)}: expected {what} in [0, 1], got {value!r}")
    return Target(kind, value)


def _classifier(s: _Section) -> ClassifierSpec:
    raw = s.get("classifier", dict)
    if raw is None:
        return ClassifierSpec()
    c = _Section(raw, "classifier")
    embeddings_url, embeddings_model = "", ""
    if (raw_emb := c.get("embeddings", dict)) is not None:
        e = _Section(raw_emb, "classifier.embeddings")
        embeddings_url = e.url("url")
        embeddings_model = e.get("model", str, "")
        e.done()
    spec = ClassifierSpec(
        plugin=c.get("plugin", str, ""), model=c.get("model", str, ""), target=_target(c),
        deadline=c.positive("deadline", 0.05), embeddings_url=embeddings_url,
        embeddings_model=embeddings_model, rules=c.get("rules", bool, True),
        long_prompt_chars=c.count("long_prompt_chars", 8000),
        heavy_max_tokens=c.count("heavy_max_tokens", None),
        code_markers=c.get("code_markers", bool, True),
        reasoning_markers=c.get("reasoning_markers", bool, True))
    c.done()
    if spec.plugin and spec.model:
        raise ConfigError("classifier: plugin and model are two ways to do one thing; set one")
    return spec


def _check_targets(classifier: ClassifierSpec, routes: tuple[RouteSpec, ...]) -> None:
    """A cloud_share or quality target needs a model's calibration: a plugin has none."""
    targets = [("classifier", classifier.target)] + [
        (f"routes[{i}].hybrid", r.hybrid.target) for i, r in enumerate(routes)
        if r.hybrid is not None]
    for where, target in targets:
        if target is None or target.kind == "threshold":
            continue
        if not classifier.model:
            why = "a plugin's p(heavy) has none" if classifier.plugin else \
                "no classifier.model is set"
            raise ConfigError(f"{where}.{target.kind}: a {target.kind} target is turned into "
                              f"a threshold with the learned model's calibration, and {why} "
                              "(set classifier.model, or give a threshold)")


def _keep_local(s: _Section) -> tuple[str, ...]:
    raw = s.get("keep_local", list, list(DETECTORS))
    unknown = [d for d in raw if d not in DETECTORS]
    if unknown:
        raise ConfigError(f"keep_local: unknown detector {unknown[0]!r} (known: "
                          f"{', '.join(DETECTORS)})")
    return tuple(str(d) for d in raw)


def parse_config(raw: Any) -> RouterConfig:
    s = _Section(raw if raw is not None else {}, "")
    poll = s.positive("poll_interval", 0.5)
    backends: list[SidecarSpec] = []
    dns: list[DnsSpec] = []
    for item, where in _items(s, "backends"):
        spec = _backend(item, where)
        (dns if isinstance(spec, DnsSpec) else backends).append(spec)  # type: ignore[arg-type]
    names = [b.name for b in backends]
    clouds = tuple(_cloud(item, where) for item, where in _items(s, "cloud"))
    names += [c.name for c in clouds]
    if (dup := next((n for n in names if names.count(n) > 1), None)) is not None:
        raise ConfigError(f"backend name {dup!r} is used twice (backends and cloud share names)")
    routes = tuple(_route(item, where) for item, where in _items(s, "routes"))
    aliases = {alias for cloud in clouds for alias in cloud.models}
    for i, route in enumerate(routes):
        if route.hybrid is not None and route.hybrid.heavy not in aliases:
            raise ConfigError(f"routes[{i}].hybrid.heavy: {route.hybrid.heavy!r} is no cloud "
                              f"model alias (the `models` keys under `cloud`: "
                              f"{', '.join(sorted(aliases)) or 'none configured'})")
    classifier = _classifier(s)
    _check_targets(classifier, routes)
    breaker = BreakerSpec()
    if (raw_breaker := s.get("breaker", dict)) is not None:
        b = _Section(raw_breaker, "breaker")
        breaker = BreakerSpec(failures=b.count("failures", 3),
                              cooldown=b.positive("cooldown", 5.0),
                              max_cooldown=b.positive("max_cooldown", 60.0),
                              probe_timeout=b.positive("probe_timeout", 30.0))
        b.done()
    config = RouterConfig(
        listen=s.host_port("listen", "0.0.0.0:8080"),
        admin_listen=s.host_port("admin_listen", "0.0.0.0:9465"),
        poll_interval=poll,
        stale_after=s.positive("stale_after", 3 * poll),
        backends=tuple(backends), dns=tuple(dns), cloud=clouds, routes=routes,
        classifier=classifier, keep_local=_keep_local(s), breaker=breaker,
        expected_output_tokens=s.count("expected_output_tokens", 256),
        connect_timeout=s.positive("connect_timeout", 5.0),
        first_byte_timeout=s.positive("first_byte_timeout", 600.0),
        attempt_timeout=s.positive("attempt_timeout", 120.0),
        idle_timeout=s.positive("idle_timeout", 300.0),
        access_log=s.get("access_log", bool, True),
        log_level=s.choice("log_level", LOG_LEVELS, "info"),
        log_format=s.choice("log_format", LOG_FORMATS, "json"),
        api_key_file=s.get("api_key_file", str, ""),
        allow_unauthenticated_cloud=s.get("allow_unauthenticated_cloud", bool, False),
        key_limits=_key_limits(s), shared_state=_shared_state(s))
    s.done()
    if config.key_limits and not config.api_key_file:
        raise ConfigError("key_limits: limits per client key need api_key_file (the key "
                          "names come from it)")
    if not backends and not dns and not clouds:
        raise ConfigError("backends: at least one backend (or cloud) is required")
    if clouds and not config.api_key_file and not config.allow_unauthenticated_cloud:
        raise ConfigError(
            "cloud: without api_key_file anyone who can reach the router can spend the cloud "
            "budget; set api_key_file (the sidecar's key-file format), or "
            "allow_unauthenticated_cloud: true if that is what you mean")
    return config


def load_config(path: str | Path) -> RouterConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read router config {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"router config {path} is not valid YAML: {exc}") from None
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
