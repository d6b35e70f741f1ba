"""The router's own Prometheus series (`llmtap_router_*`), beside the sidecar's request
histograms it also keeps (telemetry/metrics.py, fed by the shared relay).

Labels are bounded: backend names come from the config or DNS discovery, route names from the
config, reasons, labels and classes from fixed sets (decide.py, classifier.py); nothing a
client sends becomes a label value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter.routing.registry import CLOSED, Registry
from exporter.routing.spend import KeyLimits
from exporter.telemetry.metrics import TTFT_BUCKETS

RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.1, 1.5, 2, 4, 10)


class BackendCollector(Collector):
    """Backend health, read from the registry when scraped."""

    def __init__(self, registry: Registry, spilling: Callable[[], dict[str, bool]],
                 limits: KeyLimits | None = None, key_names: Sequence[str] = (),
                 shared_up: Callable[[], bool] | None = None) -> None:
        self._registry = registry
        self._spilling = spilling
        self._limits = limits
        self._key_names = list(limits.with_budgets(key_names)) if limits is not None else []
        self._shared_up = shared_up

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "llmtap_router_backend_up",
            "1 when the backend can take requests: breaker closed, state fresh, model server up "
            "(cloud: key set, breaker closed, budget left)", labels=("backend",))
        in_flight = GaugeMetricFamily(
            "llmtap_router_backend_in_flight", "This router's unfinished requests per backend",
            labels=("backend",))
        budget = GaugeMetricFamily(
            "llmtap_router_cloud_budget_remaining",
            "Cloud budget left in the current period (currency units; absent: no budget)",
            labels=("backend",))
        spilling = GaugeMetricFamily(
            "llmtap_router_spilling",
            "1 while a hybrid route sends its light requests to the cloud (local overload)",
            labels=("route",))
        for sidecar in list(self._registry.sidecars.values()):
            candidate_up = (sidecar.breaker.state == CLOSED and sidecar.upstream_up
                            and sidecar.polled_at is not None)
            up.add_metric((sidecar.name,), 1.0 if candidate_up else 0.0)
            in_flight.add_metric((sidecar.name,), float(sum(sidecar.in_flight.values())))
        for cloud in self._registry.clouds.values():
            usable = cloud.unusable() in ("", "rate_limited")
            up.add_metric((cloud.name,), 1.0 if usable else 0.0)
            in_flight.add_metric((cloud.name,), float(cloud.in_flight))
            if (left := cloud.budget_left()) is not None:
                budget.add_metric((cloud.name,), left)
        for route, on in self._spilling().items():
            spilling.add_metric((route,), 1.0 if on else 0.0)
        yield up
        yield in_flight
        yield budget
        yield spilling
        yield from self._keys_and_shared()

    def _keys_and_shared(self) -> Iterator[GaugeMetricFamily]:
        if self._limits is not None and self._key_names:
            keys = GaugeMetricFamily(
                "llmtap_router_key_budget_remaining",
                "Cloud budget a client key has left today (currency units)", labels=("key",))
            for name in self._key_names:
                if (room := self._limits.budget_left(name)) is not None:
                    keys.add_metric((name,), room)
            yield keys
        if self._shared_up is not None:
            yield GaugeMetricFamily(
                "llmtap_router_shared_state_up",
                "1 when the shared state (Redis) answered the router's last call",
                value=1.0 if self._shared_up() else 0.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "llmtap_router_decisions",
            "Requests routed, by route, the backend that served them ('none': refused), the "
            "route's policy and the reason for the choice",
            ("route", "backend", "policy", "reason"), registry=registry)
        self.spills = Counter(
            "llmtap_router_spills",
            "Light requests sent to the cloud because the local fleet was over the route's "
            "TTFT SLO (or had no backend for them)", ("route", "backend"), registry=registry)
        self.classifications = Counter(
            "llmtap_router_classifications",
            "Requests classified, by route, label (light, heavy; local: kept by the "
            "keep-local gate, on any route) and reason (the gate's detector, the rule, "
            "model, plugin, rules, or the fallback's cause: timeout, error, overloaded)",
            ("route", "label", "reason"), registry=registry)
        self.retries = Counter(
            "llmtap_router_retries",
            "Requests re-sent to the next-best backend before any byte reached the client, by "
            "the backend that failed and why (connect, busy, timeout)", ("backend", "reason"),
            registry=registry)
        self.estimated_ttft = Histogram(
            "llmtap_router_estimated_ttft_seconds",
            "The policy's expected time to first token for the backend it chose",
            ("backend",), buckets=TTFT_BUCKETS, registry=registry)
        self.actual_ttft = Histogram(
            "llmtap_router_actual_ttft_seconds",
            "Measured time to first token of routed requests (arrival at the router to first "
            "token), beside the estimate", ("backend",), buckets=TTFT_BUCKETS, registry=registry)
        self.ttft_ratio = Histogram(
            "llmtap_router_ttft_estimate_ratio",
            "Actual / estimated time to first token per routed request: 1 is a perfect "
            "estimate", ("backend",), buckets=RATIO_BUCKETS, registry=registry)
        self.cloud_tokens = Counter(
            "llmtap_router_cloud_tokens",
            "Tokens sent to and received from cloud backends (server-reported, else counted "
            "or estimated)", ("backend", "type"), registry=registry)
        self.cloud_cost = Counter(
            "llmtap_router_cloud_cost",
            "Cloud spend from the configured prices (currency units)", ("backend",),
            registry=registry)
        self.key_cost = Counter(
            "llmtap_router_key_cost",
            "Cloud spend per client key (currency units; names from api_key_file)", ("key",),
            registry=registry)
        self.ejections = Counter(
            "llmtap_router_backend_ejections",
            "Times the circuit breaker took a backend out of rotation", ("backend",),
            registry=registry)

    def backend_known(self, name: str) -> None:
        """Start a backend's rare-event counters at 0, so their first increase shows in
        rate() and dashboards have a series before anything went wrong."""
        self.ejections.labels(name)
        for reason in ("connect", "busy"):
            self.retries.labels(name, reason)
