"""`llmtap route`: the router service, put together.

The router is a proxy port like the sidecar's (exporter/relay), with its own Upstream: per
request it decides where to send (routing/decide.py) and tries that plan in order
(routing/upstream.py); its accounting observer settles each request when it ends
(routing/accounting.py). The relay streams every answer with all its guarantees and
telemetry, whichever backend gave it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import orjson
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from exporter import __version__, runtime
from exporter.config import HostPort
from exporter.events import RequestInfo
from exporter.models import ModelLabels
from exporter.protocols import Endpoint
from exporter.relay.admission import Admission
from exporter.relay.client import UpstreamPool
from exporter.relay.observers import Observer, Observers
from exporter.relay.proxy import Proxy, ProxySettings
from exporter.routing.accounting import RouterAccounting
from exporter.routing.config import RouterConfig
from exporter.routing.decide import Decider, Decision
from exporter.routing.ledger import Ledger, MemoryLedger
from exporter.routing.metrics import BackendCollector, RouterMetrics
from exporter.routing.registry import Registry
from exporter.routing.shared import RedisLedger
from exporter.routing.shared_counts import SharedInFlight
from exporter.routing.spend import ANY_KEY, KeyLimits
from exporter.routing.upstream import RoutedUpstream
from exporter.state import LiveState
from exporter.telemetry.exposition import metrics_handler
from exporter.telemetry.keys import KeyUsage
from exporter.telemetry.metrics import RequestMetrics
from exporter.telemetry.tracing import Tracing, TracingObserver, tracing_configured

log = structlog.get_logger("llmtap.router")


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        admission = self._admission()
        self.ledger, board = self._ledger()
        self.backends = Registry(config, on_eject=self._ejected, on_change=self._models_changed,
                                 on_added=self.metrics.backend_known, ledger=self.ledger,
                                 board=board, shared=None if board is None else
                                 functools.partial(SharedInFlight, board))
        self.limits = KeyLimits(config.key_limits, self.ledger)
        for route in config.routes:  # spills start at 0 too, per hybrid route and its cloud
            if route.hybrid is not None and (cloud := config.cloud_for(route.hybrid.heavy)):
                self.metrics.spills.labels(route.model, cloud.name)
        self.decider = Decider(config, self.backends, self.limits)
        self.registry.register(BackendCollector(
            self.backends, lambda: dict(self.decider.spilling), self.limits,
            self.keys.names() if self.keys is not None else (),
            (lambda: board.up) if board is not None else None))
        self.live = LiveState()
        aliases = {r.model for r in config.routes if not any(ch in r.model for ch in "*?[")}
        aliases |= {r.hybrid.light for r in config.routes if r.hybrid is not None}
        aliases |= {a for c in config.cloud for a in c.models}
        self.labels = ModelLabels(tuple(sorted(aliases)))
        self.request_metrics = RequestMetrics(self.registry, self.live)
        self.tracing = Tracing(self.registry) if tracing_configured() else None
        pool = UpstreamPool(config.connect_timeout, on_retry=self.request_metrics.retries.inc)
        upstream = RoutedUpstream(self.decider, pool, self.metrics, self.model_names,
                                  config.attempt_timeout)
        self.proxy = Proxy(upstream, self.labels, admission, self._observers(),
                           ProxySettings(first_byte_timeout=config.first_byte_timeout,
                                         idle_timeout=config.idle_timeout))
        self._admin: web.AppRunner | None = None
        self.draining = False
        self.listen_address: HostPort | None = None
        self.admin_address: HostPort | None = None

    def _admission(self) -> Admission:
        """Client keys, as the sidecar checks them (and strips them before forwarding)."""
        from exporter.server import StartupError, api_keys

        self.keys, on_rejected = api_keys(self.config.api_key_file, "api_key_file",
                                          self.registry)
        names = set(self.keys.names()) if self.keys is not None else set()
        for name in self.config.key_limits:
            if name != ANY_KEY and name not in names:
                raise StartupError(f"key_limits: {name!r} is no key name in api_key_file "
                                   f"(its names: {', '.join(sorted(names))})")
        return Admission(keys=self.keys, on_rejected=on_rejected)

    def _ledger(self) -> tuple[Ledger, RedisLedger | None]:
        """Spend and rate limits in memory (one replica), or shared in Redis."""
        spec = self.config.shared_state
        if spec is None:
            return MemoryLedger(), None
        errors = Counter("llmtap_router_shared_state_errors",
                         "Calls to the shared state (Redis) that failed", registry=self.registry)
        shared = RedisLedger(spec.redis_url, spec.prefix, spec.refresh_interval,
                             on_error=errors.inc)
        return shared, shared

    def _observers(self) -> Observers:
        observers: list[Observer] = [self.live]
        if self.tracing is not None:
            observers.append(TracingObserver(self.tracing))
        observers.append(self.request_metrics)
        if self.keys is not None:
            observers.append(KeyUsage(self.registry))
        observers.append(RouterAccounting(self.metrics, self.config.access_log))
        return Observers(observers)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        from exporter.server import StartupError, listen_app, warn_if_open

        await self.ledger.start()
        await self.backends.start()
        listen = self.config.listen
        try:
            port = await self.proxy.start(listen.host, listen.port)
        except OSError as exc:
            raise StartupError(f"cannot listen on {listen}: {exc.strerror}") from None
        self.listen_address = HostPort(listen.host, port)
        self._admin = web.AppRunner(self._admin_app(), access_log=None)
        self.admin_address = await listen_app(self._admin, self.config.admin_listen)
        log.info("llmtap router serving", listen=str(self.listen_address),
                 admin=str(self.admin_address), sidecars=sorted(self.backends.sidecars),
                 cloud=sorted(self.backends.clouds))
        warn_if_open(self.keys, self.listen_address, "the router port", "api_key_file")
        for cloud in self.backends.clouds.values():
            if not cloud.spec.api_key:
                log.warning("cloud backend has no API key: it will not be used",
                            backend=cloud.name, api_key_env=cloud.spec.api_key_env)

    async def stop(self) -> None:
        self.draining = True
        await self.proxy.stop(10.0)
        if self._admin is not None:
            await self._admin.cleanup()
        await self.backends.close()
        await self.ledger.close()
        await self.decider.classifier.close()
        if self.tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)

    def _ejected(self, name: str) -> None:
        self.metrics.ejections.labels(name).inc()

    def _models_changed(self) -> None:
        self.labels.set_inventory(sorted(self.backends.known_models))

    def decide(self, path: str, endpoint: Endpoint | None, info: RequestInfo | None,
               body: dict[str, Any] | None, residency_local: bool) -> Decision:
        return self.decider.decide(path, endpoint, info, body, residency_local)

    # ----------------------------------------------------------------- own endpoints

    def model_names(self) -> list[str]:
        names = set(self.backends.known_models)
        names |= {r.model for r in self.config.routes if not any(ch in r.model for ch in "*?[")}
        names |= {a for c in self.config.cloud for a in c.models}
        return sorted(names)

    def _keys_left(self) -> dict[str, float | None]:
        """Each client key's daily cloud budget left (keys with a budget)."""
        names = self.keys.names() if self.keys is not None else []
        return {name: self.limits.budget_left(name) for name in self.limits.with_budgets(names)}

    def _admin_app(self) -> web.Application:
        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(request: web.Request) -> web.Response:
            # Ready = alive with a valid config, whatever the fleet: were it 503 while the
            # fleet is down, Kubernetes would take every router pod out of its Service and
            # clients would get connection errors instead of the router's clear 503. The
            # fleet's state is in /llmtap/v1/router and the metrics.
            if self.draining:
                return web.json_response({"status": "not ready", "reason": "shutting down"},
                                         status=503)
            usable = any(s.breaker.eligible() and s.upstream_up
                         for s in self.backends.sidecars.values()) or any(
                not c.unusable() for c in self.backends.clouds.values())
            return web.json_response({"status": "ready", "backends_usable": usable})

        async def state(request: web.Request) -> web.Response:
            body = {"llmtap": {"version": __version__, "role": "router"}, "time": time.time(),
                    **self.backends.describe(), "spilling": dict(self.decider.spilling),
                    "keys": self._keys_left()}
            return web.Response(body=orjson.dumps(body), content_type="application/json")

        app = web.Application()
        app.router.add_get("/metrics", metrics_handler(self.registry))
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/llmtap/v1/router", state)
        return app


async def route(config: RouterConfig) -> None:
    """Run the router until SIGTERM or SIGINT."""
    await runtime.run_until_signalled(lambda: Router(config), "llmtap router")
