"""The admin listener: /metrics, /healthz, /readyz and /llmtap/v1/state.

It runs on its own port so the proxy port never serves llmtap's own endpoints: a client of
the model server cannot read metrics or state through it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from exporter import __version__
from exporter.gpu import GpuSampler
from exporter.state import LiveState, ModelState
from exporter.telemetry.exposition import metrics_handler
from exporter.upstream.monitor import UpstreamMonitor


def create_admin_app(registry: CollectorRegistry, live: LiveState,
                     monitor: UpstreamMonitor, gpu: GpuSampler,
                     not_ready: Callable[[], str | None]) -> web.Application:
    """`not_ready` says why /readyz must answer 503 (None: ready)."""
    started = time.time()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if (why := not_ready()) is None:
            return web.json_response({"status": "ready", "upstream": monitor.shown_url})
        return web.json_response({"status": "not ready", "reason": why}, status=503)

    async def state(request: web.Request) -> web.Response:
        snapshot: dict[str, Any] = {
            "llmtap": {"version": __version__, "started": started},
            "time": time.time(),
            "upstream": monitor.state(),
            "models": _models(live, monitor),
            "gpus": gpu.state(),
            "process": _process(),
        }
        return web.Response(body=orjson.dumps(snapshot), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/llmtap/v1/state", state)
    return app


def _models(live: LiveState, monitor: UpstreamMonitor) -> dict[str, Any]:
    """Per model: live request figures, and what the upstream says (installed, loaded, VRAM)."""
    snapshot = live.snapshot()
    view = monitor.view
    installed = view.models or {}
    loaded = view.loaded
    for name in installed:
        snapshot.setdefault(name, ModelState().as_dict())
    for name, entry in snapshot.items():
        entry["installed"] = name in installed if view.models is not None else None
        resident = loaded.get(name) if loaded is not None else None
        entry["loaded"] = None if loaded is None else resident is not None
        entry["vram_bytes"] = resident.vram_bytes if resident is not None else None
    return dict(sorted(snapshot.items()))


def _process() -> dict[str, Any]:
    """llmtap's own footprint: what leak tests and operators watch."""
    import os

    try:
        fds: int | None = len(os.listdir("/proc/self/fd"))
        with open("/proc/self/statm") as statm:
            rss: int | None = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        fds = rss = None
    return {"pid": os.getpid(), "open_fds": fds, "rss_bytes": rss,
            "asyncio_tasks": len(asyncio.all_tasks())}
