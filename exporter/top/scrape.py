"""What `llmtap top` reads from one admin URL: the sidecar's or the router's state JSON, and
the sidecar's /metrics for the last minute's TTFT percentiles and tokens per second.

A URL that does not answer, answers slowly, or is not llmtap becomes a `Snapshot` with an
`error` sentence for the screen, never an exception.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

TTFT = "gen_ai_server_time_to_first_token_seconds"
TOKENS = "gen_ai_client_token_usage"
# The same output tokens under OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental.
LATEST_OUTPUT = "gen_ai_client_inference_usage_output_tokens"
MODEL_LABEL = "gen_ai_request_model"


@dataclass(slots=True)
class Counts:
    """One model's cumulative figures at one scrape (summed over dialects and operations)."""

    ttft_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    output_tokens: float = 0.0


@dataclass(slots=True)
class Snapshot:
    url: str
    at: float  # monotonic time of the scrape
    role: str = ""  # "sidecar" or "router"; "" when the URL gave nothing usable
    state: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Counts] = field(default_factory=dict)  # per model label
    error: str = ""  # why there is nothing, in words
    elapsed: float = 0.0


async def scrape(session: aiohttp.ClientSession, url: str, within: float) -> Snapshot:
    """Read one admin URL: its state (sidecar or router) and, for a sidecar, its metrics."""
    started = time.monotonic()
    snap = Snapshot(url, started)
    try:
        async with asyncio.timeout(within):
            snap.role, snap.state = await _state(session, url)
            if snap.role == "sidecar":
                snap.counts = await _counts(session, url)
    except TimeoutError:
        snap.error = f"slow: no answer within {within:g} s"
    except aiohttp.ClientConnectorError as exc:
        snap.error = f"no answer: {exc.os_error.strerror or exc}"
    except (aiohttp.ClientError, OSError) as exc:
        snap.error = f"no answer: {type(exc).__name__}"
    except NotLlmtap as exc:
        snap.error = f"not llmtap: {exc}"
    if snap.error:
        snap.role, snap.state, snap.counts = "", {}, {}
    snap.elapsed = time.monotonic() - started
    return snap


class NotLlmtap(Exception):
    pass


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url, allow_redirects=False) as resp:
        return resp.status, await resp.content.read(8 << 20)  # bounded, whatever answers


async def _state(session: aiohttp.ClientSession, url: str) -> tuple[str, dict[str, Any]]:
    for path, role in (("/llmtap/v1/state", "sidecar"), ("/llmtap/v1/router", "router")):
        status, body = await _get(session, url + path)
        if status == 404:
            continue
        if status != 200:
            raise NotLlmtap(f"{path} answered HTTP {status}")
        try:
            state = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise NotLlmtap(f"{path} is not JSON") from None
        if not isinstance(state, dict) or not isinstance(state.get("llmtap"), dict):
            raise NotLlmtap(f"{path} is not llmtap's state")
        return role, state
    raise NotLlmtap("it has neither /llmtap/v1/state nor /llmtap/v1/router (an admin port "
                    "is the one with /metrics, 9464 by default)")


async def _counts(session: aiohttp.ClientSession, url: str) -> dict[str, Counts]:
    status, body = await _get(session, url + "/metrics")
    if status != 200:
        return {}
    return parse_counts(body.decode("utf-8", "replace"))


def parse_counts(text: str) -> dict[str, Counts]:
    """TTFT buckets and output tokens per model, from the Prometheus text exposition."""
    counts: dict[str, Counts] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (TTFT, TOKENS, LATEST_OUTPUT):
            continue
        for sample in family.samples:
            model = sample.labels.get(MODEL_LABEL)
            if model is None:
                continue
            entry = counts.setdefault(model, Counts())
            if family.name == TTFT and sample.name == TTFT + "_bucket":
                le = float(sample.labels["le"])
                entry.ttft_buckets[le] = entry.ttft_buckets.get(le, 0.0) + sample.value
            elif (family.name == TOKENS and sample.name == TOKENS + "_sum"
                  and sample.labels.get("gen_ai_token_type") == "output") or (
                    family.name == LATEST_OUTPUT and sample.name == LATEST_OUTPUT + "_total"):
                entry.output_tokens += sample.value
    return counts
