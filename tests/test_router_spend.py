"""The router's spend and limits: budgets reserved then settled, rate limits, per-key limits,
and the same shared by replicas through the real Redis (Debian's redis-server, started by the
test session on a loopback port).

The replica test runs two `llmtap route` processes over one Redis and a fake cloud (the
simulator's OpenAI API) and counts what the cloud really answered, from the usage in each
answer, against a $1 budget.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from exporter.routing import shared
from exporter.routing.breaker import CLOSED, OPEN, Breaker
from exporter.routing.config import BreakerSpec, CloudSpec, KeyLimitSpec
from exporter.routing.ledger import Budget, Ledger, LedgerUnavailable, MemoryLedger, Refused
from exporter.routing.shared import RedisLedger
from exporter.routing.spend import Cloud, KeyLimits
from tests.helpers import LlmtapRouter, Metrics, RedisServer, Simulator, free_port

_prefixes = itertools.count()


def _prefix() -> str:
    return f"test{next(_prefixes)}"


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: pytest.FixtureRequest,
                 redis_server: RedisServer) -> AsyncIterator[Ledger]:
    """The same semantics, whichever ledger keeps them."""
    kept: Ledger = MemoryLedger() if request.param == "memory" else \
        RedisLedger(redis_server.url, _prefix())
    await kept.start()
    yield kept
    await kept.close()


async def test_a_reservation_holds_every_budget_or_none(ledger: Ledger) -> None:
    cloud = Budget("cloud:c", 1.0)
    key = Budget("key:alice", 0.3)
    first = await ledger.reserve([cloud, key], 0.2)
    assert not isinstance(first, Refused)
    assert ledger.committed(cloud) == pytest.approx(0.2)
    refused = await ledger.reserve([cloud, key], 0.2)  # the key has 0.1 left
    assert isinstance(refused, Refused) and refused.budget == key
    assert ledger.committed(cloud) == pytest.approx(0.2)  # nothing held in the cloud's
    ledger.settle(first, 0.05)  # the answer cost less than its maximum
    ledger.settle(first, 0.05)  # settling twice counts once
    await asyncio.sleep(0.05)  # a shared ledger writes in the background
    assert ledger.committed(key) == pytest.approx(0.05)
    again = await ledger.reserve([cloud, key], 0.25)
    assert not isinstance(again, Refused)
    assert ledger.committed(cloud) == pytest.approx(0.3)


async def test_a_rate_limit_is_a_token_bucket(ledger: Ledger) -> None:
    assert await ledger.take("cloud:c", 2.0) == 0.0
    assert await ledger.take("cloud:c", 2.0) == 0.0  # burst: max(1, rate)
    wait = await ledger.take("cloud:c", 2.0)
    assert 0 < wait <= 0.5
    assert ledger.wait_hint("cloud:c", 2.0) > 0
    await asyncio.sleep(wait + 0.02)
    assert await ledger.take("cloud:c", 2.0) == 0.0


async def test_cloud_admission_says_why_not(ledger: Ledger,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEND_TEST_KEY", "sk")
    spec = CloudSpec(name="c", base_url="http://c/v1", api_key_env="SPEND_TEST_KEY",
                     models={"m": "m"}, price_per_input_token=0.001,
                     price_per_output_token=0.01, budget=1.0, max_output_tokens=50)
    cloud = Cloud(spec, Breaker(BreakerSpec()), ledger)
    limits = KeyLimits({"alice": KeyLimitSpec(budget=0.6), "*": KeyLimitSpec(budget=2.0)},
                       ledger)
    assert cloud.max_cost(100, None) == pytest.approx(0.6)  # 100 bytes in, 50 tokens out
    assert cloud.max_cost(100, 10) == pytest.approx(0.2)
    alice = limits.budget("alice")
    held = await cloud.admit(0.6, alice)
    assert held.reservation is not None
    assert (await cloud.admit(0.1, alice)).declined == "key_budget_exhausted"
    assert cloud.unusable(0.1, alice) == "key_budget_exhausted"
    bob = limits.budget("bob")  # the "*" entry
    assert bob is not None and bob.limit == 2.0
    assert (await cloud.admit(0.5, bob)).declined == "budget_exhausted"  # the cloud's $1
    assert limits.budget(None) is None and limits.budget("") is None


async def test_a_reservation_left_by_a_dead_replica_expires(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared, "RESERVATION_TTL", 0.3)
    prefix = _prefix()
    dead, alive = RedisLedger(redis_server.url, prefix), RedisLedger(redis_server.url, prefix)
    await dead.start()
    await alive.start()
    try:
        budget = Budget("cloud:c", 1.0)
        assert not isinstance(await dead.reserve([budget], 0.9), Refused)
        assert isinstance(await alive.reserve([budget], 0.9), Refused)  # shared: no room
        await asyncio.sleep(0.4)  # `dead` never settles
        assert not isinstance(await alive.reserve([budget], 0.9), Refused)
    finally:
        await dead.close()
        await alive.close()


async def test_replicas_share_ejections(redis_server: RedisServer) -> None:
    """One replica's breaker ejecting a backend keeps it out on every replica until the
    cooldown ends; then each may probe it."""
    prefix = _prefix()
    a, b = RedisLedger(redis_server.url, prefix), RedisLedger(redis_server.url, prefix)
    spec = BreakerSpec(failures=2, cooldown=0.5)
    mine, theirs = Breaker(spec, name="x", board=a), Breaker(spec, name="x", board=b)
    a.track("x")
    b.track("x")
    await a.start()
    await b.start()
    try:
        mine.failure()
        mine.failure()
        assert mine.state == OPEN
        await asyncio.sleep(0.05)  # the write lands
        await b.refresh()
        assert not theirs.eligible() and theirs.state == OPEN
        assert theirs.ejections == 0  # not this replica's ejection
        await asyncio.sleep(0.55)
        await b.refresh()
        assert theirs.eligible()  # cooldown over: it may probe
        theirs.dispatched()
        theirs.success()
        assert theirs.state == CLOSED
    finally:
        await a.close()
        await b.close()


async def test_redis_down_spends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared state that cannot be reached: cloud requests are declined, not let through
    unmetered; key rate limits stop blocking (local traffic goes on)."""
    monkeypatch.setenv("SPEND_TEST_KEY", "sk")
    errors: list[int] = []
    down = RedisLedger(f"redis://127.0.0.1:{free_port()}/0", _prefix(),
                       on_error=lambda: errors.append(1))
    await down.start()
    try:
        assert not down.up and errors
        with pytest.raises(LedgerUnavailable):
            await down.reserve([Budget("cloud:c", 1.0)], 0.1)
        spec = CloudSpec(name="c", base_url="http://c/v1", api_key_env="SPEND_TEST_KEY",
                         models={"m": "m"}, budget=1.0)
        cloud = Cloud(spec, Breaker(BreakerSpec()), down)
        assert (await cloud.admit(0.1, None)).declined == "shared_state_down"
        limits = KeyLimits({"alice": KeyLimitSpec(rate_limit=1.0)}, down)
        assert await limits.take("alice") == 0.0
    finally:
        await down.close()


