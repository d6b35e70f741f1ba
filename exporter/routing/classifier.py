"""Where a request may go, and whether it needs the cloud: the router's classification.

A cascade, cheapest first; each step may settle the request:
1. the keep-local gate (every route): a secret or personal data in the request makes it
   `local`: local-only, whatever the route says (exporter/routing/keep_local.py);
2. on hybrid routes, the rules (exporter/routing/rules.py): code or a reasoning request in
   the last turn, or a very long prompt, make it `heavy`;
3. then the learned model (`classifier.model`, exporter/routing/learned.py) or a plugin
   (`classifier.plugin: package.module:callable`) gives p(heavy); without either, `light`.

Step 3 runs under a deadline (`classifier.deadline`, 50 ms): a model or plugin that is slow
or raises costs the request at most the deadline, and the request gets the route's
`fallback` (light: local is the safe answer), counted by reason in
`llmtap_router_classifications_total{route, label, reason}`. A plugin may be a coroutine
function or a plain one (run on the classifier's own two threads, so a slow one never
holds the event loop), called with the request's JSON body and its path, returning "light" or
"heavy", a (label, p_heavy) pair, or a Classification.

The router classifies in RoutedUpstream.open (async) and hands the result to the
synchronous Decider.decide. `decide` called without one (tests, the benchmark) runs steps 1
and 2 itself, so the gate holds on every path.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from exporter.config import ConfigError
from exporter.routing.classification import HEAVY, LIGHT, LOCAL, Classification
from exporter.routing.config import ClassifierSpec, HybridSpec, RouterConfig, Target
from exporter.routing.keep_local import KeepLocalGate
from exporter.routing.rules import Rules, requested_max_tokens
from exporter.routing.threads import Saturated, Threads
from exporter.routing.turns import every_string, prompt_text

__all__ = ["HEAVY", "LIGHT", "LOCAL", "Cascade", "Classification", "load_cascade",
           "prompt_text", "requested_max_tokens"]

log = structlog.get_logger("llmtap.router")

GATE_INLINE_CHARS = 32_768  # a bigger body is scanned on a thread (1 MiB: ~0.3 s of regexes)


class Classifier(Protocol):
    async def classify(self, body: dict[str, Any], path: str) -> Classification: ...


class Plugin:
    """A user's callable, sync or async, wrapped into the Classifier interface."""

    def __init__(self, target: Callable[..., Any], threads: Threads) -> None:
        self.target = target
        self.threads = threads
        # An async function, or an object whose __call__ is one.
        self.is_async = inspect.iscoroutinefunction(target) or \
            inspect.iscoroutinefunction(type(target).__call__)

    async def classify(self, body: dict[str, Any], path: str) -> Classification:
        if self.is_async:
            answer = await self.target(body, path)
        else:
            answer = await self.threads.run(self.target, body, path)
        return as_classification(answer, "plugin")


def as_classification(answer: Any, reason: str) -> Classification:
    """A plugin's answer, whatever form it took; nonsense is light."""
    if isinstance(answer, Classification):
        label, p = answer.label, answer.p_heavy
    elif isinstance(answer, tuple) and len(answer) == 2:
        label, p = answer
    else:
        label, p = answer, None
    p_heavy = float(p) if isinstance(p, int | float) and not isinstance(p, bool) else None
    return Classification(HEAVY if label == HEAVY else LIGHT, p_heavy, reason)


