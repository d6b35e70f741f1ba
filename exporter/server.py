"""Wires one sidecar together from Settings: relay, admin port, upstream monitor, sinks."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from exporter import runtime
from exporter.admin import create_admin_app
from exporter.auth import ApiKeys
from exporter.config import HostPort, Settings, settings_pins
from exporter.gpu import GpuCollector, GpuSampler
from exporter.models import ModelLabels
from exporter.proxy import Relay
from exporter.state import LiveState
from exporter.telemetry.logs import AccessLog
from exporter.telemetry.metrics import RequestMetrics
from exporter.telemetry.tracing import Tracing, tracing_configured
from exporter.upstream.collector import UpstreamCollector
from exporter.upstream.monitor import UpstreamMonitor

log = structlog.get_logger("llmtap")


class StartupError(RuntimeError):
    """llmtap cannot start (a port is taken, say); the message says why."""


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
        self.registry.register(UpstreamCollector(self.monitor))
        self.gpu = GpuSampler(interval=settings.gpu_interval, mode=settings.gpu)
        self.registry.register(GpuCollector(self.gpu))
        self.metrics = RequestMetrics(self.registry, self.live)
        try:
            self.keys = ApiKeys.load(settings.api_key_file) if settings.api_key_file else None
        except ValueError as exc:
            raise StartupError(f"--api-key-file: {exc}") from None
        auth = Gauge("llmtap_auth_enabled", "1 when the proxy port requires an API key",
                     registry=self.registry)
        auth.set(1 if self.keys is not None else 0)
        rejected = Counter("llmtap_auth_rejected",
                           "Requests refused for a missing or wrong API key",
                           registry=self.registry)
        sinks = [self.metrics.observe]
        if settings.access_log:
            sinks.append(AccessLog().observe)
        # OTEL_* variables configure tracing; with no endpoint there is no tracer at all.
        try:
            self.tracing = Tracing(self.registry) if tracing_configured() else None
        except ValueError as exc:  # an unsupported OTEL_EXPORTER_OTLP_PROTOCOL, say
            raise StartupError(str(exc)) from None
        self.relay = Relay(
            settings.upstream, self.monitor, self.labels, self.live, sinks,
            connect_timeout=settings.connect_timeout,
            first_byte_timeout=settings.first_byte_timeout,
            idle_timeout=settings.idle_timeout,
            on_retry=self.metrics.retries.inc, tracing=self.tracing, keys=self.keys,
            on_rejected=rejected.inc, max_waiting_per_model=settings.max_waiting_per_model,
            max_body_bytes=settings.max_body_bytes)
        self.draining = False  # set at SIGTERM: /readyz answers 503 from then on
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.proxy_address: HostPort | None = None
        self.admin_address: HostPort | None = None

    async def start(self) -> None:
        await self.relay.start()
        proxy_app = web.Application()
        proxy_app.router.add_route("*", "/{tail:.*}", self.relay.handle)
        # handler_cancellation: a client that disconnects cancels its handler at once, also
        # while llmtap waits for the upstream's first byte, which closes the upstream request.
        # keepalive_timeout runs from the moment a connection opens, and a connection whose
        # request head is still incomplete when it fires is closed: that is the slowloris
        # deadline (aiohttp has no separate header timeout).
        proxy = web.AppRunner(proxy_app, handler_cancellation=True, access_log=None,
                              shutdown_timeout=self.settings.shutdown_timeout,
                              keepalive_timeout=self.settings.header_timeout)
        admin = web.AppRunner(create_admin_app(self.registry, self.live, self.monitor, self.gpu,
                                               lambda: self.draining),
                              access_log=None)
        self.proxy_address = await self._listen(proxy, self.settings.listen, "--listen")
        if self.keys is None and not _loopback(self.settings.listen.host):
            log.warning(f"the proxy port {self.proxy_address} is open to anyone who can reach "
                        "it: no API keys are configured (--api-key-file)")
        self.admin_address = await self._listen(admin, self.settings.admin_listen,
                                                "--admin-listen")
        # First probe before serving traffic, so the first requests already get the right
        # provider label and model inventory when the upstream is there.
        await self.monitor.poll_once()
        # Pollers and the GPU sampler run beside the relay, each failing on its own.
        self._tasks = [asyncio.create_task(self.monitor.run(), name="upstream-monitor"),
                       asyncio.create_task(self.gpu.run(), name="gpu-sampler")]
        log.info("llmtap serving", proxy=str(self.proxy_address),
                 admin=str(self.admin_address), upstream=self.settings.upstream,
                 kind=self.monitor.kind)

    async def _listen(self, runner: web.AppRunner, address: HostPort, flag: str) -> HostPort:
        self._runners.append(runner)
        return await listen(runner, address, f" ({flag})")

    async def stop(self) -> None:
        """Drain: /readyz says not ready and the proxy stops accepting in the same step (no
        request can slip in between), in-flight requests get --shutdown-timeout seconds to
        finish, then the rest shuts down."""
        self.draining = True
        for runner in self._runners:  # the proxy's first: it closes its listener at once
            await runner.cleanup()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.relay.close()
        if self.tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)


async def serve(settings: Settings) -> None:
    """Run a sidecar until SIGTERM or SIGINT."""
    await runtime.run_until_signalled(lambda: Sidecar(settings), "llmtap")


async def listen(runner: web.AppRunner, address: HostPort, what: str = "") -> HostPort:
    """Serve `runner` on `address`; the address really bound (port 0 becomes the kernel's)."""
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}{what}: {exc.strerror}") from None
    port = runner.addresses[0][1] if runner.addresses else address.port
    return HostPort(address.host, port)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