# --------------------------------------------------------------------------- replicas


PRICE_IN, PRICE_OUT = 0.0001, 0.01
MAX_OUTPUT = 10


def _cloud_config(cloud: Simulator, budget: float) -> str:
    return ("allow_unauthenticated_cloud: true\nbackends: []\n"
            f"cloud:\n  - {{name: fakecloud, base_url: '{cloud.url}/v1', "
            "api_key_env: FAKE_CLOUD_KEY,\n     models: {frontier: gpt-fake}, "
            f"price_per_input_token: {PRICE_IN}, price_per_output_token: {PRICE_OUT},\n"
            f"     budget: {budget}, max_output_tokens: {MAX_OUTPUT}}}\n")


async def _ask(session: aiohttp.ClientSession, base: str, i: int,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    body = {"model": "frontier", "messages": [{"role": "user", "content": f"question {i}"}]}
    async with session.post(base + "/v1/chat/completions", data=orjson.dumps(body),
                            headers={"Content-Type": "application/json", **(headers or {})}
                            ) as resp:
        return resp.status, orjson.loads(await resp.read()), resp.headers.get("Retry-After", "")


def _max_cost() -> float:
    body = orjson.dumps({"model": "frontier",
                         "messages": [{"role": "user", "content": "question 99"}]})
    return len(body) * PRICE_IN + MAX_OUTPUT * PRICE_OUT


async def _storm(urls: list[str], n: int) -> tuple[float, list[int], list[dict[str, Any]]]:
    """n requests at once, spread over the replicas: what the cloud really answered,
    priced from the usage in each answer."""
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(_ask(session, urls[i % len(urls)], i)
                                         for i in range(n)))
    spent = 0.0
    for status, body, _ in answers:
        if status == 200:
            usage = body["usage"]
            spent += usage["prompt_tokens"] * PRICE_IN + usage["completion_tokens"] * PRICE_OUT
    return spent, [a[0] for a in answers], [a[1] for a in answers if a[0] != 200]


@pytest.fixture
def slow_cloud() -> Iterator[Simulator]:
    # Slow enough that the whole storm is in flight at once: the reservations race.
    cloud = Simulator("--models", "gpt-fake", "--ttft", "0.3", "--tokens-per-second", "100",
                      "--output-tokens", str(MAX_OUTPUT), "--parallel", "64", "--seed", "9")
    yield cloud
    cloud.stop()


