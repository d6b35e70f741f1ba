"""Upstream kind detection, health, and the per-kind poll sources, all off the request path.

Detection (`--upstream-kind auto`): `/api/version` answering JSON with a version → ollama;
`/props` answering JSON → llama.cpp (its router mode when `role` is "router"); anything else
that answers `/v1/models` → openai. `sources()` gives the poll sources a PollSupervisor runs,
each on its own interval and failing alone: health (`/readyz`, `llmtap_upstream_up`),
inventory (every --inventory-interval: labels, digests, pins), loaded models, the server's
queue, Ollama's runners and llama.cpp's router loads. Every poll has a short timeout on its
own client session, so a hanging upstream never holds the relay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import orjson
import structlog

from exporter.models import ModelLabels
from exporter.upstream import llamacpp, llamacpp_router, ollama, openai, pins
from exporter.upstream.fetch import POLL_TIMEOUT_S, Fetcher
from exporter.upstream.runners import RunnerSource
from exporter.upstream.supervisor import Source
from exporter.upstream.view import ModelInfo, UpstreamView

log = structlog.get_logger("llmtap.upstream")

HEALTH_PATH = {"ollama": "/api/version", "llama.cpp": "/health", "openai": "/v1/models"}
POLLERS: dict[str, ModuleType] = {"ollama": ollama, "llama.cpp": llamacpp, "openai": openai}


class UpstreamMonitor:
    def __init__(self, url: str, kind: str, labels: ModelLabels,
                 health_interval: float = 5.0, inventory_interval: float = 30.0,
                 pinned: dict[str, str] | None = None, enforce_pins: bool = False) -> None:
        self.url = url
        self.shown_url = _without_credentials(url)  # as logs and the admin port show it
        self.kind: str | None = None if kind == "auto" else kind
        self.labels = labels
        self.up = False
        self.version = ""
        self.view = UpstreamView()
        self.pins = pinned or {}
        self.enforce_pins = enforce_pins
        self.mismatched: frozenset[str] = frozenset()  # pinned models not as pinned
        self.last_probe: float | None = None  # time.monotonic() of the last finished probe
        self.up_since: float | None = None  # time.monotonic() when it last came up
        self._health_interval = health_interval
        self._inventory_interval = inventory_interval
        self.on_up: Callable[[], None] | None = None  # told when the upstream comes up
        self.idle: Callable[[], bool] = lambda: False  # True: llmtap has nothing in flight
        self._fetch = Fetcher(url)
        self.runners = RunnerSource(self.shown_url, self._fetch, self.view)
        self.llamacpp_router = False  # llama-server in router mode (/props role "router")
        self._mode_known = False  # whether llamacpp_router was read since the upstream came up
        self.load_watch = llamacpp_router.LoadWatch(url, self.view)
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
            self.llamacpp_router = llamacpp_router.is_router(props)
            self._mode_known = True
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
                log.info("upstream detected", upstream=self.shown_url, kind=self.kind,
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
        self.labels.set_inventory(list(models), single_model_server=self.kind == "llama.cpp"
                                  and not self.llamacpp_router)
        if self.pins:
            mismatched = frozenset(pins.mismatched(
                self.pins, {name: info.digest for name, info in models.items()}))
            for model in sorted(mismatched - self.mismatched):
                log.warning("model digest does not match its pin", model=model,
                            pinned=self.pins[model][:12],
                            installed=(models[model].digest[:12] if model in models
                                       else "not installed"))
            self.mismatched = mismatched

    async def poll_health(self) -> bool:
        """The health source: detection until the kind is known, then the kind's probe."""
        try:
            up = await self.probe()
        except Exception:
            self._set_up(False)  # a probe that cannot tell is not a healthy upstream
            raise
        self._set_up(up)
        return up

    def _set_up(self, up: bool) -> None:
        self.last_probe = time.monotonic()
        came_up = up and not self.up
        if came_up:
            self.up_since = self.last_probe
        if not up:
            self._mode_known = False  # the server that comes back may run in another mode
        self.up = up
        if up != self._reported_up:
            self._reported_up = up
            if up:
                log.info("upstream up", upstream=self.shown_url, kind=self.kind)
            else:
                log.warning("upstream down", upstream=self.shown_url, kind=self.kind,
                            note="logged once until it is back")
        if came_up and self.on_up is not None:
            self.on_up()  # the other sources poll now, not at their next tick

    def fresh(self) -> bool:
        """Up, and the health source answered within three of its intervals (a health
        source that stopped running must not leave /readyz frozen at ready)."""
        last = self.last_probe
        return self.up and last is not None and \
            time.monotonic() - last < 3 * self._health_interval + POLL_TIMEOUT_S

    def pins_unchecked(self) -> bool:
        """With --enforce-pins: no model list has been read yet, so no digest is known to
        match its pin (a request must wait rather than be served an unchecked build)."""
        return self.enforce_pins and bool(self.pins) and self.view.models is None

    def _poller(self) -> ModuleType | None:
        if not self.up or self.kind is None:
            return None
        return llamacpp_router if self.llamacpp_router else POLLERS[self.kind]

    async def poll_inventory(self) -> bool | None:
        if self.up and self.kind == "llama.cpp" and not self._mode_known:
            # Which mode: detection reads it, but a kind given by flag was never detected.
            props = await self._fetch.json("/props")
            if props is not None:
                self.llamacpp_router = llamacpp_router.is_router(props)
                self._mode_known = True
        poller = self._poller()
        if poller is None:
            return None
        models = await poller.inventory(self._fetch)
        if models is not None:
            self.set_inventory(models)
        return models is not None

    async def poll_loaded(self) -> bool | None:
        poller = self._poller()
        if poller is None or not hasattr(poller, "loaded"):
            return None  # llama-server and plain OpenAI servers do not load and unload
        loaded = await poller.loaded(self._fetch)
        if loaded is None:
            return False
        came, went = self.view.set_loaded(loaded)
        for name in came:
            log.info("model loaded", model=name, vram_bytes=loaded[name].vram_bytes)
        for name in went:
            log.info("model unloaded", model=name)
        return True

    async def poll_queue(self) -> bool | None:
        poller = self._poller()
        if poller is llamacpp_router:
            queues = await llamacpp_router.model_queues(self._fetch, self.view)
            self.view.model_queues = queues
            return queues is not None
        if poller is None or not hasattr(poller, "queue"):
            return None
        queue = await poller.queue(self._fetch, self.view.queue, self.idle())
        had = self.view.queue is not None
        self.view.queue = queue
        if queue is None:
            # Ollama has no queue to read; a server that once showed one and stopped fails.
            return False if had else None
        return True

    def sources(self) -> list[Source]:
        """The pollers, health first; run them with a PollSupervisor."""
        health = self._health_interval
        return [Source("health", health, self.poll_health),
                Source("inventory", self._inventory_interval, self.poll_inventory,
                       min_gap=health),
                Source("loaded", health, self.poll_loaded),
                Source("queue", health, self.poll_queue),
                Source("runners", health, self.poll_runners),
                Source("model_loads", health, self.watch_loads, at_startup=False)]

    async def watch_loads(self) -> bool | None:
        """llama.cpp's router: /models/sse, held open (this poll lasts as long as it does)."""
        if not (self.up and self.kind == "llama.cpp" and self.llamacpp_router):
            return None
        return await self.load_watch.watch()

    async def poll_runners(self) -> bool | None:
        return await self.runners.poll(self.kind, self.up)

    async def close(self) -> None:
        await self.runners.close()
        await self.load_watch.close()
        await self._fetch.close()

    def state(self) -> dict[str, Any]:
        return {"url": self.shown_url, "kind": self.kind, "up": self.up,
                "version": self.version or None, **self.view.as_dict(),
                "runners_unseen_because": self.runners.blind,
                "pins_mismatched": sorted(self.mismatched)}


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return scheme + sep + authority.rpartition("@")[2] + slash + path
