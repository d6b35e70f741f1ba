"""The router's Upstream: decide where the request goes, then try the plan in order.

A connect failure, or a 503 before any byte of the answer (Ollama's "server busy", llmtap's
queue limit; from a cloud also 429 and 5xx), goes to the next backend of the decision; once
a response head is accepted nothing is retried, so no client ever sees bytes from two
backends. A request for one of the router's own lists (`/v1/models`, `/api/tags`) is
answered by the router itself, through the same exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from exporter.relay.client import Origin, OutgoingRequest, ResponseSink, UpstreamPool
from exporter.relay.http1 import Headers
from exporter.relay.outcome import Refusal, Refused, UpstreamConnectError
from exporter.relay.upstream import UpstreamResponse
from exporter.routing.decide import Decider, Decision, Target
from exporter.routing.metrics import RouterMetrics
from exporter.routing.translate import OllamaFromOpenAI, TranslatedResponse, ollama_to_openai

if TYPE_CHECKING:
    from exporter.relay.exchange import Exchange

RESIDENCY_HEADER = b"x-llmtap-residency"
MAX_ATTEMPTS = 3  # first choice + two retries
MAX_SHOWN_MODEL = 128
BAD_RESIDENCY = Refusal(400, "invalid_request", "x-llmtap-residency takes local or any")
# Why a cloud declined a request at the last check (its reservation or rate limit), and what
# the client is told when nothing else could take it.
DECLINED = {
    "budget_exhausted": Refusal(429, "budget_exhausted", "the cloud budget for this period is "
                                "spent, and no local backend could take the request"),
    "key_budget_exhausted": Refusal(429, "budget_exhausted", "this API key has spent its "
                                    "daily cloud budget, and no local backend could take the "
                                    "request"),
    "rate_limited": Refusal(429, "rate_limited", "the cloud's rate limit is reached; retry "
                            "shortly", retry_after=1),
    "shared_state_down": Refusal(503, "no_backend_available", "the router cannot reach its "
                                 "shared state to check the cloud budget; retry later",
                                 retry_after=1),
}


class CloudDeclined(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def residency_local(value: bytes) -> bool | None:
    """The residency header, failing closed: True when any token of any instance (repeated
    fields arrive joined by commas) is `local`, whatever else is there, so a client cannot
    undo what a gateway appended; False for nothing or only `any`; None (a 400) for a value
    that says neither."""
    tokens = value.lower().replace(b";", b",").replace(b",", b" ").split()
    if b"local" in tokens:
        return True
    return False if all(token == b"any" for token in tokens) else None


def judge(target: Target, status: int, headers: Headers) -> None:
    """What an answer's status says of its backend, for its breaker: a 5xx is a failure
    (a 503 from a sidecar is a busy server, not a broken one); a cloud's 429 keeps it out
    for its Retry-After (or one cooldown) without calling it broken."""
    breaker = target.breaker
    if status == 429 and target.cloud is not None:
        breaker.cool_down(_retry_after(headers, breaker.spec.cooldown))
    elif status >= 500 and not (status == 503 and target.cloud is None):
        breaker.failure()
    elif status < 500:
        breaker.released()  # a probe answered by the client's own error proves little


def _retry_after(headers: Headers, default: float) -> float:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return float(value)
            except ValueError:
                return default  # an HTTP date: one cooldown is close enough
    return default


def _drop(target: Target, sent: bool = False) -> None:
    """An attempt that is not the answer: no longer in flight there, and a cloud's
    reservation settled free, unless the request may have been processed (a timeout, a
    reset, the client gone): then at its prompt, estimated."""
    target.finished()
    if target.cloud is None or target.reservation is None:
        return
    cost = target.cloud.cost(target.prompt_tokens, 0) if sent else 0.0
    target.cloud.ledger.settle(target.reservation, cost)


def tries(targets: list[Target]) -> list[Target]:
    """At most MAX_ATTEMPTS targets, keeping a cloud last resort that the limit would cut:
    with three local backends or more it was never reached."""
    if len(targets) <= MAX_ATTEMPTS:
        return targets
    resort = [t for t in targets[MAX_ATTEMPTS - 1:] if t.cloud is not None][:1]
    return targets[:MAX_ATTEMPTS - len(resort)] + resort


class LocalResponse:
    """An answer the router makes itself."""

    def __init__(self, payload: bytes, status: int = 200) -> None:
        self.status = status
        self.reason = b""
        self.headers: Headers = [(b"Content-Type", b"application/json"),
                                 (b"Content-Length", b"%d" % len(payload))]
        self._payload = payload

    def start(self, sink: ResponseSink) -> None:
        sink.body(self._payload)
        sink.end()

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def abandon(self) -> None:
        pass


class RoutedUpstream:
    kind: str | None = None  # many servers behind it: the provider label is the dialect's

    def __init__(self, decider: Decider, pool: UpstreamPool, metrics: RouterMetrics,
                 model_names: Callable[[], list[str]], attempt_timeout: float = 120.0) -> None:
        self.attempt_timeout = attempt_timeout
        self.decider = decider
        self.pool = pool
        self.metrics = metrics
        self.model_names = model_names
        self._origins: dict[str, Origin] = {}

    def model_resident(self, label: str) -> bool | None:
        return None

    async def close(self) -> None:
        await self.pool.close()

    async def open(self, exchange: Exchange) -> UpstreamResponse:
        request = exchange.request
        if request.method == "GET" and request.path in ("/v1/models", "/api/tags"):
            return LocalResponse(self._list(request.path))
        parsed = _json_object(exchange.payload) if exchange.endpoint is not None else None
        residency = residency_local(request.fields.get(RESIDENCY_HEADER, b""))
        if residency is None:
            raise Refused(BAD_RESIDENCY)
        key = exchange.record.key_name or None
        if (wait := await self.decider.limits.take(key)) > 0:
            raise Refused(Refusal(429, "rate_limited", f"API key {key!r} is over its rate "
                                  f"limit; retry in {wait:.1f} s",
                                  retry_after=max(1, math.ceil(wait))))
        # The classifier may await a model (under its deadline): here, before the synchronous
        # decision, which gets its verdict.
        classification = None
        model = exchange.info.model if exchange.info is not None else ""
        route = self.decider.config.route_for(model)
        if parsed is not None:
            classification = await self.decider.classifier.classify(parsed, request.path,
                                                                    route.hybrid)
        # The other replicas' sends of the model the fleet would serve, if counts are shared.
        await self.decider.backends.read_others(route.hybrid.light if route.hybrid else model)
        decision = self.decider.decide(request.path, exchange.endpoint, exchange.info, parsed,
                                       residency, key, len(exchange.payload or b""),
                                       classification=classification)
        exchange.record.route = decision
        if not decision.targets:
            raise Refused(self._refusal(decision, exchange.record.request_model))
        return await self._attempts(exchange, decision, parsed)

    async def _attempts(self, exchange: Exchange, decision: Decision,
                        parsed: dict[str, Any] | None) -> UpstreamResponse:
        failure: UpstreamConnectError | None = None
        declined = ""
        replayable = exchange.request.body.complete
        targets = tries(decision.targets)
        for i, target in enumerate(targets):
            if i and not replayable:
                break  # a streamed body cannot be sent twice
            last = i == len(targets) - 1
            # Counted from now, not from the answer's head: concurrent decisions must see
            # the requests this router has already sent there.
            target.started()
            try:
                response = await asyncio.wait_for(self._send(target, exchange, parsed),
                                                  None if last else self.attempt_timeout)
            except CloudDeclined as exc:
                # Its budget or rate limit said no at the last moment (another replica
                # spent it): nothing was sent; the next target gets the request.
                target.finished()
                declined = declined or exc.reason
                decision.tried.append(target.backend)
                continue
            except UpstreamConnectError as exc:
                _drop(target)
                target.breaker.failure(liveness=True)  # unreachable, like a failed poll
                failure = exc
                decision.tried.append(target.backend)
                if not last:
                    self.metrics.retries.labels(target.backend, "connect").inc()
                continue
            except TimeoutError:
                # No answer's head within attempt_timeout: hung, or loading for too long.
                # Its connection is closed (its sidecar cancels the work); the next one gets
                # the request. The last attempt keeps the exchange's own first-byte deadline.
                _drop(target, sent=True)
                target.breaker.failure()
                decision.tried.append(target.backend)
                self.metrics.retries.labels(target.backend, "timeout").inc()
                continue
            except BaseException:  # reset (it may have reached the backend), cancelled
                _drop(target, sent=True)
                raise
            if self._retryable(target, response) and not last:
                # Nothing of this answer was relayed: the next backend gets the request.
                response.abandon()
                _drop(target)  # an error answer is not billed
                judge(target, response.status, response.headers)
                decision.tried.append(target.backend)
                self.metrics.retries.labels(target.backend, "busy").inc()
                continue
            decision.chosen = target
            target.answer_headers = response.headers  # a final 429's Retry-After, for judge
            return response
        if failure is None and declined:
            decision.reason = declined
            raise Refused(DECLINED[declined])
        if failure is None:  # attempts timed out, and the body cannot be sent again
            raise TimeoutError("no backend answered within attempt_timeout")
        raise failure

    @staticmethod
    def _retryable(target: Target, response: UpstreamResponse) -> bool:
        """Safe to send elsewhere, before any byte: busy (503; a cloud's 429), or failing
        (5xx: a sidecar's 502 says its model server cannot be reached)."""
        status = response.status
        return status >= 500 or (target.cloud is not None and status == 429)

    def _origin(self, url: str) -> Origin:
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = Origin.from_url(url)
        return origin

    async def _send(self, target: Target, exchange: Exchange,
                    parsed: dict[str, Any] | None) -> UpstreamResponse:
        if target.sidecar is not None:
            outgoing = exchange.outgoing()
            if parsed is not None and target.model and parsed.get("model") != target.model:
                # A hybrid alias ("auto") becomes the local model's name.
                outgoing.body = orjson.dumps({**parsed, "model": target.model})
            return await self.pool.request(self._origin(target.sidecar.proxy_url), outgoing)
        cloud = target.cloud
        assert cloud is not None and parsed is not None and exchange.endpoint is not None
        admitted = await cloud.admit(target.max_cost, target.key_budget)
        if admitted.reservation is None:
            raise CloudDeclined(admitted.declined)
        target.reservation = admitted.reservation
        headers: Headers = [(b"Authorization", b"Bearer " + cloud.spec.api_key.encode()),
                            (b"Content-Type", b"application/json")]
        origin = self._origin(cloud.spec.base_url)
        path = exchange.request.path
        if exchange.endpoint.dialect == "ollama":
            translated = ollama_to_openai(path, parsed, target.model)
            inner = await self.pool.request(origin, OutgoingRequest(
                b"POST", b"/chat/completions", headers, orjson.dumps(translated)))
            translator = OllamaFromOpenAI(path == "/api/chat", str(parsed.get("model") or ""),
                                          int(exchange.record.arrival * 1e9))
            return TranslatedResponse(inner, translator, bool(translated["stream"]))
        # OpenAI dialect: the same request, the provider's model name, the cloud's key.
        suffix = exchange.request.target.removeprefix(b"/v1")
        return await self.pool.request(origin, OutgoingRequest(
            exchange.request.method.encode(), suffix, headers,
            orjson.dumps({**parsed, "model": target.model})))

    def _refusal(self, decision: Decision, model: str) -> Refusal:
        if (declined := DECLINED.get(decision.reason)) is not None:
            return declined  # only the cloud could serve it, and its budget said no
        shown = model[:MAX_SHOWN_MODEL]
        backends = self.decider.backends
        if not backends.sidecars and not backends.clouds:
            return Refusal(503, "no_backend", "the router has no backends")
        known = any(c.has_model is not False for c in backends.candidates(shown))
        if not known and self.decider.config.cloud_for(model) is None and \
                decision.reason != "passthrough":
            return Refusal(404, "model_not_found",
                           f"model {shown!r} is not served by any backend of this router")
        where = "local backend (the request is local-only)" if decision.local_only else \
            "backend"
        return Refusal(503, "no_backend_available", f"no {where} is available for model "
                       f"{shown!r} right now (all ejected, down or without fresh state); "
                       "retry later")

    def _list(self, path: str) -> bytes:
        names = self.model_names()
        if path == "/v1/models":
            return orjson.dumps({"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "llmtap"}
                for name in names]})
        return orjson.dumps({"models": [
            {"name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0,
             "digest": "", "details": {}} for name in names]})


def _json_object(body: bytes | None) -> dict[str, Any] | None:
    if not body:
        return None
    with contextlib.suppress(orjson.JSONDecodeError):
        obj = orjson.loads(body)
        return obj if isinstance(obj, dict) else None
    return None
