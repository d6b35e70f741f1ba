"""Wires one sidecar together from Settings: the proxy port, the admin port, the upstream
monitor and the observers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from exporter import runtime
from exporter.admin import create_admin_app
from exporter.auth import ApiKeys
from exporter.config import HostPort, Settings, is_loopback_host, settings_pins
from exporter.gpu import GpuCollector, GpuSampler
from exporter.models import ModelLabels
from exporter.relay.admission import Admission
from exporter.relay.client import UpstreamPool
from exporter.relay.observers import Observer, Observers
from exporter.relay.proxy import Proxy, ProxySettings
from exporter.relay.server import raise_fd_limit
from exporter.relay.upstream import SingleUpstream
from exporter.state import LiveState
from exporter.telemetry.keys import KeyUsage
from exporter.telemetry.logs import AccessLog
from exporter.telemetry.metrics import RequestMetrics
from exporter.telemetry.tracing import Tracing, TracingObserver, tracing_configured
from exporter.upstream.collector import UpstreamCollector
from exporter.upstream.monitor import UpstreamMonitor
from exporter.upstream.supervisor import PollSupervisor
from exporter.upstream.view import LoadTracking

log = structlog.get_logger("llmtap")


class StartupError(RuntimeError):
    """llmtap cannot start (a port is taken, say); the message says why."""


def proxy_settings(settings: Settings) -> ProxySettings:
    return ProxySettings(
        first_byte_timeout=settings.first_byte_timeout, idle_timeout=settings.idle_timeout,
        header_timeout=settings.header_timeout,
        client_idle_timeout=settings.client_idle_timeout,
        max_body_bytes=settings.max_body_bytes, trusted_proxies=settings.trusted_proxies)


class Sidecar:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.live = LiveState()
        self.labels = ModelLabels(settings.models, settings.max_models)
        self.monitor = UpstreamMonitor(
            settings.upstream, settings.upstream_kind, self.labels,
            health_interval=settings.health_interval,
            inventory_interval=settings.inventory_interval,
            pinned=settings_pins(settings), enforce_pins=settings.enforce_pins)
        self.pollers = PollSupervisor(self.monitor.shown_url, self.monitor.sources())
        self.monitor.on_up = self.pollers.poke
        self.labels.on_unknown = lambda: self.pollers.poke("inventory")
        self.monitor.idle = lambda: self.live.totals()[0] == 0
        self.registry.register(UpstreamCollector(self.monitor, self.pollers, self.live))
        self.gpu = GpuSampler(interval=settings.gpu_interval, mode=settings.gpu)
        self.registry.register(GpuCollector(self.gpu))
        self.metrics = RequestMetrics(self.registry, self.live)
        # OTEL_* variables configure tracing; with no endpoint there is no tracer at all.
        try:
            self.tracing = Tracing(self.registry) if tracing_configured() else None
        except ValueError as exc:  # an unsupported OTEL_EXPORTER_OTLP_PROTOCOL, say
            raise StartupError(str(exc)) from None
        pool = UpstreamPool(settings.connect_timeout, on_retry=self.metrics.retries.inc)
        upstream = SingleUpstream(settings.upstream, pool, self.monitor)
        self.proxy = Proxy(upstream, self.labels, self._admission(), self._observers(upstream),
                           proxy_settings(settings))
        self.draining = False  # set at SIGTERM: /readyz answers 503 from then on
        self._admin: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.proxy_address: HostPort | None = None
        self.admin_address: HostPort | None = None

    def _admission(self) -> Admission:
        settings = self.settings
        self.keys, on_rejected = api_keys(settings.api_key_file, "--api-key-file",
                                          self.registry)
        return Admission(settings.max_body_bytes, self.keys, on_rejected, self.monitor,
                         self.live, settings.max_waiting_per_model)

    def _observers(self, upstream: SingleUpstream) -> Observers:
        """In order: load tracking first (it completes a record's load time, which the live
        state and the metrics read), then the live state (the router reads it), the access
        log last."""
        observers: list[Observer] = [LoadTracking(self.monitor.view), self.live]
        if self.tracing is not None:
            observers.append(TracingObserver(self.tracing, upstream.origin.host,
                                             upstream.origin.port))
        observers.append(self.metrics)
        if self.keys is not None:
            observers.append(KeyUsage(self.registry))
        self.access_log = AccessLog() if self.settings.access_log else None
        if self.access_log is not None:
            observers.append(self.access_log)
        return Observers(observers)

    async def start(self) -> None:
        raise_fd_limit()
        listen = self.settings.listen
        try:
            port = await self.proxy.start(listen.host, listen.port)
        except OSError as exc:
            raise StartupError(f"cannot listen on {listen} (--listen): {exc.strerror}") \
                from None
        self.proxy_address = HostPort(listen.host, port)
        warn_if_open(self.keys, self.proxy_address, "the proxy port", "--api-key-file")
        self._admin = web.AppRunner(create_admin_app(self.registry, self.live, self.monitor,
                                                     self.gpu, self.not_ready),
                                    access_log=None)
        self.admin_address = await listen_app(self._admin, self.settings.admin_listen,
                                              " (--admin-listen)")
        # First probe before serving traffic, so the first requests already get the right
        # provider label and model inventory when the upstream is there.
        await self.pollers.poll_all_once()
        # Pollers and the GPU sampler run beside the relay, each failing on its own.
        self.pollers.start()
        self._tasks = [asyncio.create_task(self.gpu.run(), name="gpu-sampler")]
        log.info("llmtap serving", proxy=str(self.proxy_address),
                 admin=str(self.admin_address), upstream=self.monitor.shown_url,
                 kind=self.monitor.kind)

    def not_ready(self) -> str | None:
        """Why /readyz answers 503, None when ready. Ready means the upstream answers its
        health probe and every poller has run since it came up: before that the model
        labels are all `other`, no pin is checked and no cold load can be told."""
        if self.draining:
            return "shutting down"
        if not self.monitor.fresh():
            return "the upstream did not answer its health probe"
        up_since = self.monitor.up_since
        if up_since is None or not self.pollers.polled_since(up_since):
            return "llmtap has not yet read the upstream's state (model list, loaded models)"
        return None

    async def stop(self) -> None:
        """Drain: /readyz says not ready and the proxy stops accepting in the same step (no
        request can slip in between), in-flight requests get --shutdown-timeout seconds to
        finish, then the rest shuts down."""
        self.draining = True
        await self.proxy.stop(self.settings.shutdown_timeout)
        if self.access_log is not None:
            self.access_log.flush()  # the last requests' lines
        if self._admin is not None:
            await self._admin.cleanup()
        await self.pollers.stop()
        await self.monitor.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)


async def serve(settings: Settings) -> None:
    """Run a sidecar until SIGTERM or SIGINT."""
    await runtime.run_until_signalled(lambda: Sidecar(settings), "llmtap")


def api_keys(path: str, option: str, registry: CollectorRegistry
             ) -> tuple[ApiKeys | None, Callable[[], None]]:
    """The keys of a key file (none without one) and what counts a refused key; exports
    llmtap_auth_enabled and llmtap_auth_rejected_total. The sidecar's and the router's."""
    try:
        keys = ApiKeys.load(path) if path else None
    except ValueError as exc:
        raise StartupError(f"{option}: {exc}") from None
    enabled = Gauge("llmtap_auth_enabled", "1 when the proxy port requires an API key",
                    registry=registry)
    enabled.set(1 if keys is not None else 0)
    rejected = Counter("llmtap_auth_rejected", "Requests refused for a missing or wrong API key",
                       registry=registry)
    return keys, rejected.inc


def warn_if_open(keys: ApiKeys | None, address: HostPort, what: str, option: str) -> None:
    if keys is None and not is_loopback_host(address.host):
        log.warning(f"{what} {address} is open to anyone who can reach it: no API keys are "
                    f"configured ({option})")


async def listen_app(runner: web.AppRunner, address: HostPort, what: str = "") -> HostPort:
    """Serve an aiohttp app (the admin port) on `address`; the address really bound."""
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}{what}: {exc.strerror}") from None
    port = runner.addresses[0][1] if runner.addresses else address.port
    return HostPort(address.host, port)