class Cascade:
    """Gate, rules, then a model or plugin under a deadline."""

    def __init__(self, spec: ClassifierSpec, gate: KeepLocalGate,
                 model: Classifier | None = None) -> None:
        self.spec = spec
        self.gate = gate
        self.rules = Rules(spec) if spec.rules else None
        self.model = model
        self.thresholds: dict[Target, float] = {}

    async def close(self) -> None:
        """Let go of what the model holds (a server embedder's connections)."""
        closer = getattr(self.model, "close", None)
        if closer is not None and inspect.iscoroutinefunction(closer):
            await closer()

    def quick(self, body: dict[str, Any], hybrid: HybridSpec | None) -> Classification | None:
        """Steps 1 and 2, synchronously (what decide() runs when it was given nothing)."""
        if found := self.gate.check(every_string(body)):
            return Classification(LOCAL, None, found)
        if hybrid is None:
            return None
        if self.rules is not None and (rule := self.rules(body)):
            return Classification(HEAVY, None, rule)
        return Classification(LIGHT, None, "rules")

    async def classify(self, body: dict[str, Any], path: str,
                       hybrid: HybridSpec | None) -> Classification | None:
        """The cascade: None on a non-hybrid route the gate let through (nothing to say)."""
        text = every_string(body)
        if len(text) > GATE_INLINE_CHARS:
            found = await asyncio.to_thread(self.gate.check, text)
        else:
            found = self.gate.check(text)
        if found:
            return Classification(LOCAL, None, found)
        if hybrid is None:
            return None
        if self.rules is not None and (rule := self.rules(body)):
            return Classification(HEAVY, None, rule)
        if self.model is None:
            return Classification(LIGHT, None, "rules")
        verdict = await self._within_deadline(self.model.classify(body, path),
                                              hybrid.fallback)
        if hybrid.target is not None and verdict.p_heavy is not None:
            # This route's own cut: a threshold, or a cloud share or quality target that
            # the model's calibration turned into one (when the cascade was loaded).
            heavy = verdict.p_heavy >= self.threshold_for(hybrid.target)
            verdict = Classification(HEAVY if heavy else LIGHT, verdict.p_heavy,
                                     verdict.reason)
        return verdict

    def threshold_for(self, target: Target) -> float:
        """A route's target as a p(heavy) threshold (computed once per target)."""
        if (known := self.thresholds.get(target)) is not None:
            return known
        finder = getattr(self.model, "threshold_for", None)
        if finder is not None:
            threshold = float(finder(target))
        elif target.kind == "threshold":
            threshold = target.value
        else:  # parse_config refuses this; a Cascade built by hand might not
            raise ConfigError(f"a {target.kind} target needs a learned model's calibration")
        self.thresholds[target] = threshold
        return threshold

    async def _within_deadline(self, call: Awaitable[Classification],
                               fallback: str) -> Classification:
        try:
            return await asyncio.wait_for(call, self.spec.deadline)
        except TimeoutError:
            return Classification(fallback, None, "timeout")
        except Saturated:
            return Classification(fallback, None, "overloaded")
        except Exception as exc:
            log.warning("classifier failed: the request gets the route's fallback",
                        error=f"{type(exc).__name__}: {exc}"[:300], fallback=fallback)
            return Classification(fallback, None, "error")


def _import(dotted: str, key: str) -> Any:
    module_name, sep, attr = dotted.partition(":")
    if not sep:
        module_name, _, attr = dotted.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load {dotted!r}: {exc}") from None
    if not callable(target):
        raise ConfigError(f"{key}: {dotted!r} is not callable")
    return target


def load_cascade(config: RouterConfig) -> Cascade:
    """The configured cascade. A learned model is loaded here, at startup (its embedding
    model too: the first request must not pay for it), and only when configured: the router
    without one never imports numpy or the embedding model."""
    spec = config.classifier
    gate = KeepLocalGate(config.keep_local)
    threads = Threads()  # threads are started on first use only
    model: Classifier | None = None
    if spec.plugin:
        model = Plugin(_import(spec.plugin, "classifier.plugin"), threads)
    elif spec.model:
        from exporter.routing.learned import LearnedClassifier

        model = LearnedClassifier.from_spec(spec, threads)
    cascade = Cascade(spec, gate, model)
    for i, route in enumerate(config.routes):  # every route's target, checked at startup
        if route.hybrid is not None and route.hybrid.target is not None:
            try:
                cascade.threshold_for(route.hybrid.target)
            except ConfigError as exc:
                raise ConfigError(f"routes[{i}].hybrid.{exc}") from None
    return cascade
