"""The backends the router can send to: sidecars (static or found in DNS) and cloud APIs.

Each sidecar's `/llmtap/v1/state` is polled on its own task (a slow sidecar delays nobody
else's poll); between polls the router counts its own requests there, so a burst does not all
go to the backend that looked idle half a second ago. With shared state, the other router
replicas' counts are read before each decision (routing/shared_counts.py), so replicas count
each other's sends too. A circuit breaker per backend ejects one that keeps failing requests
or polls and lets it back after a successful probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import structlog

from exporter.models import tagged
from exporter.routing.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, EjectionBoard
from exporter.routing.config import DnsSpec, RouterConfig
from exporter.routing.ledger import Ledger, MemoryLedger
from exporter.routing.policies import Candidate, server_parallel
from exporter.routing.shared_counts import Counts, SharedInFlight, per_backend
from exporter.routing.spend import Cloud

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breaker", "Registry", "Sidecar"]

log = structlog.get_logger("llmtap.router")

def _stem(name: str) -> str:
    """llama-server's id for a model file is its path: /models/phi-3.gguf answers to phi-3."""
    return name.rpartition("/")[2].removesuffix(".gguf")


def _lookup(models: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = models.get(name)
    if entry is None and name:
        entry = models.get(tagged(name))  # Ollama's tagged name for the same model
    return entry if isinstance(entry, dict) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


class Sidecar:
    """One llmtap sidecar as the router sees it."""

    def __init__(self, name: str, proxy_url: str, admin_url: str, parallel: int | None,
                 breaker: Breaker, aliases: tuple[str, ...] = (),
                 shared: SharedInFlight | None = None) -> None:
        self.name = name
        self.proxy_url = proxy_url.rstrip("/")
        self.admin_url = admin_url.rstrip("/")
        self.parallel = parallel
        self.breaker = breaker
        self.aliases = frozenset(aliases)  # other names a llama-server answers to
        self.state: dict[str, Any] | None = None
        self.polled_at: float | None = None  # monotonic time of the last good poll
        self.poll_failures = 0
        # This router's unfinished requests per model, and what it sent since the last poll.
        self.in_flight: dict[str, int] = {}
        self.in_flight_at_poll: dict[str, int] = {}
        self.sent_since_poll: dict[str, int] = {}
        # The other router replicas' requests in flight here per model, now (read before each
        # decision) and at the last poll; None: not shared, or the read failed.
        self.shared = shared
        self.others: dict[str, int] | None = None
        self.others_at_poll: dict[str, int] | None = None

    @property
    def kind(self) -> str | None:
        upstream = (self.state or {}).get("upstream") or {}
        return upstream.get("kind")

    @property
    def upstream_up(self) -> bool:
        upstream = (self.state or {}).get("upstream") or {}
        return bool(upstream.get("up"))

    def models(self) -> list[str]:
        """Models its server has (its inventory), for /v1/models and the label allow-list."""
        upstream = (self.state or {}).get("upstream") or {}
        names = upstream.get("models")
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    def entry(self, model: str) -> tuple[dict[str, Any] | None, bool | None]:
        """The sidecar's state for `model` and whether its server has it (None: unknown)."""
        models = (self.state or {}).get("models") or {}
        if self.kind == "llama.cpp":
            # llama-server answers any model name with its own model: it gets only requests
            # that name no model (its native API), or its own name(s), or a configured alias.
            served = self.models()
            entry = _lookup(models, served[0] if len(served) == 1 else model)
            return entry, not model or model in self.aliases or any(
                model in (name, _stem(name)) for name in served)
        entry = _lookup(models, model)
        inventory = ((self.state or {}).get("upstream") or {}).get("models")
        if entry is not None and entry.get("installed") is not None:
            return entry, bool(entry["installed"])
        if isinstance(inventory, list):
            return entry, False
        return entry, None

    def candidate(self, model: str, now: float, stale_after: float) -> Candidate:
        entry, has_model = self.entry(model)
        entry = entry or {}
        ewma = entry.get("ewma") or {}
        loaded = entry.get("loaded")
        if self.kind == "llama.cpp":
            loaded = True  # its one model is resident while the server is up
        parallel = self.parallel
        if parallel is None:  # llama-server's slots, vLLM's batch, else 1
            queue = ((self.state or {}).get("upstream") or {}).get("queue") or {}
            parallel = server_parallel(self.kind, queue)
        # Shared counts make "this router" all the replicas, now and at the poll; without
        # both readings the others' sends are estimated (policies.py).
        others_now = others_then = 0
        if self.others is not None and self.others_at_poll is not None:
            others_now = self.others.get(model, 0)
            others_then = self.others_at_poll.get(model, 0)
        return Candidate(
            backend=self.name,
            healthy=self.breaker.eligible() and (self.state is None or self.upstream_up),
            stale=self.polled_at is None or now - self.polled_at > stale_after,
            has_model=has_model,
            loaded=loaded if isinstance(loaded, bool) else None,
            waiting=int(entry.get("waiting") or 0),
            in_flight=int(entry.get("in_flight") or 0),
            router_in_flight=self.in_flight.get(model, 0) + others_now,
            router_sent_since_poll=self.sent_since_poll.get(model, 0),
            ttft=_number(ewma.get("ttft_seconds")),
            tpot=_number(ewma.get("tpot_seconds")),
            load_seconds=_number(ewma.get("load_seconds")),
            parallel=parallel,
            router_in_flight_at_poll=self.in_flight_at_poll.get(model, 0) + others_then
            if self.polled_at is not None else None,
            service=_number(ewma.get("service_seconds")),
            prefill=_number(ewma.get("prefill_seconds")),
            prefill_per_token=_number(ewma.get("prefill_seconds_per_token")),
            arrival_rate=_number(entry.get("arrival_rate")),
            state_age=0.0 if self.polled_at is None else max(0.0, now - self.polled_at),
        )

    def started(self, model: str) -> None:
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        self.sent_since_poll[model] = self.sent_since_poll.get(model, 0) + 1
        if self.shared is not None:
            self.shared.add(self.name, model, 1)

    def finished(self, model: str) -> None:
        left = self.in_flight.get(model, 0) - 1
        self.in_flight[model] = max(left, 0)
        if self.shared is not None and left >= 0:
            self.shared.add(self.name, model, -1)

    def polled(self, state: dict[str, Any], now: float) -> None:
        self.state = state
        self.polled_at = now
        self.poll_failures = 0
        self.in_flight_at_poll = dict(self.in_flight)
        self.sent_since_poll = {}

    def saw_others(self, mine: dict[str, int] | None, model: str | None = None) -> None:
        """The other replicas' counts here per model (None: unknown), read now: for one model
        before a decision, for every model right after this sidecar's poll (`model` None)."""
        if model is None:
            self.others_at_poll = mine
            self.others = None if mine is None else dict(mine)  # updated per decision
        elif mine is None or self.others is None:
            self.others = mine
        else:  # this model's figure now, the others' as last read
            self.others[model] = mine.get(model, 0)

    def describe(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "proxy_url": self.proxy_url, "admin_url": self.admin_url,
                "kind": self.kind, "upstream_up": self.upstream_up,
                "breaker": self.breaker.state, "ejections": self.breaker.ejections,
                "state_age_s": None if self.polled_at is None else round(now - self.polled_at, 3),
                "router_in_flight": {m: n for m, n in self.in_flight.items() if n},
                "models": self.models()}


def _url(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"{scheme}://{host}:{port}"


Resolver = Callable[[str], Any]  # async: host -> list of addresses


class Registry:
    """All backends, the pollers that keep sidecar state fresh, and DNS discovery."""

    def __init__(self, config: RouterConfig,
                 on_eject: Callable[[str], None] = lambda name: None,
                 on_change: Callable[[], None] = lambda: None,
                 resolver: Resolver | None = None,
                 on_added: Callable[[str], None] = lambda name: None,
                 ledger: Ledger | None = None, board: EjectionBoard | None = None,
                 shared: Callable[[Callable[[], Counts]], SharedInFlight] | None = None
                 ) -> None:
        self.config = config
        # The replicas' shared in-flight counts, if shared state is on: made here, since it
        # writes this registry's counts.
        self.shared = shared(self.own_counts) if shared is not None else None
        self.ledger: Ledger = ledger if ledger is not None else MemoryLedger()
        self.board = board  # ejections shared with the other replicas, if any
        self.sidecars: dict[str, Sidecar] = {}
        self.clouds: dict[str, Cloud] = {}
        self._on_eject = on_eject
        self._on_change = on_change  # the set of backends or their models changed
        self._on_added = on_added
        self._resolver = resolver or self._resolve
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._known_models: frozenset[str] = frozenset()
        for spec in config.backends:
            self._add(spec.name, spec.proxy_url, spec.admin_url, spec.parallel, spec.aliases)
        for cloud in config.cloud:
            self.clouds[cloud.name] = Cloud(cloud, self._breaker(cloud.name), self.ledger)
            on_added(cloud.name)

    def _breaker(self, name: str) -> Breaker:
        if self.board is not None:
            self.board.track(name)
        return Breaker(self.config.breaker, on_open=lambda: self._ejected(name), name=name,
                       board=self.board)

    def _ejected(self, name: str) -> None:
        log.warning("backend ejected by the circuit breaker", backend=name)
        self._on_eject(name)

    def _add(self, name: str, proxy_url: str, admin_url: str, parallel: int | None,
             aliases: tuple[str, ...] = ()) -> Sidecar:
        sidecar = Sidecar(name, proxy_url, admin_url, parallel, self._breaker(name), aliases,
                          self.shared)
        self.sidecars[name] = sidecar
        self._on_added(name)
        if self._session is not None:  # found by DNS after start: poll it right away
            self._pollers[name] = asyncio.create_task(self._poll_loop(sidecar), name=name)
        return sidecar

    async def start(self) -> None:
        poll_timeout = max(1.0, 2 * self.config.poll_interval)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=poll_timeout, sock_connect=poll_timeout))
        # One poll of everything before serving: the first requests already see real state.
        for spec in self.config.dns:
            await self.refresh_dns(spec)
        if self.shared is not None:
            await self.shared.start()
        await asyncio.gather(*(self.poll(s) for s in list(self.sidecars.values())))
        self._note_models()
        for sidecar in list(self.sidecars.values()):
            if sidecar.name not in self._pollers:  # DNS-found ones already have theirs
                self._pollers[sidecar.name] = asyncio.create_task(self._poll_loop(sidecar),
                                                                  name=sidecar.name)
        self._tasks = [asyncio.create_task(self._dns_loop(spec)) for spec in self.config.dns]

    async def close(self) -> None:
        for task in [*self._tasks, *self._pollers.values()]:
            task.cancel()
        for task in [*self._tasks, *self._pollers.values()]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
        if self.shared is not None:
            await self.shared.close()

    async def poll(self, sidecar: Sidecar) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(sidecar.admin_url + "/llmtap/v1/state") as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
            state = orjson.loads(body)
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            sidecar.poll_failures += 1
            if sidecar.poll_failures == 1:
                log.warning("cannot read sidecar state", backend=sidecar.name, error=str(exc))
            sidecar.breaker.failure(liveness=True)
            return False
        sidecar.polled(state, time.monotonic())
        if self.shared is not None:
            counts = await self.shared.others(backend=sidecar.name)
            sidecar.saw_others(None if counts is None else
                               {model: n for (_, model), n in counts.items()})
        # A sidecar that went unreachable is back when it answers again, once its cooldown
        # is over; one that failing answers ejected waits for a request probe (its admin
        # port answering says nothing of its requests).
        sidecar.breaker.success(liveness=True)
        return True

    async def _poll_loop(self, sidecar: Sidecar) -> None:
        interval = self.config.poll_interval
        while True:
            started = time.monotonic()
            await self.poll(sidecar)
            self._note_models()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _note_models(self) -> None:
        models = frozenset(m for s in self.sidecars.values() for m in s.models())
        if models != self._known_models:
            self._known_models = models
            self._on_change()

    @property
    def known_models(self) -> frozenset[str]:
        return self._known_models

    async def _resolve(self, host: str) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, None, type=socket.SOCK_STREAM)
        return sorted({str(info[4][0]) for info in infos})

    async def refresh_dns(self, spec: DnsSpec) -> None:
        """Make the sidecars from `spec` match what its name resolves to now; on a lookup
        failure keep the last answer (a DNS hiccup must not empty the fleet)."""
        try:
            addresses = await self._resolver(spec.dns)
        except OSError as exc:
            log.warning("DNS lookup failed; keeping the last answer", dns=spec.dns,
                        error=str(exc))
            return
        prefix = spec.dns + "/"
        wanted = {prefix + a: a for a in addresses}
        for name in [n for n in self.sidecars if n.startswith(prefix) and n not in wanted]:
            del self.sidecars[name]
            if (task := self._pollers.pop(name, None)) is not None:
                task.cancel()
            log.info("backend left DNS", backend=name)
        for name, address in wanted.items():
            if name not in self.sidecars:
                self._add(name, _url(spec.scheme, address, spec.proxy_port),
                          _url(spec.scheme, address, spec.admin_port), spec.parallel)
                log.info("backend found in DNS", backend=name)
        self._note_models()

    async def _dns_loop(self, spec: DnsSpec) -> None:
        while True:
            await asyncio.sleep(spec.refresh_interval)
            await self.refresh_dns(spec)

    def own_counts(self) -> Counts:
        return {(s.name, model): n for s in self.sidecars.values()
                for model, n in s.in_flight.items() if n > 0}

    async def read_others(self, model: str) -> None:
        """Before a decision for `model`: the other replicas' in-flight counts for it, now
        (one round trip, under its deadline; a failure leaves the decision to the estimate)."""
        if self.shared is None:
            return
        counts = await self.shared.others(model)
        by_backend = None if counts is None else per_backend(counts)
        for sidecar in self.sidecars.values():
            sidecar.saw_others(None if by_backend is None else by_backend.get(sidecar.name, {}),
                               model)

    def candidates(self, model: str) -> list[Candidate]:
        now = time.monotonic()
        stale_after = self.config.stale_after
        return [s.candidate(model, now, stale_after) for s in self.sidecars.values()]

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"sidecars": [s.describe(now) for s in self.sidecars.values()],
                "cloud": [c.describe() for c in self.clouds.values()]}
