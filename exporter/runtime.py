"""Interpreter settings for a long-running relay: short GIL hand-offs, a frozen start-up heap.

Both measured on this project's 2-core machine (benchmarks/overhead):
- The relay shares the GIL with threads that keep it busy (span export encodes protobuf on
  its batch thread; the GPU sampler). Each time the event loop comes back from a system call
  it may queue for the GIL for up to the switch interval, several times per relayed chunk:
  beside a busy Python thread the loop's lag p99 was 13 ms at the default 5 ms interval,
  1 ms at 0.5 ms.
- A full (generation 2) garbage collection walks every tracked object, and after start-up
  that is mostly the imported libraries (OpenTelemetry, prometheus_client, aiohttp): one took
  45 ms at 64 live streams, stalling them all. Frozen after start-up, those objects are no
  longer walked: no collection over 2 ms in the same run.
- glibc's malloc raises its mmap threshold each time a large block is freed, so after a few
  large request bodies every later one comes from the heap and the heap never shrinks:
  100 requests naming a 400 KB model left RSS 48 MB higher, and it kept creeping (+4-7 MB
  per 100) with no Python object alive (tracemalloc). A fixed threshold keeps large blocks
  in their own mappings, returned to the kernel when freed: RSS stayed flat.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import signal
import sys
from collections.abc import Callable
from typing import Protocol

import structlog

SWITCH_INTERVAL = 0.0005  # seconds
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, kept fixed

log = structlog.get_logger("llmtap")


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def before_start() -> None:
    sys.setswitchinterval(SWITCH_INTERVAL)
    _fix_mmap_threshold()


def _fix_mmap_threshold() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to fix
        pass


def after_start() -> None:
    """Call once everything long-lived exists (apps, sessions, registries)."""
    gc.collect()
    gc.freeze()


async def run_until_signalled(make: Callable[[], Service], name: str) -> None:
    """Build, start, serve until SIGTERM or SIGINT, stop: the sidecar's and the router's life."""
    before_start()
    service = make()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stopping.set)
    try:
        await service.start()
        after_start()
        await stopping.wait()
        log.info(f"{name} stopping")
    finally:
        await service.stop()
