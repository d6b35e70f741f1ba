"""How the router decides where a request goes: the route, its class, the ranked backends.

The route for the requested model names a policy and maybe a hybrid rule; the classifier
labels the request light or heavy; the policy ranks the local sidecars from their polled
state plus this router's own counts; a heavy request, or a light one while the best local
expected TTFT is over the route's SLO (with hysteresis), goes to the cloud unless the request
must stay local or the cloud cannot take it (no key, ejected, budget spent, rate limited):
then it queues locally. A `Decision` is the plan: targets in the order to try them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import structlog

from exporter.events import RequestInfo
from exporter.protocols import Endpoint
from exporter.relay.http1 import Headers
from exporter.routing.classifier import (
    HEAVY,
    LIGHT,
    LOCAL,
    Classification,
    load_cascade,
    prompt_text,
    requested_max_tokens,
)
from exporter.routing.config import RouterConfig, RouteSpec
from exporter.routing.ledger import Budget, Reservation
from exporter.routing.policies import (
    POLICIES,
    Policy,
    RequestTraits,
    expected_ttft,
    fleet_ttfts,
)
from exporter.routing.registry import Breaker, Registry, Sidecar
from exporter.routing.spend import LIMITS, Cloud, KeyLimits
from exporter.routing.translate import OLLAMA_PATHS

log = structlog.get_logger("llmtap.router")


@dataclass(slots=True)
class Target:
    backend: str
    model: str  # the name sent there (a hybrid alias becomes the local or cloud model)
    sidecar: Sidecar | None = None
    cloud: Cloud | None = None
    estimate: float | None = None  # expected TTFT, seconds
    # A cloud target: what it may cost at most, the key's budget it also draws on, and
    # what was reserved for it when it was sent (settled when the request ends).
    max_cost: float = 0.0
    prompt_tokens: int = 0  # estimated (~4 characters a token), for what an abandoned try cost
    key_budget: Budget | None = None
    reservation: Reservation | None = None
    answer_headers: Headers = field(default_factory=list)  # the chosen answer's head

    def started(self) -> None:
        if self.sidecar is not None:
            self.sidecar.started(self.model)
            self.sidecar.breaker.dispatched()
        elif self.cloud is not None:
            self.cloud.in_flight += 1
            self.cloud.breaker.dispatched()

    def finished(self) -> None:
        if self.sidecar is not None:
            self.sidecar.finished(self.model)
        elif self.cloud is not None:
            self.cloud.in_flight -= 1

    @property
    def breaker(self) -> Breaker:
        if self.sidecar is not None:
            return self.sidecar.breaker
        assert self.cloud is not None
        return self.cloud.breaker


@dataclass(slots=True)
class Decision:
    route: str
    policy: str
    reason: str
    klass: str | None = None  # "light" / "heavy" on hybrid routes ("local": kept by the gate)
    classification: Classification | None = None  # the classifier's verdict, where it ran
    local_only: bool = False
    targets: list[Target] = field(default_factory=list)
    chosen: Target | None = None
    tried: list[str] = field(default_factory=list)  # backends that failed before the answer
    prompt_chars: int = 0


class Decider:
    """The router's decisions, from its config and the backends' state."""

    def __init__(self, config: RouterConfig, backends: Registry,
                 limits: KeyLimits | None = None) -> None:
        self.config = config
        self.backends = backends
        self.limits = limits if limits is not None else KeyLimits({}, backends.ledger)
        self.classifier = load_cascade(config)
        self.policies: dict[str, Policy] = {}
        self.rng = random.Random()
        self.spilling: dict[str, bool] = {}

    def _policy(self, route: RouteSpec) -> Policy:
        # One instance per route: round robin keeps its rotation per route.
        policy = self.policies.get(route.model)
        if policy is None:
            policy = self.policies[route.model] = POLICIES[route.policy]()
        return policy

    def decide(self, path: str, endpoint: Endpoint | None, info: RequestInfo | None,
               body: dict[str, Any] | None, residency_local: bool, key: str | None = None,
               body_size: int = 0, classification: Classification | None = None) -> Decision:
        """The plan for one request; `key` names the client key that admitted it (its
        budget counts for the cloud), `body_size` bounds its prompt's tokens;
        `classification` is the classifier's verdict (RoutedUpstream.open awaits it; without
        one, the gate and the rules run here). The keep-local gate's `local` makes the
        request local-only, like the header."""
        model = info.model if info is not None else ""
        route = self.config.route_for(model)
        if classification is None and body is not None:
            classification = self.classifier.quick(body, route.hybrid)
        local_only = residency_local or route.residency == "local" or (
            classification is not None and classification.label == LOCAL)
        decision = Decision(route.model, route.policy, "policy", local_only=local_only,
                            classification=classification)
        if endpoint is None:
            return self._passthrough(decision)
        if body is not None:
            decision.prompt_chars = len(prompt_text(body))
        hybrid = route.hybrid
        if hybrid is not None:
            decision.klass = classification.label if classification is not None else LIGHT
            local_model, cloud_alias = hybrid.light, hybrid.heavy
        else:
            local_model = model
            cloud_alias = model if self.config.cloud_for(model) is not None else ""
        # The work queued ahead is other requests': this one's max_tokens does not delay its
        # first token, so it is not in the estimate; its prompt's length is (characters / 4).
        traits = RequestTraits(model=local_model,
                               expected_output_tokens=self.config.expected_output_tokens,
                               prompt_tokens=decision.prompt_chars // 4 if body is not None
                               else None)
        sidecars = self.backends.sidecars
        candidates = [c for c in self.backends.candidates(local_model)
                      if c.healthy and c.has_model is not False
                      and _speaks(sidecars[c.backend].kind, endpoint.dialect)]
        ranked = self._policy(route).rank(candidates, traits, self.rng)
        # The estimate logged and measured against the actual TTFT is the one the ranking
        # used (with the fleet's figures for what a backend has not measured yet).
        local = [Target(c.backend, local_model, sidecar=self.backends.sidecars[c.backend],
                        estimate=e) for c, e in zip(ranked, fleet_ttfts(ranked, traits),
                                                    strict=True)]
        # Overload is queueing: a cold load does not count here, or a model that was not
        # resident would see every request spill and never be loaded.
        # The spill state is the route's: it judges the fleet, not this request, so it comes
        # from a typical request's E[TTFT] (no max_tokens, no prompt length of its own).
        typical = RequestTraits(model=local_model,
                                expected_output_tokens=self.config.expected_output_tokens)
        best = min(fleet_ttfts(ranked, typical, loads=False), default=math.inf)
        cloud_target, why_not = self._cloud_target(
            cloud_alias, path, endpoint, body, local_only,
            Spender(key, body_size or decision.prompt_chars, decision.prompt_chars,
                    _asked_tokens(info, body)))
        if hybrid is not None:
            spilling = self._spill_state(route.model, best, hybrid.slo_ttft,
                                         hybrid.hysteresis)
            # A request the gate keeps ("local") counts as wanting the cloud: its reason is
            # then local_only, whatever its class would have been.
            wants_cloud = decision.klass != LIGHT or spilling or not local
            if wants_cloud and cloud_target is not None:
                decision.reason = "heavy" if decision.klass == HEAVY else \
                    "spill" if local else "no_local"
                decision.targets = [cloud_target, *local]
            else:
                decision.reason = "light" if not wants_cloud else why_not
                decision.targets = local
                if cloud_target is not None:
                    decision.targets.append(cloud_target)  # the local fleet failing: last resort
        elif cloud_target is not None and not any(c.has_model for c in ranked):
            decision.reason = "cloud_model"
            decision.targets = [cloud_target, *local]
        else:
            decision.reason = "policy" if local else why_not if cloud_alias else "no_backend"
            decision.targets = local
        if not decision.targets and decision.reason not in LIMITS:
            decision.reason = "no_backend"  # (a spent budget says so: the client is told)
        return decision

    def _cloud_target(self, alias: str, path: str, endpoint: Endpoint, body: Any,
                      local_only: bool, spender: Spender) -> tuple[Target | None, str]:
        """The cloud target for a model alias, or why there is none (a reason label)."""
        spec = self.config.cloud_for(alias) if alias else None
        if spec is None:
            return None, "no_cloud"
        if local_only:
            return None, "local_only"
        # The cloud speaks OpenAI's API; Ollama's chat and generate are translated.
        if body is None or not (endpoint.dialect == "openai" or path in OLLAMA_PATHS):
            return None, "not_translatable"
        cloud = self.backends.clouds[spec.name]
        need = cloud.max_cost(spender.body_size, spender.max_tokens)
        key_budget = self.limits.budget(spender.key)
        if why := cloud.unusable(need, key_budget):
            return None, why
        return Target(cloud.name, spec.models[alias], cloud=cloud,
                      estimate=expected_ttft(cloud.candidate(), RequestTraits(alias)),
                      max_cost=need, prompt_tokens=spender.prompt_chars // 4,
                      key_budget=key_budget), ""

    def _spill_state(self, route: str, best: float, slo: float, hysteresis: float) -> bool:
        """Spill once the best local E[TTFT] passes the SLO; stop only when it is back under
        SLO x (1 - hysteresis), so a fleet hovering at the SLO does not flap."""
        spilling = self.spilling.get(route, False)
        if not spilling and best > slo:
            spilling = True
            log.info("local fleet over its TTFT SLO: spilling to the cloud", route=route,
                     expected_ttft_s=round(best, 3), slo_s=slo)
        elif spilling and best < slo * (1 - hysteresis):
            spilling = False
            log.info("local fleet back under its TTFT SLO", route=route,
                     expected_ttft_s=round(best, 3), slo_s=slo)
        self.spilling[route] = spilling
        return spilling

    def _passthrough(self, decision: Decision) -> Decision:
        """Paths no dialect observes (/api/version, /api/show, ...): any healthy sidecar."""
        decision.reason = "passthrough"
        sidecars = [s for s in self.backends.sidecars.values()
                    if s.breaker.eligible() and s.upstream_up]
        sidecars.sort(key=lambda s: sum(s.in_flight.values()))
        decision.targets = [Target(s.name, "", sidecar=s) for s in sidecars]
        return decision


@dataclass(frozen=True, slots=True)
class Spender:
    """Who asks the cloud, and the most the request may use."""

    key: str | None  # the client key's name
    body_size: int  # bytes: a bound on the prompt's tokens
    prompt_chars: int
    max_tokens: int | None  # output tokens asked for, if the request says


def _asked_tokens(info: RequestInfo | None, body: dict[str, Any] | None) -> int | None:
    if info is not None and info.max_tokens:
        return info.max_tokens
    return requested_max_tokens(body) if body is not None else None


def _speaks(kind: str | None, dialect: str) -> bool:
    """Can a sidecar's server answer this dialect? Every kind serves OpenAI's API; Ollama's
    and llama.cpp's native APIs only their own servers (unknown kind: let it try)."""
    return kind is None or dialect == "openai" or kind == dialect
