"""The router's accounting: an observer of every routed request, told when it finishes.

It settles what the decision started: the chosen backend's in-flight count and breaker, the
decision and spill counters, estimated against actual TTFT, and the cloud's tokens and cost;
then it writes the router's access-log line with the decision. The decision rides on the
request's record (`record.route`), put there by the routed upstream.
"""

from __future__ import annotations

import math

import structlog

from exporter.record import Outcome, RequestRecord
from exporter.relay.observers import Observer
from exporter.routing.classifier import LIGHT
from exporter.routing.decide import Decision, Target
from exporter.routing.metrics import RouterMetrics
from exporter.routing.spend import Cloud
from exporter.routing.upstream import judge
from exporter.state import ewma

access = structlog.get_logger("llmtap.router.access")

MAX_LOGGED_MODEL = 128
BROKEN = (Outcome.UPSTREAM_RESET, Outcome.TIMEOUT)


class RouterAccounting(Observer):
    def __init__(self, metrics: RouterMetrics, access_log: bool) -> None:
        self.metrics = metrics
        self.access_log = access_log

    def finished(self, record: RequestRecord) -> None:
        decision = record.route
        if not isinstance(decision, Decision):
            return  # refused before routing (body too large): the request metrics have it
        chosen = decision.chosen
        backend = chosen.backend if chosen is not None else "none"
        self.metrics.decisions.labels(decision.route, backend, decision.policy,
                                      decision.reason).inc()
        if (verdict := decision.classification) is not None:
            self.metrics.classifications.labels(decision.route, verdict.label,
                                                verdict.reason).inc()
        if chosen is not None:
            self._settle(chosen, record, decision)
        if self.access_log:
            self._log(record, decision, backend)

    def _settle(self, chosen: Target, record: RequestRecord, decision: Decision) -> None:
        chosen.finished()
        ttft = record.ttft if record.succeeded else None
        if record.outcome in BROKEN or record.outcome is Outcome.UPSTREAM_ERROR:
            chosen.breaker.failure()
        elif record.succeeded:
            chosen.breaker.success()
        elif record.outcome in (Outcome.CANCELLED, Outcome.CLIENT_TIMEOUT):
            chosen.breaker.released()  # the client left: the probe proved nothing
        else:
            judge(chosen, record.status, chosen.answer_headers)
        if ttft is not None:
            self.metrics.actual_ttft.labels(chosen.backend).observe(ttft)
            if chosen.estimate is not None and not math.isinf(chosen.estimate):
                self.metrics.estimated_ttft.labels(chosen.backend).observe(chosen.estimate)
                if chosen.estimate > 0:
                    self.metrics.ttft_ratio.labels(chosen.backend).observe(
                        ttft / chosen.estimate)
        if chosen.cloud is not None:
            self._charge(chosen, chosen.cloud, record, decision, ttft)
            if decision.klass == LIGHT or decision.reason in ("spill", "no_local"):
                self.metrics.spills.labels(decision.route, chosen.backend).inc()

    def _charge(self, target: Target, cloud: Cloud, record: RequestRecord,
                decision: Decision, ttft: float | None) -> None:
        # Server-reported tokens where the answer carried usage; else counted content chunks
        # and ~4 characters per prompt token, so the budget is never blind.
        tokens_in = record.input_tokens if record.input_tokens is not None else \
            decision.prompt_chars // 4
        tokens_out = record.output_token_count or 0
        cost = cloud.cost(tokens_in, tokens_out)
        if target.reservation is not None:  # the reservation becomes the real cost
            cloud.ledger.settle(target.reservation, cost)
        if record.key_name:
            self.metrics.key_cost.labels(record.key_name).inc(cost)
        self.metrics.cloud_tokens.labels(cloud.name, "input").inc(tokens_in)
        self.metrics.cloud_tokens.labels(cloud.name, "output").inc(tokens_out)
        self.metrics.cloud_cost.labels(cloud.name).inc(cost)
        if ttft is not None:
            cloud.ttft = ewma(cloud.ttft, ttft)

    @staticmethod
    def _log(record: RequestRecord, decision: Decision, backend: str) -> None:
        chosen = decision.chosen
        access.info(
            "route", method=record.method, path=record.path[:1024],
            model=record.request_model[:MAX_LOGGED_MODEL] or None,
            route=decision.route, policy=decision.policy, reason=decision.reason,
            **{"class": decision.klass}, local_only=decision.local_only or None,
            class_reason=decision.classification.reason if decision.classification else None,
            p_heavy=decision.classification.p_heavy if decision.classification else None,
            backend=backend, backend_model=chosen.model if chosen is not None else None,
            estimate_ms=_ms(chosen.estimate) if chosen is not None else None,
            alternatives=[t.backend for t in decision.targets[1:4]] or None,
            tried=decision.tried or None, status=record.status,
            error_type=record.error_type or None, stream=record.stream,
            ttft_ms=_ms(record.ttft), duration_ms=_ms(record.duration),
            tokens_in=record.input_tokens, tokens_out=record.output_token_count)


def _ms(seconds: float | None) -> float | None:
    if seconds is None or math.isinf(seconds):
        return None
    return round(seconds * 1000, 3)
