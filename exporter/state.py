"""Live per-model state: what is in flight and waiting now, and EWMAs of recent requests.

An observer of the relay: the counters move as a request starts, gets its first token and
ends (plain integer updates, no metric calls); the Prometheus collector and
`/llmtap/v1/state` read them. The router decides from this snapshot, so it must stay cheap
to build and never contain request content.
"""

from __future__ import annotations

from typing import Any

from exporter.record import RequestRecord
from exporter.relay.observers import Observer

# Weight of the newest request in the moving averages: ~the last 10 requests dominate.
EWMA_ALPHA = 0.2

GaugeKey = tuple[str, str, str]  # (provider, operation, model label)


def ewma(previous: float | None, value: float) -> float:
    """The one moving average llmtap keeps (the sidecar's state and the router's alike)."""
    return value if previous is None else previous + EWMA_ALPHA * (value - previous)


class ModelState:
    __slots__ = (
        "decode_tps",
        "error_rate",
        "errors",
        "in_flight",
        "load_seconds",
        "requests",
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "running": self.in_flight - self.waiting,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "ewma": {
                "ttft_seconds": self.ttft,
                "tpot_seconds": self.tpot,
                "decode_tokens_per_second": self.decode_tps,
                "load_seconds": self.load_seconds,
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

    def in_flight(self, label: str) -> int:
        state = self.models.get(label)
        return state.in_flight if state is not None else 0

    def totals(self) -> tuple[int, int]:
        """Requests in flight, and of them those still waiting for a first token."""
        return (sum(m.in_flight for m in self.models.values()),
                sum(m.waiting for m in self.models.values()))

    def snapshot(self) -> dict[str, Any]:
        return {label: state.as_dict() for label, state in sorted(self.models.items())}
