"""Inside Ollama (0.30 and later): each loaded model's llama-server child, and its /slots.

Ollama shows neither what runs nor what waits (ollama/ollama#2004: "There isn't a way to tell
that right now"). Since 0.30 each loaded GGUF model runs in a llama-server child on a loopback
port Ollama picked, started with `-np` (its parallel slots) and without `--metrics`; the
child's /slots does tell. This source finds the Ollama process by the socket listening on
the upstream's port, its llama-server children by parent and command line (`--model`,
`--port`), names each child by the model whose blob it runs (the FROM line of /api/show,
asked once per model and digest), and reads the child's /slots: slots in use and in all, and
the context the busy slots hold (the KV-cache estimate).

Only counts are kept: /slots also carries each slot's sampling parameters (and, in some
builds, prompt text), and none of it is stored or re-exported.

It needs the upstream on loopback (same host, or same pod) and sight of the Ollama process
(same user or root; in Kubernetes, `shareProcessNamespace: true`). Without them it says why
once, in the log and in /llmtap/v1/state, and the per-model runner gauges are absent.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any

import structlog

from exporter.config import is_loopback_host
from exporter.upstream import procfs
from exporter.upstream.fetch import Fetcher
from exporter.upstream.llamacpp import slot_figures
from exporter.upstream.view import ServerQueue, UpstreamView

log = structlog.get_logger("llmtap.upstream")


@dataclass(frozen=True, slots=True)
class Runner:
    pid: int
    port: int
    model_path: str


def runner_from(pid: int, argv: list[str]) -> Runner | None:
    """A llama-server child's model and port, from its command line."""
    if not argv or not os.path.basename(argv[0]).startswith("llama-server"):
        return None  # Ollama's own runners (0.2x `ollama runner`) have no /slots
    args = argv[1:]
    values = {flag: value for flag, value in itertools.pairwise(args)
              if flag in ("--model", "-m", "--port")}
    model = values.get("--model") or values.get("-m")
    port = values.get("--port", "")
    if not model or not port.isdigit():
        return None
    return Runner(pid, int(port), model)


def find_runners(upstream_port: int, last: int | None = None
                 ) -> tuple[list[Runner], str | None, int | None]:
    """The llama-server children of the process listening on the port (looked for in
    `last` first, the Ollama process found before), or why not; and that process."""
    inodes = procfs.listening_inodes(upstream_port)
    if not inodes:
        return [], f"no socket listens on port {upstream_port} in this network namespace", None
    # The socket's owner, when we may read its descriptors (same user, or root); else the
    # one `ollama serve` in sight (another user's command line is readable, its fds are not).
    ollama = procfs.owner_of(inodes, first=last)
    if ollama is None:
        servers = [pid for pid in procfs.pids() if _is_ollama_server(procfs.command_line(pid))]
        if len(servers) != 1:
            return [], ("the process listening on the upstream's port is not visible (another "
                        "PID namespace: in a pod set shareProcessNamespace)" if not servers
                        else f"{len(servers)} Ollama servers in sight, none known to be "
                        "the upstream's (run llmtap as Ollama's user to tell them apart)"), None
        ollama = servers[0]
    found = []
    for child in procfs.children_of(ollama):
        argv = procfs.command_line(child)
        runner = runner_from(child, argv) if argv else None
        if runner is not None:
            found.append(runner)
    return found, None, ollama


def _is_ollama_server(argv: list[str] | None) -> bool:
    return argv is not None and os.path.basename(argv[0]) == "ollama" and argv[1:2] == ["serve"]


class RunnerSource:
    """The `runners` poll source: per loaded model, its runner's slots."""

    def __init__(self, url: str, fetch: Fetcher, view: UpstreamView) -> None:
        self.url = url
        self._fetch = fetch
        self._view = view
        parts = urllib.parse.urlsplit(url)
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._local = is_loopback_host(parts.hostname or "")
        self._ollama: int | None = None  # the Ollama process found last poll
        self._blobs: dict[tuple[str, str], str] = {}  # (model, digest) → blob path
        self._clients: dict[int, Fetcher] = {}  # runner port → its fetcher
        self.blind: str | None = None  # why the runners cannot be seen (None: they can)

    async def poll(self, kind: str | None, up: bool) -> bool | None:
        if kind != "ollama" or not up:
            return None
        why: str | None = "the upstream is not on this host (loopback)"
        runners: list[Runner] = []
        if self._local:
            runners, why, self._ollama = await asyncio.to_thread(find_runners, self._port,
                                                                 self._ollama)
        if why is not None:
            self._cannot_see(why)
            return None
        self._see()
        names = await self._names()
        slots: dict[str, ServerQueue] = {}
        ok = True
        for runner in runners:
            figures = await self._slots(runner)
            ok = ok and figures is not None
            name = names.get(runner.model_path)
            if figures is not None and name is not None:
                slots[name] = figures
        self._view.model_queues = slots
        await self._forget(runners)
        return ok

    def _cannot_see(self, why: str) -> None:
        if why != self.blind:
            log.info("cannot see Ollama's model runners; the runner gauges stay absent",
                     upstream=self.url, why=why)
        self.blind = why
        self._view.model_queues = None

    def _see(self) -> None:
        if self.blind is not None:
            log.info("Ollama's model runners are visible again", upstream=self.url)
        self.blind = None

    async def _names(self) -> dict[str, str]:
        """Blob path → model name, for the models /api/ps lists as loaded."""
        loaded = self._view.loaded or {}
        models = self._view.models or {}
        names = {}
        for name in loaded:
            key = (name, models[name].digest if name in models else "")
            if key not in self._blobs:
                blob = await self._blob_of(name)
                if blob is None:
                    continue
                self._blobs[key] = blob
            names[self._blobs[key]] = name
        return names

    async def _blob_of(self, model: str) -> str | None:
        doc = await self._fetch.json("/api/show", {"model": model})
        modelfile = doc.get("modelfile") if isinstance(doc, dict) else None
        if not isinstance(modelfile, str):
            return None
        for line in modelfile.splitlines():
            if line.startswith("FROM "):
                return line[5:].strip()
        return None

    async def _slots(self, runner: Runner) -> ServerQueue | None:
        fetch = self._clients.get(runner.port)
        if fetch is None:
            fetch = self._clients[runner.port] = Fetcher(f"http://127.0.0.1:{runner.port}")
        slots: Any = await fetch.json("/slots")
        return slot_figures(slots) if isinstance(slots, list) else None

    async def _forget(self, runners: list[Runner]) -> None:
        """Close the clients of runners that are gone (a model unloaded)."""
        live = {runner.port for runner in runners}
        for port in [port for port in self._clients if port not in live]:
            await self._clients.pop(port).close()

    async def close(self) -> None:
        for fetch in self._clients.values():
            await fetch.close()
        self._clients.clear()
