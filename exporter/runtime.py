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
"""

from __future__ import annotations

import gc
import sys

SWITCH_INTERVAL = 0.0005  # seconds


def before_start() -> None:
    sys.setswitchinterval(SWITCH_INTERVAL)


def after_start() -> None:
    """Call once everything long-lived exists (apps, sessions, registries)."""
    gc.collect()
    gc.freeze()
