"""Live per-model state: what is in flight and waiting now, and EWMAs of recent requests.

An observer of the relay: the counters move as a request starts, gets its first token and
ends (plain integer updates, no metric calls); the Prometheus collector and
`/llmtap/v1/state` read them. The router decides from this snapshot, so it must stay cheap
to build and never contain request content.
"""

from __future__ import annotations

import math
import time
from typing import Any

from exporter.record import RequestRecord
from exporter.relay.observers import Observer

# Weight of the newest request in the moving averages: ~the last 10 requests dominate.
EWMA_ALPHA = 0.2
# Time constant of the arrival rate, seconds. A per-request EWMA cannot measure a rate (with no
# arrivals it never updates, so it never falls); arrivals decayed by their age do.
ARRIVAL_RATE_SECONDS = 10.0

GaugeKey = tuple[str, str, str]  # (provider, operation, model label)


def ewma(previous: float | None, value: float) -> float:
    """The one moving average llmtap keeps (the sidecar's state and the router's alike)."""
    return value if previous is None else previous + EWMA_ALPHA * (value - previous)


class ArrivalRate:
    """Arrivals per second, each arrival's weight decaying as exp(-age / ARRIVAL_RATE_SECONDS).

    The router multiplies it by the age of its last poll to estimate what other clients (other
    router replicas) sent since; two numbers and one exp() per arrival."""

    __slots__ = ("at", "value")

    def __init__(self) -> None:
        self.value = 0.0  # the rate as of `at`
        self.at = 0.0

    def arrived(self, now: float) -> None:
        self.value = self.rate(now) + 1.0 / ARRIVAL_RATE_SECONDS
        self.at = now

    def rate(self, now: float) -> float:
        if self.value == 0.0:
            return 0.0
        return self.value * math.exp(-max(0.0, now - self.at) / ARRIVAL_RATE_SECONDS)


def service_seconds(record: RequestRecord) -> float | None:
    """How long the request occupied the model: the server's own prompt + generation time
    where it reports them (Ollama, llama.cpp), else first token to end of a streamed answer
    (OpenAI-compatible servers report no timings: the prompt time is missing from it).

    The router's estimate of a queue is this times the requests ahead: their length, not the
    incoming request's."""
    timings = record.server_timings
    if "eval_duration" in timings:  # Ollama, seconds
        return timings.get("prompt_eval_duration", 0.0) + timings["eval_duration"]
    if "predicted_ms" in timings:  # llama.cpp
        return (timings.get("prompt_ms", 0.0) + timings["predicted_ms"]) / 1000
    if record.stream and record.first_token is not None and record.end is not None:
        return max(0.0, record.end - record.first_token)
    return None


def prefill_timing(record: RequestRecord) -> tuple[float, float] | None:
    """(seconds, tokens) of the server's prompt processing: Ollama's prompt_eval_duration over
    the prompt tokens it evaluated (prompt_eval_count less the cached part), llama.cpp's
    prompt_ms over prompt_n (it counts only the evaluated ones)."""
    timings = record.server_timings
    if "prompt_eval_duration" in timings and record.input_tokens is not None:
        seconds = timings["prompt_eval_duration"]
        tokens = float(record.input_tokens - (record.cached_input_tokens or 0))
    elif "prompt_ms" in timings and "prompt_n" in timings:
        seconds, tokens = timings["prompt_ms"] / 1000, timings["prompt_n"]
    else:
        return None
    return (seconds, tokens) if seconds > 0 and tokens >= 1 else None


