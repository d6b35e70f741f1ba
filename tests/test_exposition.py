"""/metrics rendered in a forked child once the registry is big: the same bytes as
prometheus_client, a child that fails or hangs replaced by a render in a thread, and nothing
of the parent's kept open by it."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from exporter.telemetry import exposition
from exporter.telemetry.exposition import render

PARENT = os.getpid()


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    latency = Histogram("demo_seconds", "demo", ["model"], registry=registry)
    requests = Counter("demo_requests", "demo", ["model"], registry=registry)
    for i in range(50):
        latency.labels(f"m{i}").observe(i / 100, exemplar={"trace_id": f"{i:032x}"})
        requests.labels(f"m{i}").inc(i)
    return registry


@pytest.fixture(autouse=True)
def forked(monkeypatch: pytest.MonkeyPatch) -> None:
    """These registries are small: make them take the forked path a big one takes."""
    monkeypatch.setattr(exposition._Choice, "fork", True)


class _Slow:
    def collect(self) -> Iterator[Metric]:
        time.sleep(exposition.FORK_ABOVE * 2)
        yield GaugeMetricFamily("demo_slow", "demo", value=1)


class _InChild:
    """A collector that misbehaves only in a forked child: raises, or hangs."""

    def __init__(self, hang: float = 0.0) -> None:
        self.hang = hang

    def collect(self) -> Iterator[Metric]:
        if os.getpid() != PARENT:
            if self.hang:
                time.sleep(self.hang)
            else:
                raise RuntimeError("only in the child")
        yield GaugeMetricFamily("demo_child_ok", "demo", value=1)


async def test_forked_render_is_byte_identical_in_both_formats() -> None:
    registry = _registry()
    body, content_type = await render(registry, "")
    assert body == generate_latest(registry) and content_type.startswith("text/plain")
    body, content_type = await render(registry, "application/openmetrics-text; version=1.0.0")
    assert body == generate_openmetrics(registry)
    assert content_type.startswith("application/openmetrics-text")
    assert b"# {trace_id=" in body  # exemplars survive the fork


async def test_a_failing_child_falls_back_to_a_thread() -> None:
    registry = _registry()
    registry.register(_InChild())
    body, _ = await render(registry, "")
    assert b"demo_child_ok 1.0" in body and b"demo_seconds_count" in body


async def test_a_hanging_child_is_killed_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exposition, "CHILD_DEADLINE", 0.5)
    registry = _registry()
    registry.register(_InChild(hang=60))
    started = time.monotonic()
    body, _ = await render(registry, "")
    assert b"demo_child_ok 1.0" in body
    assert time.monotonic() - started < 10


async def test_the_child_keeps_no_connection_of_the_parents_open() -> None:
    """A connection the parent closes while a render runs closes at once: the child dropped
    its copy of every descriptor (else a client's disconnect would wait for the render)."""
    ours, theirs = socket.socketpair()
    registry = CollectorRegistry()
    registry.register(_InChild(hang=2.0))  # the child stays alive for two seconds
    scrape = asyncio.create_task(render(registry, ""))
    await asyncio.sleep(0.3)  # the child is forked and asleep
    ours.close()
    theirs.settimeout(1.0)
    closed_at = time.monotonic()
    assert theirs.recv(1) == b""  # EOF, not a timeout
    assert time.monotonic() - closed_at < 0.5
    theirs.close()
    await scrape


async def test_a_registry_goes_to_the_fork_once_its_render_is_slow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exposition._Choice, "fork", False)
    quick = _registry()
    with monkeypatch.context() as patch:  # "quick" by the threshold, whatever this machine does
        patch.setattr(exposition, "FORK_ABOVE", 60.0)
        assert (await render(quick, ""))[0] == generate_latest(quick)
    assert not exposition._Choice.fork  # a quick render stays in a thread
    slow = _registry()
    slow.register(_Slow())
    assert (await render(slow, ""))[0] == generate_latest(slow)
    assert exposition._Choice.fork  # from now on, forked
