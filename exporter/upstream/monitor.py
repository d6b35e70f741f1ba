"""Upstream kind detection, health and model inventory, polled off the request path.

Detection (`--upstream-kind auto`): `/api/version` answering JSON with a version → ollama;
`/props` answering JSON → llama.cpp; anything else that answers → openai. The health probe
drives `/readyz` and `llmtap_upstream_up`; the inventory feeds the model-label allow-list.
Each poll has its own short timeout on its own client session, so a hanging upstream never
holds the relay, and failures are logged once per change of state, not once per tick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter.models import ModelLabels

log = structlog.get_logger("llmtap.upstream")

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5, sock_connect=2)
HEALTH_PATH = {"ollama": "/api/version", "llama.cpp": "/health", "openai": "/v1/models"}


class UpstreamMonitor:
    def __init__(self, url: str, kind: str, labels: ModelLabels,
                 health_interval: float = 5.0, inventory_interval: float = 30.0) -> None:
        self.url = url
        self.kind: str | None = None if kind == "auto" else kind
        self.labels = labels
        self.up = False
        self.version = ""
        self.inventory: list[str] | None = None
        self.last_probe: float | None = None  # time.monotonic() of the last finished probe
        self._health_interval = health_interval
        self._inventory_interval = inventory_interval
        self._inventory_due = 0.0
        self._inventory_stale = False
        self._session: aiohttp.ClientSession | None = None

    async def _get_json(self, session: aiohttp.ClientSession, path: str) -> Any:
        """GET a JSON document; None when the upstream does not answer 200 with JSON."""
        try:
            async with session.get(self.url + path, allow_redirects=False) as resp:
                if resp.status != 200:
                    return None
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def detect(self, session: aiohttp.ClientSession) -> str | None:
        version = await self._get_json(session, "/api/version")
        if isinstance(version, dict) and isinstance(version.get("version"), str):
            self.version = version["version"]
            return "ollama"
        props = await self._get_json(session, "/props")
        if isinstance(props, dict):
            build = props.get("build_info")
            self.version = build if isinstance(build, str) else ""
            return "llama.cpp"
        if await self._get_json(session, "/v1/models") is not None:
            return "openai"
        return None

    async def probe(self, session: aiohttp.ClientSession) -> bool:
        if self.kind is None:
            self.kind = await self.detect(session)
            if self.kind is not None:
                log.info("upstream detected", upstream=self.url, kind=self.kind,
                         version=self.version or None)
            return self.kind is not None
        try:
            async with session.get(self.url + HEALTH_PATH[self.kind],
                                   allow_redirects=False) as resp:
                await resp.read()
                if self.kind == "ollama" and resp.status == 200:
                    await self._note_ollama_version(resp)
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _note_ollama_version(self, resp: aiohttp.ClientResponse) -> None:
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            return
        if isinstance(body, dict) and isinstance(body.get("version"), str):
            self.version = body["version"]

    async def refresh_inventory(self, session: aiohttp.ClientSession) -> None:
        names: list[str] | None = None
        if self.kind == "ollama":
            tags = await self._get_json(session, "/api/tags")
            if isinstance(tags, dict) and isinstance(tags.get("models"), list):
                names = [m["name"] for m in tags["models"]
                         if isinstance(m, dict) and isinstance(m.get("name"), str)]
        elif self.kind is not None:
            models = await self._get_json(session, "/v1/models")
            if isinstance(models, dict) and isinstance(models.get("data"), list):
                names = [m["id"] for m in models["data"]
                         if isinstance(m, dict) and isinstance(m.get("id"), str)]
        if names is None:
            return  # keep the last list we had: a failed poll is not an empty inventory
        if names != self.inventory:
            log.info("upstream models", models=names[:50], count=len(names))
        self.inventory = names
        self.labels.set_inventory(names, single_model_server=self.kind == "llama.cpp")

    def inventory_stale(self) -> None:
        """A request named a model we do not know: refresh the list soon (rate-limited)."""
        self._inventory_stale = True

    async def poll_once(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=PROBE_TIMEOUT)
        session = self._session
        up = await self.probe(session)
        self.last_probe = time.monotonic()
        if up != self.up:
            if up:
                log.info("upstream up", upstream=self.url, kind=self.kind)
            else:
                log.warning("upstream down", upstream=self.url, kind=self.kind)
        self.up = up
        now = time.monotonic()
        if up and (now >= self._inventory_due or self._inventory_stale):
            self._inventory_stale = False
            self._inventory_due = now + self._inventory_interval
            await self.refresh_inventory(session)

    async def run(self) -> None:
        """Poll forever (the first poll is expected done by the caller, before serving)."""
        try:
            while True:
                await asyncio.sleep(self._health_interval)
                await self.poll_once()
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None

    def state(self) -> dict[str, Any]:
        return {"url": _without_credentials(self.url), "kind": self.kind, "up": self.up,
                "version": self.version or None, "models": self.inventory}


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return scheme + sep + authority.rpartition("@")[2] + slash + path


class UpstreamCollector(Collector):
    def __init__(self, monitor: UpstreamMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        monitor = self._monitor
        up = GaugeMetricFamily("llmtap_upstream_up",
                               "1 when the upstream answered its last health probe")
        up.add_metric([], 1.0 if monitor.up else 0.0)
        yield up
        info = GaugeMetricFamily("llmtap_upstream_info", "The upstream server llmtap fronts",
                                 labels=("kind", "version"))
        info.add_metric([monitor.kind or "unknown", monitor.version], 1.0)
        yield info