async def test_two_replicas_sharing_redis_keep_one_budget(
        redis_server: RedisServer, slow_cloud: Simulator) -> None:
    """Two routers, one $1 budget in Redis, 40 requests at once over both: the cloud's real
    spend stays within the budget plus one request's maximum cost, and the rest are told
    why in OpenAI's dialect."""
    config = _cloud_config(slow_cloud, 1.0) + \
        f"shared_state: {{redis_url: '{redis_server.url}', prefix: {_prefix()}}}\n"
    replicas = [LlmtapRouter(config, env={"FAKE_CLOUD_KEY": "sk"}) for _ in range(2)]
    try:
        spent, statuses, refusals = await _storm([r.url for r in replicas], 40)
        served = statuses.count(200)
        assert spent <= 1.0 + _max_cost(), (spent, served)
        assert spent >= 1.0 - 2 * _max_cost(), (spent, served)  # the budget was used
        assert served + statuses.count(429) == 40
        assert all(r["error"]["type"] == "budget_exhausted" for r in refusals)
        assert slow_cloud.stats()["started"] == served  # nothing reached it unpaid
        metrics = [Metrics(_get(r.admin + "/metrics")) for r in replicas]
        assert sum(m.value("llmtap_router_cloud_cost_total", backend="fakecloud")
                   for m in metrics) == pytest.approx(spent)
        assert all(m.value("llmtap_router_shared_state_up") == 1 for m in metrics)
        # Both replicas took half the storm; their refusals say why.
        for m in metrics:
            made = m.value("llmtap_router_decisions_total", route="*", backend="fakecloud",
                           policy="expected_wait", reason="cloud_model")
            refused = sum(m.value("llmtap_router_decisions_total", route="*", backend="none",
                                  policy="expected_wait", reason=reason)
                          for reason in ("budget_exhausted", "cloud_model"))
            assert made + refused == 20
            assert m.value("llmtap_router_decisions_total", route="*", backend="none",
                           policy="expected_wait", reason="cloud_model") == 0
    finally:
        for replica in replicas:
            replica.stop()


async def test_two_replicas_without_shared_state_spend_twice(slow_cloud: Simulator) -> None:
    """The same storm without Redis: each replica has its own $1, so together they spend
    about twice the budget. (What the shared state is for; this shows the test above can
    fail.)"""
    replicas = [LlmtapRouter(_cloud_config(slow_cloud, 1.0), env={"FAKE_CLOUD_KEY": "sk"})
                for _ in range(2)]
    try:
        spent, _, _ = await _storm([r.url for r in replicas], 40)
        assert spent > 1.0 + 4 * _max_cost(), spent
    finally:
        for replica in replicas:
            replica.stop()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


# --------------------------------------------------------------------------- keys


async def test_per_key_budgets_and_rate_limits(tmp_path: Path, slow_cloud: Simulator) -> None:
    """alice has a daily cloud budget, bob a rate limit, carol (the "*" entry) neither of
    theirs: each limit binds its own key only, and the refusals say which in the client's
    dialect, with Retry-After for the rate limit."""
    from exporter.auth import key_file_line, new_key

    keys = {name: new_key() for name in ("alice", "bob", "carol")}
    key_file = tmp_path / "keys"
    key_file.write_text("".join(key_file_line(n, k) + "\n" for n, k in keys.items()))
    config = (_cloud_config(slow_cloud, 100.0).replace("allow_unauthenticated_cloud: true\n",
                                                        "")
              + f"api_key_file: {key_file}\nkey_limits:\n"
              f"  alice: {{budget: {2.5 * _max_cost()}}}\n  bob: {{rate_limit: 1}}\n"
              "  '*': {budget: 50}\n")
    router = LlmtapRouter(config, env={"FAKE_CLOUD_KEY": "sk"})

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[name]}"}

    try:
        async with aiohttp.ClientSession() as session:
            alice = [await _ask(session, router.url, i, auth("alice")) for i in range(4)]
            assert [a[0] for a in alice] == [200, 200, 429, 429]
            assert alice[2][1]["error"]["type"] == "budget_exhausted"
            assert "API key" in alice[2][1]["error"]["message"]
            bob = await asyncio.gather(*(_ask(session, router.url, i, auth("bob"))
                                         for i in range(3)))
            assert sorted(b[0] for b in bob) == [200, 429, 429]
            limited = next(b for b in bob if b[0] == 429)
            assert limited[1]["error"]["type"] == "rate_limited" and limited[2] == "1"
            carol = await asyncio.gather(*(_ask(session, router.url, i, auth("carol"))
                                           for i in range(4)))
            assert [c[0] for c in carol] == [200] * 4
        m = Metrics(_get(router.admin + "/metrics"))
        assert m.value("llmtap_router_key_cost_total", key="alice") <= 2.5 * _max_cost()
        assert m.value("llmtap_router_key_budget_remaining", key="alice") < _max_cost()
        assert m.value("llmtap_key_requests_total", key="bob", error_type="429") == 2
        assert m.label_values("llmtap_router_key_cost_total", "key") <= {"alice", "bob",
                                                                         "carol"}
    finally:
        router.stop()