class ModelState:
    __slots__ = (
        "arrival_rate",
        "arrivals",
        "decode_tps",
        "error_rate",
        "errors",
        "in_flight",
        "load_seconds",
        "prompt_seconds",
        "prompt_tokens",
        "requests",
        "service",
        "tpot",
        "ttft",
        "waiting",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting = 0
        self.requests = 0
        self.errors = 0
        self.ttft: float | None = None
        self.tpot: float | None = None
        self.decode_tps: float | None = None
        self.load_seconds: float | None = None  # cold loads seen (the router's load cost)
        self.error_rate = 0.0
        self.arrivals = 0  # requests started, ever
        self.arrival_rate = ArrivalRate()
        self.service: float | None = None  # seconds a request occupies the model
        # Prompt processing per request, seconds and evaluated tokens: their ratio is the
        # seconds per prompt token (a ratio of averages, so that tiny prompts, where the
        # server's fixed cost dominates, weigh as little as they cost).
        self.prompt_seconds: float | None = None
        self.prompt_tokens: float | None = None

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        now = time.perf_counter() if now is None else now  # the records' clock
        per_token = None
        if self.prompt_seconds is not None and self.prompt_tokens:
            per_token = self.prompt_seconds / self.prompt_tokens
        return {
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "running": self.in_flight - self.waiting,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "arrivals": self.arrivals,
            "arrival_rate": round(self.arrival_rate.rate(now), 6),
            "ewma": {
                "ttft_seconds": self.ttft,
                "tpot_seconds": self.tpot,
                "decode_tokens_per_second": self.decode_tps,
                "load_seconds": self.load_seconds,
                "service_seconds": self.service,
                "prefill_seconds": self.prompt_seconds,
                "prefill_seconds_per_token": per_token,
            },
        }


class LiveState(Observer):
    def __init__(self) -> None:
        # [in_flight, waiting] per label set; entries are kept at 0 so gauges read 0, not absent.
        self.gauges: dict[GaugeKey, list[int]] = {}
        self.models: dict[str, ModelState] = {}

    def _model(self, label: str) -> ModelState:
        state = self.models.get(label)
        if state is None:
            state = self.models[label] = ModelState()
        return state

    def started(self, record: RequestRecord) -> None:
        if not record.operation:
            return
        key = (record.provider, record.operation, record.live_label)
        counts = self.gauges.get(key)
        if counts is None:
            counts = self.gauges[key] = [0, 0]
        counts[0] += 1
        counts[1] += 1
        model = self._model(record.live_label)
        model.in_flight += 1
        model.waiting += 1
        model.arrivals += 1
        model.arrival_rate.arrived(record.arrival)

    def first_token(self, record: RequestRecord) -> None:
        if not record.operation:
            return
        self.gauges[(record.provider, record.operation, record.live_label)][1] -= 1
        self.models[record.live_label].waiting -= 1

    def finished(self, record: RequestRecord) -> None:
        if not record.operation:
            return
        counts = self.gauges[(record.provider, record.operation, record.live_label)]
        counts[0] -= 1
        model = self.models[record.live_label]
        model.in_flight -= 1
        if record.waiting:
            counts[1] -= 1
            model.waiting -= 1
        # Averages go to the label the answer settled on (it can differ from the arrival one).
        settled = self._model(record.model_label or record.live_label)
        settled.requests += 1
        failed = bool(record.error_type)
        settled.errors += failed
        settled.error_rate = ewma(settled.error_rate, float(failed))
        if failed:
            return
        if (ttft := record.ttft) is not None:
            settled.ttft = ewma(settled.ttft, ttft)
        if (load := record.cold_load) is not None:
            settled.load_seconds = ewma(settled.load_seconds, load)
        if (tpot := record.tpot) is not None and tpot > 0:
            settled.tpot = ewma(settled.tpot, tpot)
            settled.decode_tps = ewma(settled.decode_tps, 1.0 / tpot)
        if (service := service_seconds(record)) is not None:
            settled.service = ewma(settled.service, service)
        if (prefill := prefill_timing(record)) is not None:
            settled.prompt_seconds = ewma(settled.prompt_seconds, prefill[0])
            settled.prompt_tokens = ewma(settled.prompt_tokens, prefill[1])

    def in_flight(self, label: str) -> int:
        state = self.models.get(label)
        return state.in_flight if state is not None else 0

    def totals(self) -> tuple[int, int]:
        """Requests in flight, and of them those still waiting for a first token."""
        return (sum(m.in_flight for m in self.models.values()),
                sum(m.waiting for m in self.models.values()))

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.perf_counter() if now is None else now
        return {label: state.as_dict(now) for label, state in sorted(self.models.items())}
