"""`llmtap route`: the router service. Per request: decide → relay → retry.

Decide: the route for the requested model names a policy and maybe a hybrid rule; the
classifier labels the request light or heavy; the policy ranks the local sidecars from their
polled state plus this router's own counts; a heavy request, or a light one while the best
local expected TTFT is over the route's SLO (with hysteresis), goes to the cloud unless the
request must stay local or the cloud cannot take it (no key, ejected, budget spent, rate
limited): then it queues locally.

Relay: the sidecar's relay (exporter/proxy.py) streams the answer with all its guarantees and
telemetry; this module only supplies its `dispatch` step, which sends to the chosen backend.
Retry: a connect failure, or a 503 before any byte of the answer (Ollama's "server busy",
llmtap's queue limit), goes to the next backend in the ranking; once the relay has the
response head nothing is retried, so no client ever sees bytes from two backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from exporter import __version__, runtime
from exporter import record as rec
from exporter.config import HostPort
from exporter.models import ModelLabels
from exporter.protocols import Endpoint, endpoint_for
from exporter.protocols.base import RequestInfo
from exporter.proxy import Body, Relay, UpstreamFailure
from exporter.record import RequestRecord
from exporter.routing.classifier import (
    HEAVY,
    LIGHT,
    load_classifier,
    prompt_text,
    requested_max_tokens,
    safe_classify,
)
from exporter.routing.config import RouterConfig, RouteSpec
from exporter.routing.metrics import BackendCollector, RouterMetrics
from exporter.routing.policies import POLICIES, Candidate, Policy, RequestTraits, expected_ttft
from exporter.routing.registry import Cloud, Registry, Sidecar
from exporter.routing.translate import (
    OLLAMA_PATHS,
    OllamaFromOpenAI,
    TranslatedResponse,
    ollama_to_openai,
)
from exporter.state import EWMA_ALPHA, LiveState
from exporter.telemetry.exposition import metrics_handler
from exporter.telemetry.metrics import RequestMetrics
from exporter.telemetry.tracing import Tracing, tracing_configured
from exporter.upstream.monitor import UpstreamMonitor

log = structlog.get_logger("llmtap.router")
access = structlog.get_logger("llmtap.router.access")

RESIDENCY_HEADER = "x-llmtap-residency"
# The router has no single upstream: the relay's own target is never used, and the monitor
# it needs for labels is never polled (provider labels fall back to the client's dialect).
NO_UPSTREAM = "http://llmtap-router.invalid"
MAX_ATTEMPTS = 3  # first choice + two retries
MAX_LOGGED_MODEL = 128


@dataclass(slots=True)
class Target:
    backend: str
    model: str  # the name sent there (a hybrid alias becomes the local or cloud model)
    sidecar: Sidecar | None = None
    cloud: Cloud | None = None
    estimate: float | None = None  # expected TTFT, seconds

    def started(self) -> None:
        if self.sidecar is not None:
            self.sidecar.started(self.model)
            self.sidecar.breaker.dispatched()
        elif self.cloud is not None:
            self.cloud.in_flight += 1
            self.cloud.breaker.dispatched()

    def finished(self) -> None:
        if self.sidecar is not None:
            self.sidecar.finished(self.model)
        elif self.cloud is not None:
            self.cloud.in_flight -= 1

    @property
    def breaker(self) -> Any:
        return self.sidecar.breaker if self.sidecar is not None else self.cloud.breaker  # type: ignore[union-attr]


@dataclass(slots=True)
class Decision:
    route: str
    policy: str
    reason: str
    klass: str | None = None  # "light" / "heavy" on hybrid routes
    local_only: bool = False
    targets: list[Target] = field(default_factory=list)
    chosen: Target | None = None
    tried: list[str] = field(default_factory=list)  # backends that failed before the answer
    prompt_chars: int = 0


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        self.backends = Registry(config, on_eject=self._ejected, on_change=self._models_changed,
                                 on_added=self.metrics.backend_known)
        for route in config.routes:  # spills start at 0 too, per hybrid route and its cloud
            if route.hybrid is not None and (cloud := config.cloud_for(route.hybrid.heavy)):
                self.metrics.spills.labels(route.model, cloud.name)
        self._spilling: dict[str, bool] = {}
        self.registry.register(BackendCollector(self.backends, lambda: dict(self._spilling)))
        self.live = LiveState()
        aliases = {r.model for r in config.routes if not any(ch in r.model for ch in "*?[")}
        aliases |= {r.hybrid.light for r in config.routes if r.hybrid is not None}
        aliases |= {a for c in config.cloud for a in c.models}
        self.labels = ModelLabels(tuple(sorted(aliases)))
        self.request_metrics = RequestMetrics(self.registry, self.live)
        self.tracing = Tracing(self.registry) if tracing_configured() else None
        self.classify = load_classifier(config.classifier)
        self.policies: dict[str, Policy] = {}
        self.rng = random.Random()
        self._decisions: dict[int, Decision] = {}
        self.relay = Relay(
            NO_UPSTREAM, UpstreamMonitor(NO_UPSTREAM, "auto", self.labels), self.labels,
            self.live, [self.request_metrics.observe, self.observe],
            connect_timeout=config.connect_timeout,
            first_byte_timeout=config.first_byte_timeout, idle_timeout=config.idle_timeout,
            on_retry=self.request_metrics.retries.inc, tracing=self.tracing,
            dispatch=self.dispatch)
        self._runners: list[web.AppRunner] = []
        self.draining = False
        self.listen_address: HostPort | None = None
        self.admin_address: HostPort | None = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.relay.start()
        await self.backends.start()
        app = web.Application()
        app.router.add_get("/v1/models", self._openai_models)
        app.router.add_get("/api/tags", self._ollama_tags)
        app.router.add_route("*", "/{tail:.*}", self.relay.handle)
        proxy = web.AppRunner(app, handler_cancellation=True, access_log=None)
        admin = web.AppRunner(self._admin_app(), access_log=None)
        self.listen_address = await self._listen(proxy, self.config.listen)
        self.admin_address = await self._listen(admin, self.config.admin_listen)
        log.info("llmtap router serving", listen=str(self.listen_address),
                 admin=str(self.admin_address), sidecars=sorted(self.backends.sidecars),
                 cloud=sorted(self.backends.clouds))
        for cloud in self.backends.clouds.values():
            if not cloud.spec.api_key:
                log.warning("cloud backend has no API key: it will not be used",
                            backend=cloud.name, api_key_env=cloud.spec.api_key_env)

    async def _listen(self, runner: web.AppRunner, address: HostPort) -> HostPort:
        from exporter.server import listen

        self._runners.append(runner)
        return await listen(runner, address)

    async def stop(self) -> None:
        self.draining = True
        for runner in self._runners:
            await runner.cleanup()
        await self.backends.close()
        await self.relay.close()
        if self.tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)

    def _ejected(self, name: str) -> None:
        self.metrics.ejections.labels(name).inc()

    def _models_changed(self) -> None:
        self.labels.set_inventory(sorted(self.backends.known_models))

    def _policy(self, route: RouteSpec) -> Policy:
        # One instance per route: round robin keeps its rotation per route.
        policy = self.policies.get(route.model)
        if policy is None:
            policy = self.policies[route.model] = POLICIES[route.policy]()
        return policy

    # ----------------------------------------------------------------- decide

    def decide(self, path: str, endpoint: Endpoint | None, info: RequestInfo | None,
               body: dict[str, Any] | None, residency_local: bool) -> Decision:
        model = info.model if info is not None else ""
        route = self.config.route_for(model)
        local_only = residency_local or route.residency == "local"
        decision = Decision(route.model, route.policy, "policy", local_only=local_only)
        if endpoint is None:
            return self._passthrough(decision)
        if body is not None:
            decision.prompt_chars = len(prompt_text(body))
        hybrid = route.hybrid
        if hybrid is not None:
            decision.klass = safe_classify(self.classify, body, path) if body is not None \
                else LIGHT
            local_model, cloud_alias = hybrid.light, hybrid.heavy
        else:
            local_model = model
            cloud_alias = model if self.config.cloud_for(model) is not None else ""
        tokens = (info.max_tokens if info is not None and info.max_tokens else None) or \
            (requested_max_tokens(body) if body is not None else None) or \
            self.config.expected_output_tokens
        traits = RequestTraits(model=local_model, expected_output_tokens=tokens)
        sidecars = self.backends.sidecars
        candidates = [c for c in self.backends.candidates(local_model)
                      if c.healthy and c.has_model is not False
                      and _speaks(sidecars[c.backend].kind, endpoint.dialect)]
        ranked = self._policy(route).rank(candidates, traits, self.rng)
        local = [Target(c.backend, local_model, sidecar=self.backends.sidecars[c.backend],
                        estimate=_estimate(c, traits)) for c in ranked]
        # Overload is queueing: a cold load does not count here, or a model that was not
        # resident would see every request spill and never be loaded.
        best = min((_estimate(replace(c, loaded=True), traits) for c in ranked),
                   default=math.inf)
        cloud_target, why_not = self._cloud_target(cloud_alias, path, endpoint, body,
                                                   local_only)
        if hybrid is not None:
            spilling = self._spill_state(route.model, best, hybrid.slo_ttft,
                                         hybrid.hysteresis)
            wants_cloud = decision.klass == HEAVY or spilling or not local
            if wants_cloud and cloud_target is not None:
                decision.reason = "heavy" if decision.klass == HEAVY else \
                    "spill" if local else "no_local"
                decision.targets = [cloud_target, *local]
            else:
                decision.reason = "light" if not wants_cloud else why_not
                decision.targets = local
                if cloud_target is not None:
                    decision.targets.append(cloud_target)  # the local fleet failing: last resort
        elif cloud_target is not None and not any(c.has_model for c in ranked):
            decision.reason = "cloud_model"
            decision.targets = [cloud_target, *local]
        else:
            decision.reason = "policy" if local else why_not if cloud_alias else "no_backend"
            decision.targets = local
        if not decision.targets:
            decision.reason = "no_backend"
        return decision

    def _cloud_target(self, alias: str, path: str, endpoint: Endpoint, body: Any,
                      local_only: bool) -> tuple[Target | None, str]:
        """The cloud target for a model alias, or why there is none (a reason label)."""
        spec = self.config.cloud_for(alias) if alias else None
        if spec is None:
            return None, "no_cloud"
        if local_only:
            return None, "local_only"
        # The cloud speaks OpenAI's API; Ollama's chat and generate are translated.
        if body is None or not (endpoint.dialect == "openai" or path in OLLAMA_PATHS):
            return None, "not_translatable"
        cloud = self.backends.clouds[spec.name]
        if why := cloud.unusable():
            return None, why
        return Target(cloud.name, spec.models[alias], cloud=cloud,
                      estimate=expected_ttft(cloud.candidate(), RequestTraits(alias))), ""

    def _spill_state(self, route: str, best: float, slo: float, hysteresis: float) -> bool:
        """Spill once the best local E[TTFT] passes the SLO; stop only when it is back under
        SLO x (1 - hysteresis), so a fleet hovering at the SLO does not flap."""
        spilling = self._spilling.get(route, False)
        if not spilling and best > slo:
            spilling = True
            log.info("local fleet over its TTFT SLO: spilling to the cloud", route=route,
                     expected_ttft_s=round(best, 3), slo_s=slo)
        elif spilling and best < slo * (1 - hysteresis):
            spilling = False
            log.info("local fleet back under its TTFT SLO", route=route,
                     expected_ttft_s=round(best, 3), slo_s=slo)
        self._spilling[route] = spilling
        return spilling

    def _passthrough(self, decision: Decision) -> Decision:
        """Paths no dialect observes (/api/version, /api/show, ...): any healthy sidecar."""
        decision.reason = "passthrough"
        sidecars = [s for s in self.backends.sidecars.values()
                    if s.breaker.eligible() and s.upstream_up]
        sidecars.sort(key=lambda s: sum(s.in_flight.values()))
        decision.targets = [Target(s.name, "", sidecar=s) for s in sidecars]
        return decision

    # ----------------------------------------------------------------- dispatch (relay hook)

    async def dispatch(self, request: web.Request, record: RequestRecord,
                       headers: CIMultiDict[str], body: Body,
                       replayable: bool) -> aiohttp.ClientResponse:
        started = time.perf_counter()
        endpoint = endpoint_for(request.method, request.path)
        parsed: dict[str, Any] | None = None
        if endpoint is not None and replayable and isinstance(body, bytes) and body:
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(body)
                parsed = obj if isinstance(obj, dict) else None
        residency = request.headers.get(RESIDENCY_HEADER, "").strip().lower() == "local"
        decision = self.decide(request.path, endpoint, record.request_info, parsed, residency)
        self._decisions[id(record)] = decision
        record.overhead += time.perf_counter() - started  # the decision is router overhead
        if not decision.targets:
            raise self._refusal(decision, record.request_model)
        failure: UpstreamFailure | None = None
        targets = decision.targets[:MAX_ATTEMPTS]
        for i, target in enumerate(targets):
            if i and not replayable:
                break  # a streamed body cannot be sent twice
            last = i == len(targets) - 1
            # Counted from now, not from the answer's head: concurrent decisions must see
            # the requests this router has already sent there.
            target.started()
            try:
                response = await self._send(target, request, headers, body, parsed, endpoint,
                                            record)
            except UpstreamFailure as exc:
                target.finished()
                target.breaker.failure()
                if exc.error_type != rec.UPSTREAM_CONNECT:
                    raise  # the request may have reached the backend: never send it twice
                failure = exc
                decision.tried.append(target.backend)
                if not last:
                    self.metrics.retries.labels(target.backend, "connect").inc()
                continue
            except BaseException:  # cancelled (the client left) or a bug: uncount it
                target.finished()
                raise
            status = response.status
            busy = status == 503 or (target.cloud is not None and (status == 429
                                                                   or status >= 500))
            if busy and not last and replayable:
                # Nothing of this answer was relayed: the next backend gets the request.
                response.close()
                target.finished()
                if target.cloud is not None and status != 429:
                    target.breaker.failure()
                decision.tried.append(target.backend)
                self.metrics.retries.labels(target.backend, "busy").inc()
                continue
            decision.chosen = target
            return response
        assert failure is not None
        raise failure

    def _refusal(self, decision: Decision, model: str) -> UpstreamFailure:
        shown = model[:MAX_LOGGED_MODEL]
        if not self.backends.sidecars and not self.backends.clouds:
            return UpstreamFailure("503", 503, "the router has no backends", "no_backend")
        known = any(c.has_model is not False for c in self.backends.candidates(shown))
        if not known and self.config.cloud_for(model) is None and decision.reason != \
                "passthrough":
            return UpstreamFailure("404", 404, f"model {shown!r} is not served by any backend "
                                   "of this router", "model_not_found")
        where = "local backend (the request is local-only)" if decision.local_only else \
            "backend"
        return UpstreamFailure("503", 503, f"no {where} is available for model {shown!r} right "
                               "now (all ejected, down or without fresh state); retry later",
                               "no_backend_available")

    async def _send(self, target: Target, request: web.Request, headers: CIMultiDict[str],
                    body: Body, parsed: dict[str, Any] | None, endpoint: Endpoint | None,
                    record: RequestRecord) -> aiohttp.ClientResponse:
        if target.sidecar is not None:
            if parsed is not None and target.model and parsed.get("model") != target.model:
                # A hybrid alias ("auto") becomes the local model's name.
                body = orjson.dumps({**parsed, "model": target.model})
                headers = headers.copy()
                headers.popall("Content-Length", None)
            return await self.relay.send(target.sidecar.proxy_url + request.raw_path,
                                         request.method, headers, body, True)
        cloud = target.cloud
        assert cloud is not None and parsed is not None and endpoint is not None
        cloud.take()
        out = CIMultiDict({"Authorization": f"Bearer {cloud.spec.api_key}",
                           "Content-Type": "application/json"})
        base = cloud.spec.base_url
        if endpoint.dialect == "ollama":
            translated = ollama_to_openai(request.path, parsed, target.model)
            response = await self.relay.send(base + "/chat/completions", "POST", out,
                                             orjson.dumps(translated), True)
            translator = OllamaFromOpenAI(request.path == "/api/chat",
                                          str(parsed.get("model") or ""),
                                          int(record.arrival * 1e9))
            return TranslatedResponse(response, translator,
                                      bool(translated["stream"]))  # type: ignore[return-value]
        # OpenAI dialect: the same request, the provider's model name, the cloud's key.
        suffix = request.raw_path.removeprefix("/v1")
        return await self.relay.send(base + suffix, request.method, out,
                                     orjson.dumps({**parsed, "model": target.model}), True)

    # ----------------------------------------------------------------- after the answer

    def observe(self, record: RequestRecord) -> None:
        """Sink: runs once per request when it ends (after the request histograms)."""
        decision = self._decisions.pop(id(record), None)
        if decision is None:
            return  # refused before routing (body too large): the request metrics have it
        chosen = decision.chosen
        backend = chosen.backend if chosen is not None else "none"
        self.metrics.decisions.labels(decision.route, backend, decision.policy,
                                      decision.reason).inc()
        if decision.klass is not None:
            self.metrics.classifications.labels(decision.route, decision.klass).inc()
        success = not record.error_type and 200 <= record.status < 300
        ttft = record.ttft
        if chosen is not None:
            chosen.finished()
            broken = record.error_type in (rec.UPSTREAM_RESET, rec.TIMEOUT) or \
                record.status in (502, 504) or (chosen.cloud is not None and
                                                record.status >= 500)
            if broken:
                chosen.breaker.failure()
            elif success:
                chosen.breaker.success()
            if success and ttft is not None:
                self.metrics.actual_ttft.labels(backend).observe(ttft)
                if chosen.estimate is not None:
                    self.metrics.estimated_ttft.labels(backend).observe(chosen.estimate)
                    if chosen.estimate > 0:
                        self.metrics.ttft_ratio.labels(backend).observe(ttft / chosen.estimate)
            if chosen.cloud is not None:
                self._charge(chosen.cloud, record, decision, ttft if success else None)
                if decision.klass == LIGHT or decision.reason in ("spill", "no_local"):
                    self.metrics.spills.labels(decision.route, backend).inc()
        if self.config.access_log:
            access.info(
                "route", method=record.method, path=record.path,
                model=record.request_model[:MAX_LOGGED_MODEL] or None,
                route=decision.route, policy=decision.policy, reason=decision.reason,
                **{"class": decision.klass}, local_only=decision.local_only or None,
                backend=backend, backend_model=chosen.model if chosen is not None else None,
                estimate_ms=_ms(chosen.estimate) if chosen is not None else None,
                alternatives=[t.backend for t in decision.targets[1:4]] or None,
                tried=decision.tried or None, status=record.status,
                error_type=record.error_type or None, stream=record.stream,
                ttft_ms=_ms(ttft), duration_ms=_ms(record.duration),
                tokens_in=record.input_tokens, tokens_out=record.output_token_count)

    def _charge(self, cloud: Cloud, record: RequestRecord, decision: Decision,
                ttft: float | None) -> None:
        # Server-reported tokens where the answer carried usage; else counted content chunks
        # and ~4 characters per prompt token, so the budget is never blind.
        tokens_in = record.input_tokens if record.input_tokens is not None else \
            decision.prompt_chars // 4
        tokens_out = record.output_token_count or 0
        cost = cloud.charge(tokens_in, tokens_out)
        self.metrics.cloud_tokens.labels(cloud.name, "input").inc(tokens_in)
        self.metrics.cloud_tokens.labels(cloud.name, "output").inc(tokens_out)
        self.metrics.cloud_cost.labels(cloud.name).inc(cost)
        if ttft is not None:
            cloud.ttft = ttft if cloud.ttft is None else cloud.ttft + EWMA_ALPHA * (
                ttft - cloud.ttft)

    # ----------------------------------------------------------------- own endpoints

    def model_names(self) -> list[str]:
        names = set(self.backends.known_models)
        names |= {r.model for r in self.config.routes if not any(ch in r.model for ch in "*?[")}
        names |= {a for c in self.config.cloud for a in c.models}
        return sorted(names)

    async def _openai_models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "llmtap"}
                for name in self.model_names()]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                            content_type="application/json")

    async def _ollama_tags(self, request: web.Request) -> web.Response:
        models = [{"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z",
                   "size": 0, "digest": "", "details": {}} for name in self.model_names()]
        return web.Response(body=orjson.dumps({"models": models}),
                            content_type="application/json")

    def _admin_app(self) -> web.Application:
        registry = self.registry

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(request: web.Request) -> web.Response:
            usable = any(s.breaker.eligible() and s.upstream_up
                         for s in self.backends.sidecars.values()) or any(
                not c.unusable() for c in self.backends.clouds.values())
            if self.draining or not usable:
                reason = "shutting down" if self.draining else "no backend is usable"
                return web.json_response({"status": "not ready", "reason": reason}, status=503)
            return web.json_response({"status": "ready"})

        async def state(request: web.Request) -> web.Response:
            body = {"llmtap": {"version": __version__, "role": "router"}, "time": time.time(),
                    **self.backends.describe(),
                    "spilling": dict(self._spilling)}
            return web.Response(body=orjson.dumps(body), content_type="application/json")

        app = web.Application()
        app.router.add_get("/metrics", metrics_handler(registry))
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/llmtap/v1/router", state)
        return app


def _speaks(kind: str | None, dialect: str) -> bool:
    """Can a sidecar's server answer this dialect? Every kind serves OpenAI's API; Ollama's
    and llama.cpp's native APIs only their own servers (unknown kind: let it try)."""
    return kind is None or dialect == "openai" or kind == dialect


def _estimate(candidate: Candidate, traits: RequestTraits) -> float:
    # Stale state counts as saturated: never under an SLO.
    return math.inf if candidate.stale else expected_ttft(candidate, traits)


def _ms(seconds: float | None) -> float | None:
    if seconds is None or math.isinf(seconds):
        return None
    return round(seconds * 1000, 3)


async def route(config: RouterConfig) -> None:
    """Run the router until SIGTERM or SIGINT."""
    await runtime.run_until_signalled(lambda: Router(config), "llmtap router")
