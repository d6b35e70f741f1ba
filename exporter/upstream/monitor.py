"""Upstream kind detection, health, and the per-kind pollers, all off the request path.

Detection (`--upstream-kind auto`): `/api/version` answering JSON with a version → ollama;
`/props` answering JSON → llama.cpp; anything else that answers `/v1/models` → openai. The
health probe drives `/readyz` and `llmtap_upstream_up`; the inventory (refreshed every
--inventory-interval) feeds the model-label allow-list, digests and pins; the loaded models
and the server's own queue are polled every --health-interval. Every poll has a short timeout
on its own client session, so a hanging upstream never holds the relay, and each source's
failures are logged once per change of state, not once per tick.
"""

from __future__ import annotations

import asyncio
import time
from types import ModuleType
from typing import Any

import orjson
import structlog

from exporter.models import ModelLabels
from exporter.upstream import llamacpp, ollama, openai, pins
from exporter.upstream.fetch import Fetcher
from exporter.upstream.view import ModelInfo, UpstreamView

log = structlog.get_logger("llmtap.upstream")

HEALTH_PATH = {"ollama": "/api/version", "llama.cpp": "/health", "openai": "/v1/models"}
POLLERS: dict[str, ModuleType] = {"ollama": ollama, "llama.cpp": llamacpp, "openai": openai}


class UpstreamMonitor:
    def __init__(self, url: str, kind: str, labels: ModelLabels,
                 health_interval: float = 5.0, inventory_interval: float = 30.0,
                 pinned: dict[str, str] | None = None, enforce_pins: bool = False) -> None:
        self.url = url
        self.kind: str | None = None if kind == "auto" else kind
        self.labels = labels
        self.up = False
        self.version = ""
        self.view = UpstreamView()
        self.pins = pinned or {}
        self.enforce_pins = enforce_pins
        self.mismatched: frozenset[str] = frozenset()  # pinned models not as pinned
        self.last_probe: float | None = None  # time.monotonic() of the last finished probe
        self._health_interval = health_interval
        self._inventory_interval = inventory_interval
        self._inventory_due = 0.0
        self._inventory_stale = False
        self._fetch = Fetcher(url)
        self._failing: set[str] = set()  # sources whose last poll failed (logged once)
        self._reported_up: bool | None = None  # what the log last said (None: nothing yet)

    @property
    def inventory(self) -> list[str] | None:
        models = self.view.models
        return None if models is None else list(models)

    def refuses(self, label: str) -> str | None:
        """With --enforce-pins, why a request for this model must not be served."""
        if not self.enforce_pins or label not in self.mismatched:
            return None
        installed = self.view.models.get(label) if self.view.models else None
        found = f"sha256:{installed.digest[:12]}" if installed and installed.digest else "none"
        return (f"model {label!r} is pinned to digest sha256:{self.pins[label][:12]} but the "
                f"installed digest is {found}; llmtap refuses to serve it (--enforce-pins)")

    async def detect(self) -> str | None:
        version = await self._fetch.json("/api/version")
        if isinstance(version, dict) and isinstance(version.get("version"), str):
            self.version = version["version"]
            return "ollama"
        props = await self._fetch.json("/props")
        if isinstance(props, dict):
            build = props.get("build_info")
            self.version = build if isinstance(build, str) else ""
            return "llama.cpp"
        if await self._fetch.json("/v1/models") is not None:
            return "openai"
        return None

    async def probe(self) -> bool:
        if self.kind is None:
            self.kind = await self.detect()
            if self.kind is not None:
                log.info("upstream detected", upstream=self.url, kind=self.kind,
                         version=self.version or None)
            return self.kind is not None
        answer = await self._fetch.get(HEALTH_PATH[self.kind])
        if answer is None or answer[0] != 200:
            return False
        if self.kind == "ollama":
            self._note_ollama_version(answer[1])
        return True

    def _note_ollama_version(self, body: bytes) -> None:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, dict) and isinstance(doc.get("version"), str):
            self.version = doc["version"]

    def _source(self, name: str, ok: bool) -> None:
        """Log a source's failure once when it starts failing and once when it recovers."""
        if ok and name in self._failing:
            self._failing.discard(name)
            log.info("upstream poll recovered", upstream=self.url, source=name)
        elif not ok and name not in self._failing:
            self._failing.add(name)
            log.warning("upstream poll failing", upstream=self.url, source=name,
                        note="logged once until it recovers")

    def set_inventory(self, models: dict[str, ModelInfo]) -> None:
        previous = self.view.models
        if previous is not None:
            for name, info in models.items():
                old = previous.get(name)
                if old is not None and old.digest and info.digest and old.digest != info.digest:
                    log.warning("model digest changed", model=name, old=old.digest[:12],
                                new=info.digest[:12])
        if previous is None or previous.keys() != models.keys():
            log.info("upstream models", models=sorted(models)[:50], count=len(models))
        self.view.models = models
        self.labels.set_inventory(list(models), single_model_server=self.kind == "llama.cpp")
        if self.pins:
            mismatched = frozenset(pins.mismatched(
                self.pins, {name: info.digest for name, info in models.items()}))
            for model in sorted(mismatched - self.mismatched):
                log.warning("model digest does not match its pin", model=model,
                            pinned=self.pins[model][:12],
                            installed=(models[model].digest[:12] if model in models
                                       else "not installed"))
            self.mismatched = mismatched

    def inventory_stale(self) -> None:
        """A request named a model we do not know: refresh the list soon (rate-limited)."""
        self._inventory_stale = True

    async def poll_once(self) -> None:
        up = await self.probe()
        self.last_probe = time.monotonic()
        if up != self._reported_up:
            self._reported_up = up
            if up:
                log.info("upstream up", upstream=self.url, kind=self.kind)
            else:
                log.warning("upstream down", upstream=self.url, kind=self.kind,
                            note="logged once until it is back")
        self.up = up
        if not up or self.kind is None:
            return
        poller = POLLERS[self.kind]
        now = time.monotonic()
        if now >= self._inventory_due or self._inventory_stale:
            self._inventory_stale = False
            self._inventory_due = now + self._inventory_interval
            models = await poller.inventory(self._fetch)
            self._source("inventory", models is not None)
            if models is not None:
                self.set_inventory(models)
        loaded = await poller.loaded(self._fetch)
        if loaded is not None:
            came, went = self.view.set_loaded(loaded)
            for name in came:
                log.info("model loaded", model=name, vram_bytes=loaded[name].vram_bytes)
            for name in went:
                log.info("model unloaded", model=name)
        queue = await poller.queue(self._fetch)
        if queue is not None or self.view.queue is not None:
            self._source("server queue", queue is not None)
        self.view.queue = queue

    async def run(self) -> None:
        """Poll forever (the first poll is expected done by the caller, before serving)."""
        try:
            while True:
                await asyncio.sleep(self._health_interval)
                await self.poll_once()
        finally:
            await self._fetch.close()

    def state(self) -> dict[str, Any]:
        return {"url": _without_credentials(self.url), "kind": self.kind, "up": self.up,
                "version": self.version or None, **self.view.as_dict(),
                "pins_mismatched": sorted(self.mismatched)}


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return scheme + sep + authority.rpartition("@")[2] + slash + path
