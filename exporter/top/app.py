"""`llmtap top`: the terminal view (Textual), refreshed every second.

Each admin URL is scraped once per refresh; a router's sidecars (their admin URLs are in its
state) are scraped too, under the router's names for them. The screen is four tables:
models, GPUs, the routers' backends, and what did not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, ClassVar

import aiohttp
from rich.table import Table
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import Static

from exporter.top.rows import (
    SORT_KEYS,
    BackendRow,
    GpuRow,
    ModelRow,
    backend_rows,
    gpu_rows,
    model_rows,
    sort_models,
    spilling,
)
from exporter.top.scrape import Snapshot, scrape
from exporter.top.window import Window


class Sources:
    """The URLs to read, their windows, and the sidecars the routers among them name."""

    def __init__(self, urls: list[str], timeout: float) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = timeout
        self.windows: dict[str, Window] = {}
        self.names: dict[str, str] = {u: _short(u) for u in self.urls}
        self.derived: dict[str, str] = {}  # a router's sidecar: admin URL -> its name

    async def read(self, session: aiohttp.ClientSession) -> list[Snapshot]:
        urls = [*self.urls, *(u for u in self.derived if u not in self.names)]
        snaps = await asyncio.gather(*(scrape(session, u, self.timeout) for u in urls))
        derived: dict[str, str] = {}
        for snap in snaps:
            self.windows.setdefault(snap.url, Window()).add(snap.at, snap.counts,
                                                            _uptime(snap))
            if snap.role == "router":
                for s in snap.state.get("sidecars") or ():
                    if isinstance(s, dict) and isinstance(s.get("admin_url"), str):
                        derived[s["admin_url"].rstrip("/")] = str(s.get("name"))
        self.derived = derived
        return list(snaps)

    def name(self, url: str) -> str:
        return self.names.get(url) or self.derived.get(url) or _short(url)


def _uptime(snap: Snapshot) -> float | None:
    """Seconds since the sidecar started, from its state's wall-clock times."""
    meta, now = snap.state.get("llmtap") or {}, snap.state.get("time")
    started = meta.get("started") if isinstance(meta, dict) else None
    if isinstance(started, int | float) and isinstance(now, int | float):
        return max(0.0, float(now) - float(started))
    return None


def _short(url: str) -> str:
    return url.removeprefix("http://").removeprefix("https://")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value}B"


def _table(title: str, *columns: str) -> Table:
    """Names first (cut with an ellipsis when long), figures after (never cut): the models
    table fits 80 columns."""
    table = Table(title=title, title_justify="left", title_style="bold", box=None,
                  padding=(0, 1), collapse_padding=True, pad_edge=False, expand=False,
                  header_style="bold")
    for i, column in enumerate(columns):
        if i < 2:
            table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=(14, 18)[i])
        else:
            table.add_column(column, no_wrap=True, justify="right", min_width=len(column))
    return table


def models_table(rows: list[ModelRow], sort: str) -> Table:
    table = _table(f"Models (sorted by {sort})", "backend", "model", "infl", "wait",
                   "ttft50", "ttft95", "tok/s", "load", "vram", "err")
    for r in rows:
        table.add_row(r.backend, r.model, str(r.in_flight), str(r.waiting),
                      _seconds(r.ttft_p50), _seconds(r.ttft_p95),
                      "-" if r.tok_s is None else f"{r.tok_s:.1f}",
                      {True: "yes", False: "no", None: "?"}[r.loaded], _bytes(r.vram_bytes),
                      "-" if r.errors is None else f"{r.errors * 100:.0f}%")
    if not rows:
        table.add_row("(no models yet)", *[""] * 9)
    return table


def gpus_table(rows: list[GpuRow]) -> Table:
    table = _table("GPUs", "backend", "gpu", "util", "memory")
    for r in rows:
        memory = f"{_bytes(r.used)} / {_bytes(r.total)}"
        table.add_row(r.backend, r.gpu,
                      "-" if r.utilization is None else f"{r.utilization * 100:.0f}%", memory)
    return table


def router_table(rows: list[BackendRow], spills: dict[str, list[str]]) -> Table:
    table = _table("Routers", "router", "backend", "breaker", "infl", "")
    for r in rows:
        table.add_row(r.router, r.backend, r.breaker, str(r.in_flight), r.detail)
    for router, routes in spills.items():
        table.add_row(router, "spilling", "", "", ", ".join(routes) or "no route")
    return table


class TopApp(App[None]):
    """The live view."""

    TITLE = "llmtap top"
    CSS = "Static { width: 100%; } #status { height: 1; }"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"), Binding("s", "sort", "next sort key")]

    def __init__(self, urls: list[str], interval: float = 1.0, timeout: float = 1.0) -> None:
        super().__init__()
        self.sources = Sources(urls, timeout)
        self.interval = interval
        self.sort = SORT_KEYS[0]
        self.snaps: list[Snapshot] = []
        self._refresher: asyncio.Task[None] | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with VerticalScroll():
            yield Static(id="models")
            yield Static(id="gpus")
            yield Static(id="routers")
            yield Static(id="problems")

    async def on_mount(self) -> None:
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def on_unmount(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher

    async def _refresh_forever(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                started = time.monotonic()
                self.snaps = await self.sources.read(session)
                self.render_all()
                await asyncio.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    def action_sort(self) -> None:
        self.sort = SORT_KEYS[(SORT_KEYS.index(self.sort) + 1) % len(SORT_KEYS)]
        self.render_all()

    def render_all(self) -> None:
        models: list[ModelRow] = []
        gpus: list[GpuRow] = []
        backends: list[BackendRow] = []
        spills: dict[str, list[str]] = {}
        problems = Text()
        for snap in self.snaps:
            name = self.sources.name(snap.url)
            if snap.error:
                problems.append(f"{name}: {snap.error}\n", style="red")
            elif snap.role == "sidecar":
                window = self.sources.windows[snap.url]
                recent = {m: window.recent(m) for m in snap.counts}
                models += model_rows(name, snap.state, recent)
                gpus += gpu_rows(name, snap.state)
            else:
                backends += backend_rows(name, snap.state)
                spills[name] = spilling(snap.state)
        self._show("models", models_table(sort_models(models, self.sort), self.sort))
        self._show("gpus", gpus_table(gpus) if gpus else Text("GPUs: none reported"))
        self._show("routers", router_table(backends, spills) if backends or spills else "")
        self._show("problems", problems)
        answered = sum(1 for s in self.snaps if not s.error)
        self._show("status", Text(
            f"llmtap top  {answered}/{len(self.snaps)} answering  "
            f"{time.strftime('%H:%M:%S')}  s: sort  q: quit", style="reverse"))

    def _show(self, widget: str, content: Any) -> None:
        self.query_one(f"#{widget}", Static).update(content)
