"""/metrics rendering that never stalls the relay.

prometheus_client renders ~15 µs per series, all of it holding the GIL: 100 models x every
series is ~49,000 series and half a second of rendering. In a thread, that half second still
stalls the event loop by tens of milliseconds at a time (measured: p99 chunk delay 4 → 60 ms,
benchmarks/overhead), because parts of it (freeing a family's samples, say) never yield the GIL.
So a big registry renders in a forked child: fork() hands it a copy-on-write snapshot of every
metric at that instant, the child renders with prometheus_client itself (same bytes, exemplars
and OpenMetrics included) and writes them to a pipe the event loop reads. The relay pays only
for the fork (about 2 ms for a 50 MB process here) and the copy-on-write faults after it. A
small registry (a render under 25 ms) still renders in a thread: cheaper than a fork.

A child that fails or hangs (fork can copy a lock another thread held at that instant) is
killed after a deadline and the scrape is rendered in a thread instead, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = structlog.get_logger("llmtap.metrics")

CHILD_DEADLINE = 10.0  # seconds a forked render may take before it is killed
Encoder = Callable[[CollectorRegistry], bytes]


# A fork is not free either: the fork itself (~2 ms at 50 MB) and then the copy-on-write
# faults of every page the loop touches while the child lives. For a registry that renders
# quickly a thread costs the streams less (measured at 64 streams with a few models and a
# scrape a second: chunk gap p99 +8 ms forked, under +1 ms in a thread), so the fork is kept
# for registries whose render in a thread took longer than this.
FORK_ABOVE = 0.025  # seconds


class _Choice:
    fork = False


async def render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The scrape body for this Accept header, and its content type."""
    encoder, content_type = choose_encoder(accept)
    body = await _forked(encoder, registry) if _Choice.fork and hasattr(os, "fork") else None
    if body is None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        body = await loop.run_in_executor(None, encoder, registry)
        # Registries grow (models, label sets) and seldom shrink: once big, always forked.
        _Choice.fork = _Choice.fork or loop.time() - started > FORK_ABOVE
    return body, content_type


def metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request],
                                                             Awaitable[web.Response]]:
    """GET /metrics for the sidecar's and the router's admin ports."""
    async def metrics(request: web.Request) -> web.Response:
        body, content_type = await render(registry, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics


async def _forked(encoder: Encoder, registry: CollectorRegistry) -> bytes | None:
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        log.warning("cannot fork to render /metrics; rendering in a thread", error=str(exc))
        return None
    if pid == 0:  # the child: render, write, leave without running any of the parent's code
        code = 1
        try:
            # First drop every inherited descriptor: a connection the parent closes must
            # close now, not when this child exits (a client's disconnect closes the upstream
            # request within milliseconds, scrape or not). And no signal of the parent's
            # (SIGTERM to the process group) may reach the parent's loop through its wakeup fd.
            signal.set_wakeup_fd(-1)
            for number in (signal.SIGTERM, signal.SIGINT):
                signal.signal(number, signal.SIG_DFL)
            os.closerange(3, write_fd)
            os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
            view = memoryview(encoder(registry))
            while view:
                view = view[os.write(write_fd, view):]
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    reader = asyncio.StreamReader(limit=1 << 30)
    pipe = os.fdopen(read_fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        async with asyncio.timeout(CHILD_DEADLINE):
            body = await reader.read()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        body = None
    finally:
        transport.close()
    # The child has closed its end (it exited, or was killed): reaping it is immediate.
    _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
    if body is None or not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        log.warning("forked /metrics render failed; rendering in a thread", status=status)
        return None
    return body
