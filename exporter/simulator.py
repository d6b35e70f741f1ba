"""A synthetic model server speaking Ollama, OpenAI-compatible and llama.cpp dialects.

Why it exists: Ollama cannot be installed here and GPUs are rare, yet llmtap's demos, load
tests and end-to-end tests need a model server whose queueing, cold loads and token timing
are real (wall-clock) and whose frames are byte-for-byte shaped like the real servers'. Tests
compare what a client receives directly from this server with what it receives through
llmtap, so with a seed every answer is byte-identical for the same request.

Frames follow the real servers' source, not their docs:
- Ollama v0.34.4 (`api/types.go`, `server/routes.go`, `middleware/openai.go`; pinned against
  the real one in tests/test_ollama.py): Go's
  encoding/json (compact, struct field order, `omitempty` metrics, `<>&` escaped), RFC 3339
  timestamps with trailing zeros trimmed, NDJSON lines ending in `\\n`, non-streamed answers
  through gin (`application/json; charset=utf-8`, no trailing newline) and the OpenAI layer's
  `json.Encoder` answers (`application/json`, trailing newline).
- llama.cpp's llama-server (`tools/server/server-task.cpp`), pinned against frames captured
  from the real server in tests/test_simulator.py.
- Thinking: a request that asks to think (Ollama's `think`, the OpenAI dialect's
  `reasoning_effort` on chat) gets the first half of its tokens as reasoning, in the frames
  the real servers send for it (Ollama 0.34.4 `thinking` and `/v1` `reasoning`, llama-server
  b11434 `reasoning_content`; captured in tests/test_simulator.py, checked live in
  tests/test_ollama.py and tests/test_relay_llamacpp.py). Native /completion never thinks: the
  real one parses no reasoning there.

Scheduling mimics Ollama's: `parallel` requests run at once per model, the rest wait FIFO (up
to `max_queue`, then HTTP 503), a model that is not resident is loaded first (`cold_load`),
`max_loaded_models` evicts the least recently used idle model, and `keep_alive` unloads idle
models. `load_duration` is the model load alone and the queue wait is what `total_duration`
has beyond load, prompt and generation, as in Ollama since 0.30 (measured on 0.34.4: a request
that waited 8 s behind another reported load_duration 0.001 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import random
import re
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

import orjson
from aiohttp import web

from exporter.models import tagged

__all__ = [
    "SimulatorConfig",
    "SimulatorStats",
    "create_app",
    "run_simulator",
    "start_simulator",
]

_NS = 1_000_000_000
# Seeded runs pretend every request began at this instant (2025-01-01T00:00:00Z): timestamps
# then depend on the request and the config only, never on the wall clock.
_SEED_EPOCH_NS = 1_735_689_600 * _NS
# Ollama's `expires_at` for keep_alive < 0 ("forever"): time.Now().Add(math.MaxInt64).
_FOREVER_NS = (1 << 63) - 1

_OLLAMA_BUSY = "server busy, please try again.  maximum pending requests exceeded"
_PLAIN_JSON = "application/json"  # Ollama's OpenAI writers and llama-server
_NDJSON = "application/x-ndjson"
_SSE = "text/event-stream"

# Word-like pieces, the way BPE tokens look on the wire (leading space, bare punctuation).
# fmt: off
_VOCAB: tuple[str, ...] = (
    " the", " a", " model", " token", " light", " sky", " blue", " is", " of", " and",
    " to", " in", " that", " it", " with", " as", " for", " on", " scattering", " wave",
    "length", " short", "er", " red", " sun", " air", " mole", "cules", " more", " than",
    " colour", " we", " see", " because", " day", " time", " during", " high", " low",
    " energy", " photons", " travel", " through", " atmosphere", " which", " are", ",", ".",
)
# fmt: on
# JSON-encoded once: the per-token path only concatenates bytes.
_VOCAB_JSON: tuple[bytes, ...] = tuple(orjson.dumps(p) for p in _VOCAB)


@dataclass
class SimulatorConfig:
    models: list[str] = field(default_factory=lambda: ["sim-small", "sim-large"])
    ttft: float = 0.05  # seconds from start of work (after queue + cold load) to first token
    tokens_per_second: float = 50.0
    output_tokens: int = 32  # unless the request asks fewer (num_predict/max_tokens/n_predict)
    parallel: int = 1  # requests processed at once PER MODEL (OLLAMA_NUM_PARALLEL)
    max_queue: int = 512  # waiting requests per model beyond which we answer 503
    cold_load: float = 0.0  # seconds to load a model that is not resident
    max_loaded_models: int = 0  # 0 = unlimited; else loading one more evicts the LRU idle one
    keep_alive: float = 300.0  # seconds a model stays loaded after its last use (<0: forever)
    seed: int | None = None  # set: byte-identical answers for identical requests
    version: str = "0.34.4"  # reported by /api/version
    # Whose OpenAI-compatible layer /v1/* imitates: "ollama" or "llama.cpp" (llama-server's
    # frames, with timings; it serves models[0] whatever model name is sent).
    openai_flavor: str = "ollama"


@dataclass
class SimulatorStats:
    """Counters seen from the upstream's side (GET /sim/stats).

    `cancelled` counts requests whose handler was cancelled (or whose write failed) because
    the client went away: tests use it to prove that llmtap closed the upstream connection.
    """

    started: int = 0  # inference requests admitted (queued or running)
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0  # answered 503 because the queue was full (never "started")
    loads: int = 0  # cold loads performed
    last_cancel_monotonic: float | None = None  # time.monotonic(), comparable across processes

    def reset(self) -> None:
        self.started = self.completed = self.cancelled = self.rejected = self.loads = 0
        self.last_cancel_monotonic = None


# --------------------------------------------------------------------------- wire helpers


def _gin(obj: Any, status: int = 200) -> web.Response:
    """An answer as gin's c.JSON writes it: charset in the content type, no newline."""
    return web.Response(
        status=status, body=_go_json(obj), content_type="application/json", charset="utf-8"
    )


def _utf8_json(body: bytes, status: int = 200) -> web.Response:
    """llama-server's JSON answers (cpp-httplib): `application/json; charset=utf-8`."""
    resp = web.Response(status=status, body=body, content_type=_PLAIN_JSON, charset="utf-8")
    resp.headers["Server"] = "llama.cpp"
    return resp


def _go_json(obj: Any) -> bytes:
    """Go encoding/json bytes: compact, insertion order, HTML characters escaped."""
    out = orjson.dumps(obj)
    if b"<" in out or b">" in out or b"&" in out:
        out = out.replace(b"<", b"\\u003c").replace(b">", b"\\u003e").replace(b"&", b"\\u0026")
    return out


@lru_cache(maxsize=16)
def _utc_second(sec: int) -> str:
    # Streams stamp every chunk; within one second the date part is the same string.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))


def _go_time(ns: int, local: bool = False) -> str:
    """time.Time as Go marshals it (RFC 3339, nanoseconds with trailing zeros trimmed)."""
    sec, frac = divmod(ns, _NS)
    if local:
        tm = time.localtime(sec)
        head, off = time.strftime("%Y-%m-%dT%H:%M:%S", tm), tm.tm_gmtoff
    else:
        head, off = _utc_second(sec), 0
    if frac:
        head = f"{head}.{frac:09d}".rstrip("0")
    if not off:
        return head + "Z"
    sign = "+" if off > 0 else "-"
    off = abs(off)
    return f"{head}{sign}{off // 3600:02d}:{off % 3600 // 60:02d}"


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive: seconds as a number or a Go duration string ("5m", "-1")."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        with contextlib.suppress(ValueError):
            return sign * float(text)  # a bare number is seconds
        parts = _DURATION_RE.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    return None


def _text_of(content: Any) -> str:
    """Text of a message content: a string or OpenAI's list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _count_tokens(text: str) -> int:
    # ~4 characters a token, like real BPE vocabularies on English; never zero (BOS).
    return len(text) // 4 + 1


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


# --------------------------------------------------------------------------- model catalogue


@dataclass(frozen=True, slots=True)
class _ModelInfo:
    name: str  # as Ollama lists it: "name:tag"
    digest: str
    size: int
    parameter_size: str
    quantization: str
    family: str
    embed_dim: int
    modified_ns: int


def _model_info(name: str) -> _ModelInfo:
    canon = tagged(name)
    h = hashlib.sha256(canon.encode()).digest()
    low = canon.lower()
    if any(k in low for k in ("small", "tiny", "mini", "135m")):
        psize, quant, size, dim = "134.52M", "Q4_K_M", 105_460_064, 384
    elif any(k in low for k in ("large", "big", "8b", "70b")):
        psize, quant, size, dim = "8.0B", "Q4_K_M", 4_920_753_328, 1024
    else:
        psize, quant, size, dim = "3.2B", "Q4_K_M", 2_019_393_189, 768
    # Deterministic "pulled" time: a few days before the seed epoch, different per model.
    modified = _SEED_EPOCH_NS - (int.from_bytes(h[:4], "big") % 604_800) * _NS - h[4] * 1_000_003
    return _ModelInfo(canon, h.hex(), size, psize, quant, "llama", dim, modified)


def _details(info: _ModelInfo) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info.family,
        "families": [info.family],
        "parameter_size": info.parameter_size,
        "quantization_level": info.quantization,
    }


# --------------------------------------------------------------------------- scheduler


class _QueueFull(Exception):
    pass


class _Model:
    """One model's scheduler state: slots, FIFO of waiters, residency."""

    __slots__ = (
        "active",
        "admitted",
        "busy_slots",
        "expires_mono",
        "expires_ns",
        "info",
        "last_used",
        "load_task",
        "loaded",
        "waiters",
    )

    def __init__(self, info: _ModelInfo) -> None:
        self.info = info
        self.active = 0  # requests holding a slot (loading or generating)
        self.busy_slots: set[int] = set()  # slot numbers in use, for llama.cpp's id_slot
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.loaded = False
        self.admitted = False  # counts against max_loaded_models (loaded or being loaded)
        self.load_task: asyncio.Task[None] | None = None
        self.last_used = 0.0
        self.expires_mono = math.inf
        self.expires_ns = 0

    @property
    def queued(self) -> int:
        return sum(1 for f in self.waiters if not f.done())


class _Scheduler:
    def __init__(self, config: SimulatorConfig, stats: SimulatorStats) -> None:
        self._cfg = config
        self._stats = stats
        self.models: dict[str, _Model] = {}
        for name in config.models:
            info = _model_info(name)
            self.models.setdefault(info.name, _Model(info))
        self._changed = asyncio.Event()

    def lookup(self, name: Any) -> _Model | None:
        if not isinstance(name, str) or not name:
            return None
        return self.models.get(tagged(name))

    # -- slots

    def enqueue(self, m: _Model) -> asyncio.Future[None] | None:
        """Take a slot now (None) or a place in the FIFO (a future); raise when full."""
        if m.active < self._cfg.parallel and not m.queued:
            m.active += 1
            return None
        if m.queued >= self._cfg.max_queue:
            raise _QueueFull
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        m.waiters.append(fut)
        return fut

    async def wait_turn(self, m: _Model, fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(m, None)  # the slot reached us as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    m.waiters.remove(fut)
            raise

    @staticmethod
    def take_slot_id(m: _Model) -> int:
        slot = next(i for i in range(len(m.busy_slots) + 1) if i not in m.busy_slots)
        m.busy_slots.add(slot)
        return slot

    def release(self, m: _Model, keep_alive: float | None) -> None:
        now = time.monotonic()
        m.last_used = now
        while m.waiters:
            fut = m.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the next waiter; active is unchanged
                return
        m.active -= 1
        if m.active == 0 and m.loaded:
            ka = self._cfg.keep_alive if keep_alive is None else keep_alive
            if ka == 0:
                self._unload(m)
            elif ka < 0:
                m.expires_mono, m.expires_ns = math.inf, time.time_ns() + _FOREVER_NS
            else:
                m.expires_mono, m.expires_ns = now + ka, time.time_ns() + int(ka * _NS)
        self._notify()

    # -- residency

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _unload(self, m: _Model) -> None:
        m.loaded = m.admitted = False
        m.expires_mono = math.inf
        self._notify()

    def expire_idle(self) -> None:
        now = time.monotonic()
        for m in self.models.values():
            if m.loaded and m.active == 0 and m.expires_mono <= now:
                self._unload(m)

    def unload(self, m: _Model) -> None:
        """keep_alive 0 with an empty prompt: unload now unless requests are running."""
        if m.active == 0 and m.loaded:
            self._unload(m)

    async def ensure_loaded(self, m: _Model) -> None:
        """Make `m` resident, loading it (cold_load seconds) if it is not."""
        self.expire_idle()
        if m.loaded:
            m.last_used = time.monotonic()
            return
        if m.load_task is None:
            m.load_task = asyncio.ensure_future(self._load(m))
        # Shielded: one waiter giving up must not abort a load others are waiting for.
        await asyncio.shield(m.load_task)

    async def _load(self, m: _Model) -> None:
        try:
            limit = self._cfg.max_loaded_models
            while limit > 0:
                others = [o for o in self.models.values() if o is not m and o.admitted]
                if len(others) < limit:
                    break
                idle = [o for o in others if o.active == 0 and o.loaded]
                if idle:
                    self._unload(min(idle, key=lambda o: o.last_used))  # the model swap
                    continue
                await self._changed.wait()  # like Ollama: wait for a runner to go idle
            m.admitted = True
            self._stats.loads += 1
            if self._cfg.cold_load > 0:
                await asyncio.sleep(self._cfg.cold_load)
            m.loaded = True
            m.last_used = time.monotonic()
            ka = self._cfg.keep_alive
            m.expires_ns = time.time_ns() + (_FOREVER_NS if ka < 0 else int(ka * _NS))
        finally:
            m.load_task = None
            if not m.loaded:
                m.admitted = False

    def loaded_models(self) -> list[_Model]:
        self.expire_idle()
        return [m for m in self.models.values() if m.loaded]


# --------------------------------------------------------------------------- one request


@dataclass(slots=True)
class _Plan:
    """Everything decided about an answer before any waiting happens."""

    model: _Model
    name: str  # the model name as the client spelled it (Ollama echoes it)
    prompt_text: str
    prompt_tokens: int
    pieces: list[int]  # indices into _VOCAB
    reason: str  # "stop" or "length"
    rng: random.Random
    seeded: bool
    keep_alive: float | None = None
    # Filled in while running (seconds on the loop clock):
    t_arrival: float = 0.0
    t_turn: float = 0.0  # its turn came (the queue wait ends, a load may follow)
    t_loaded: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    load_jitter_ns: int = 0  # seeded runs report this as load_duration
    slot: int = 0  # llama.cpp's id_slot
    thinking: int = 0  # the first `thinking` pieces are reasoning (the request asked to think)

    @property
    def text(self) -> str:
        """The answer (what follows any reasoning)."""
        return "".join(_VOCAB[i] for i in self.pieces[self.thinking:])

    @property
    def thinking_text(self) -> str:
        return "".join(_VOCAB[i] for i in self.pieces[: self.thinking])


@dataclass(slots=True)
class _Timings:
    """Durations reported in final frames (nanoseconds)."""

    total: int
    load: int
    prompt_eval: int
    eval: int
    end_ns: int  # wall-clock (or seeded) time of the final frame


class _Framer:
    """One dialect's frames for one request. Subclasses fill in the byte layouts."""

    content_type = _SSE
    headers_at_start = False  # send headers when work starts (else with the first frame)
    close_after_stream = False  # drop the connection after a streamed answer

    def __init__(self, sim: _Simulator, plan: _Plan) -> None:
        self.sim = sim
        self.plan = plan

    def headers(self) -> dict[str, str]:
        return {}

    def opening(self) -> bytes | None:
        """A frame to send when work starts, before the first token."""
        return None

    def token(self, piece: int, ts_ns: int) -> bytes:
        raise NotImplementedError

    def reasoning(self, piece: int, ts_ns: int) -> bytes:
        """A frame of the model's thinking (only dialects that can ask for it get any)."""
        raise NotImplementedError

    def closing(self, t: _Timings) -> bytes:
        raise NotImplementedError

    def whole(self, t: _Timings) -> web.Response:
        raise NotImplementedError

    def busy(self) -> web.Response:
        raise NotImplementedError


class _Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.cfg = config
        self.stats = SimulatorStats()
        self.sched = _Scheduler(config, self.stats)
        self.dt = 1.0 / config.tokens_per_second if config.tokens_per_second > 0 else 0.0
        # llama-server serves one model and reports it (its path or alias) as `model`.
        self.llama_model = config.models[0]

    # -- planning

    def rng_for(self, name: str, prompt_text: str, limit: int | None) -> random.Random:
        """Seeded: the answer follows from what was asked (model, prompt, length limit), not
        from how the JSON was spelled, so a proxy that re-serialises a body (LiteLLM does)
        still gets the answer the client would have got directly."""
        if self.cfg.seed is None:
            return random.Random()
        asked = f"{name}\0{prompt_text}\0{limit}".encode()
        digest = hashlib.blake2b(asked, key=str(self.cfg.seed).encode()[:64], digest_size=16)
        return random.Random(digest.digest())

    def plan(
        self,
        model: _Model,
        name: str,
        prompt_text: str,
        limit: int | None,
        keep_alive: float | None = None,
        think: bool = False,
    ) -> _Plan:
        rng = self.rng_for(name, prompt_text, limit)
        n = self.cfg.output_tokens
        reason = "stop"
        if limit is not None and limit <= n:
            n, reason = limit, "length"
        pieces = [rng.randrange(len(_VOCAB)) for _ in range(n)]
        if pieces and _VOCAB[pieces[0]] in (",", "."):
            pieces[0] = 0  # an answer does not start with punctuation
        return _Plan(
            model=model,
            name=name,
            prompt_text=prompt_text,
            prompt_tokens=_count_tokens(prompt_text),
            pieces=pieces,
            reason=reason,
            rng=rng,
            seeded=self.cfg.seed is not None,
            keep_alive=keep_alive,
            load_jitter_ns=1_000_000 + rng.randrange(4_000_000),
            # A model asked to think spends the first half of its tokens on it (rounded up:
            # a one-token answer is all thinking, as a length cut mid-thought is), and the
            # length limit counts them, as Ollama's num_predict and max_tokens do.
            thinking=(n + 1) // 2 if think else 0,
        )

    # -- clocks

    def chunk_ns(self, plan: _Plan, i: int) -> int:
        """Timestamp of token i: the wall clock, or a nominal schedule when seeded."""
        if not plan.seeded:
            return time.time_ns()
        return _SEED_EPOCH_NS + plan.load_jitter_ns + round((self.cfg.ttft + i * self.dt) * _NS)

    def timings(self, plan: _Plan, end: float) -> _Timings:
        n = len(plan.pieces)
        if plan.seeded:
            load = plan.load_jitter_ns
            prompt_eval = max(round(self.cfg.ttft * _NS), 1)
            ev = max(round(n * self.dt * _NS), 1) if n else 0
            total = load + prompt_eval + max(n - 1, 0) * round(self.dt * _NS) + 1
            return _Timings(total, load, prompt_eval, ev, _SEED_EPOCH_NS + total)
        load = max(round((plan.t_loaded - plan.t_turn) * _NS), 1)
        if n:
            prompt_eval = max(round((plan.t_first - plan.t_loaded) * _NS), 1)
            ev = max(round((plan.t_last - plan.t_first + self.dt) * _NS), 1)
        else:
            prompt_eval = max(round((end - plan.t_loaded) * _NS), 1)
            ev = 0
        total = max(round((end - plan.t_arrival) * _NS), 1)
        return _Timings(total, load, prompt_eval, ev, time.time_ns())

    # -- running

    def _count_cancel(self) -> None:
        self.stats.cancelled += 1
        self.stats.last_cancel_monotonic = time.monotonic()

    async def run(
        self, request: web.Request, plan: _Plan, framer: _Framer, stream: bool
    ) -> web.StreamResponse:
        """Queue, load, generate on a real-time schedule; count how the request ended."""
        try:
            waiter = self.sched.enqueue(plan.model)
        except _QueueFull:
            self.stats.rejected += 1
            return framer.busy()
        self.stats.started += 1
        loop = asyncio.get_running_loop()
        plan.t_arrival = loop.time()
        holding = waiter is None
        resp: web.StreamResponse | None = None
        try:
            if waiter is not None:
                await self.sched.wait_turn(plan.model, waiter)
                holding = True
            plan.slot = self.sched.take_slot_id(plan.model)
            plan.t_turn = loop.time()
            await self.sched.ensure_loaded(plan.model)
            plan.t_loaded = loop.time()
            if stream:
                headers = {"Content-Type": framer.content_type, **framer.headers()}
                resp = web.StreamResponse(status=200, headers=headers)
                await self._stream(request, plan, framer, resp)
            else:
                resp = await self._whole(plan, framer)
        except asyncio.CancelledError:
            self._count_cancel()
            raise
        except ConnectionError:
            # A write hit the closed connection before aiohttp cancelled us: same event.
            self._count_cancel()
            return resp if resp is not None else web.Response(status=499)
        else:
            self.stats.completed += 1
        finally:
            if holding:
                plan.model.busy_slots.discard(plan.slot)
                self.sched.release(plan.model, plan.keep_alive)
        return resp

    async def _stream(
        self, request: web.Request, plan: _Plan, framer: _Framer, resp: web.StreamResponse
    ) -> None:
        loop = asyncio.get_running_loop()
        write = resp.write
        if framer.headers_at_start:
            await resp.prepare(request)
        opening = framer.opening()
        if opening is not None:
            if not resp.prepared:
                await resp.prepare(request)
            await write(opening)
        # Token i is due at t_loaded + ttft + i/tps: a fixed schedule, so drift never adds up.
        first_due = plan.t_loaded + self.cfg.ttft
        dt = self.dt
        chunk_ns = self.chunk_ns
        token, reasoning, thinking = framer.token, framer.reasoning, plan.thinking
        for i, piece in enumerate(plan.pieces):
            delay = first_due + i * dt - loop.time()
            # sleep(0) when behind schedule still lets other streams run between tokens.
            await asyncio.sleep(delay if delay > 0 else 0)
            frame = (reasoning if i < thinking else token)(piece, chunk_ns(plan, i))
            now = loop.time()
            if i == 0:
                plan.t_first = now
                if not resp.prepared:
                    # Ollama sends its headers with the first token: TTFB == TTFT there.
                    await resp.prepare(request)
            plan.t_last = now
            await write(frame)
        if not plan.pieces:
            delay = first_due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        if not resp.prepared:
            await resp.prepare(request)
        await write(framer.closing(self.timings(plan, loop.time())))
        await resp.write_eof()
        if framer.close_after_stream and request.protocol is not None:
            request.protocol.force_close()  # after the buffered bytes are flushed

    async def _whole(self, plan: _Plan, framer: _Framer) -> web.Response:
        loop = asyncio.get_running_loop()
        n = len(plan.pieces)
        plan.t_first = plan.t_loaded + self.cfg.ttft
        plan.t_last = plan.t_first + max(n - 1, 0) * self.dt
        delay = plan.t_last - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # one sleep: a non-streamed answer takes as long
        return framer.whole(self.timings(plan, loop.time()))


# --------------------------------------------------------------------------- Ollama


def _ollama_error(status: int, message: str) -> web.Response:
    return _gin({"error": message}, status)


def _metrics(t: _Timings, prompt_tokens: int, eval_count: int) -> dict[str, int]:
    # api.Metrics: every field is `omitempty`, so zeros vanish from the wire.
    pairs = (
        ("total_duration", t.total),
        ("load_duration", t.load),
        ("prompt_eval_count", prompt_tokens),
        ("prompt_eval_cached_count", 0),  # 0.34.4 sends it even when 0 (no prompt cache here)
        ("prompt_eval_duration", t.prompt_eval),
        ("eval_count", eval_count),
        ("eval_duration", t.eval),
    )
    return {k: v for k, v in pairs if v or k == "prompt_eval_cached_count"}


class _OllamaFramer(_Framer):
    content_type = _NDJSON

    def __init__(self, sim: _Simulator, plan: _Plan, chat: bool, raw: bool = False) -> None:
        super().__init__(sim, plan)
        self.chat = chat
        self.raw = raw
        self._head = b'{"model":' + _go_json(plan.name) + b',"created_at":"'
        if chat:
            self._mid = b'","message":{"role":"assistant","content":'
            self._tail = b'},"done":false}\n'
        else:
            self._mid = b'","response":'
            self._tail = b',"done":false}\n'
        # Thinking frames (0.34.4, captured: tests/test_ollama.py): the answer field is there
        # and empty, `thinking` follows it (struct order; omitempty drops it elsewhere).
        self._think_mid = self._mid + b'"","thinking":'

    def token(self, piece: int, ts_ns: int) -> bytes:
        return self._head + _go_time(ts_ns).encode() + self._mid + _VOCAB_JSON[piece] + self._tail

    def reasoning(self, piece: int, ts_ns: int) -> bytes:
        return (self._head + _go_time(ts_ns).encode() + self._think_mid + _VOCAB_JSON[piece]
                + self._tail)

    def _final(self, t: _Timings, text: str, thinking: str = "") -> dict[str, Any]:
        """The last line; a whole answer's carries its thinking beside the answer (a
        stream's has none: each frame had its own)."""
        p = self.plan
        obj: dict[str, Any] = {"model": p.name, "created_at": _go_time(t.end_ns)}
        if self.chat:
            obj["message"] = {"role": "assistant", "content": text}
            if thinking:
                obj["message"]["thinking"] = thinking
            obj["done"] = True
            obj["done_reason"] = p.reason
        else:
            obj["response"] = text
            if thinking:
                obj["thinking"] = thinking
            obj["done"] = True
            obj["done_reason"] = p.reason
            if not self.raw:
                # `context`: the tokens of prompt + answer (deprecated, still sent by 0.12).
                ids = [(x * 7919 + 13) % 32000 for x in range(p.prompt_tokens)]
                ids.extend(100 + i for i in p.pieces)
                obj["context"] = ids
        obj.update(_metrics(t, p.prompt_tokens, len(p.pieces)))
        return obj

    def closing(self, t: _Timings) -> bytes:
        return _go_json(self._final(t, "")) + b"\n"

    def whole(self, t: _Timings) -> web.Response:
        return _gin(self._final(t, self.plan.text, self.plan.thinking_text))

    def busy(self) -> web.Response:
        return _ollama_error(503, _OLLAMA_BUSY)


# --------------------------------------------------------------------------- OpenAI (Ollama)


def _oai_error(
    status: int, message: str, etype: str = "api_error", gin: bool = False
) -> web.Response:
    """openai.NewError as Ollama writes it.

    Errors raised by the handler pass through the OpenAI writer: json.Encoder (newline);
    the type is "invalid_request_error" for 400, "not_found_error" for 404 (0.34.4), else
    "api_error". Errors raised by the middleware itself (bad request
    body) go through gin's c.JSON: charset in the content type, no newline.
    """
    obj = {"error": {"message": message, "type": etype, "param": None, "code": None}}
    if gin:
        return _gin(obj, status)
    return web.Response(status=status, body=_go_json(obj) + b"\n", content_type=_PLAIN_JSON)


def _usage(p: _Plan) -> dict[str, Any]:
    n = len(p.pieces)
    return {
        "prompt_tokens": p.prompt_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},  # 0.34.4: present, even at 0
        "completion_tokens": n,
        "total_tokens": p.prompt_tokens + n,
    }


class _OpenAIFramer(_Framer):
    """Ollama's OpenAI layer: SSE `data: {json}\\n\\n`, `data: [DONE]`, usage on request."""

    content_type = _SSE
    object_name = ""

    def __init__(self, sim: _Simulator, plan: _Plan, include_usage: bool, id_prefix: str) -> None:
        super().__init__(sim, plan)
        self.include_usage = include_usage
        self.id = f"{id_prefix}-{plan.rng.randrange(999)}"  # Ollama: rand.Intn(999)
        self._head = (
            b'data: {"id":"'
            + self.id.encode()
            + b'","object":"'
            + self.object_name.encode()
            + b'","created":'
        )
        self._mid = b""
        self._tail = b""

    def token(self, piece: int, ts_ns: int) -> bytes:
        return self._head + str(ts_ns // _NS).encode() + self._mid + _VOCAB_JSON[piece] + self._tail

    def busy(self) -> web.Response:
        return _oai_error(503, _OLLAMA_BUSY)


class _OpenAIChatFramer(_OpenAIFramer):
    object_name = "chat.completion.chunk"

    def __init__(self, sim: _Simulator, plan: _Plan, include_usage: bool) -> None:
        super().__init__(sim, plan, include_usage, "chatcmpl")
        # Ollama 0.34.4, captured: no role-only opening chunk; the role rides on the first
        # content chunk only; every chunk of a stream carries the first one's `created`.
        self._mid = (
            b',"model":' + _go_json(plan.name) + b',"system_fingerprint":"fp_ollama",'
            b'"choices":[{"index":0,"delta":{"role":"assistant","content":'
        )
        self._later_mid = self._mid.replace(b'"role":"assistant",', b"")
        self._tail = b'},"finish_reason":null}]}\n\n'
        self._created: int | None = None

    def token(self, piece: int, ts_ns: int) -> bytes:
        mid = self._mid if self._created is None else self._later_mid
        if self._created is None:
            self._created = ts_ns // _NS
        return self._head + str(self._created).encode() + mid + _VOCAB_JSON[piece] + self._tail

    def reasoning(self, piece: int, ts_ns: int) -> bytes:
        """0.34.4, captured (tests/test_ollama.py): `"content":""` stays, `reasoning` after
        it; the role on the stream's first chunk as for content."""
        mid = self._mid if self._created is None else self._later_mid
        if self._created is None:
            self._created = ts_ns // _NS
        return (self._head + str(self._created).encode() + mid + b'"","reasoning":'
                + _VOCAB_JSON[piece] + self._tail)

    def _chunk(self, created: int, choices: list[Any], usage: dict[str, int] | None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.plan.name,
            "system_fingerprint": "fp_ollama",
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return b"data: " + _go_json(obj) + b"\n\n"

    def closing(self, t: _Timings) -> bytes:
        created = self._created if self._created is not None else t.end_ns // _NS
        out = self._chunk(
            created, [{"index": 0, "delta": {}, "finish_reason": self.plan.reason}], None
        )
        if self.include_usage:
            out += self._chunk(created, [], _usage(self.plan))
        return out + b"data: [DONE]\n\n"

    def whole(self, t: _Timings) -> web.Response:
        p = self.plan
        message = {"role": "assistant", "content": p.text}
        if p.thinking:
            message["reasoning"] = p.thinking_text
        obj = {
            "id": self.id,
            "object": "chat.completion",
            "created": t.end_ns // _NS,
            "model": p.name,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": message, "finish_reason": p.reason}],
            "usage": _usage(p),
        }
        return web.Response(body=_go_json(obj) + b"\n", content_type=_PLAIN_JSON)


class _OpenAICompletionFramer(_OpenAIFramer):
    """/v1/completions: CompletionChunk puts `choices` before `model` (Ollama's struct order)."""

    object_name = "text_completion"
    _ZERO_USAGE: ClassVar[dict[str, int]] = {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
    }

    def __init__(self, sim: _Simulator, plan: _Plan, include_usage: bool) -> None:
        super().__init__(sim, plan, include_usage, "cmpl")
        self._mid = b',"choices":[{"text":'
        # With include_usage Ollama puts an all-zero usage on every chunk (a pointer to an
        # empty struct survives omitempty), then the real one on a last, choice-less chunk.
        zero = b',"usage":' + _go_json(self._ZERO_USAGE) if include_usage else b""
        self._tail = (
            b',"index":0,"finish_reason":null}],"model":'
            + _go_json(plan.name)
            + b',"system_fingerprint":"fp_ollama"'
            + zero
            + b"}\n\n"
        )

    def _chunk(self, created: int, choices: list[Any], usage: dict[str, int] | None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": created,
            "choices": choices,
            "model": self.plan.name,
            "system_fingerprint": "fp_ollama",
        }
        if usage is not None:
            obj["usage"] = usage
        return b"data: " + _go_json(obj) + b"\n\n"

    def closing(self, t: _Timings) -> bytes:
        created = t.end_ns // _NS
        final = [{"text": "", "index": 0, "finish_reason": self.plan.reason}]
        out = self._chunk(created, final, self._ZERO_USAGE if self.include_usage else None)
        if self.include_usage:
            out += self._chunk(created, [], _usage(self.plan))
        return out + b"data: [DONE]\n\n"

    def whole(self, t: _Timings) -> web.Response:
        p = self.plan
        obj = {
            "id": self.id,
            "object": "text_completion",
            "created": t.end_ns // _NS,
            "model": p.name,
            "system_fingerprint": "fp_ollama",
            "choices": [{"text": p.text, "index": 0, "finish_reason": p.reason}],
            "usage": _usage(p),
        }
        return web.Response(body=_go_json(obj) + b"\n", content_type=_PLAIN_JSON)


# --------------------------------------------------------------------------- llama.cpp

# llama-server's sampling settings as it echoes them (captured from the real server, see
# tests/test_simulator.py); the final /completion frame carries them as generation_settings.
# fmt: off
_LLAMA_SAMPLING: dict[str, Any] = {
    "seed": 4294967295, "temperature": 0.800000011920929, "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0, "top_k": 40, "top_p": 0.949999988079071,
    "min_p": 0.05000000074505806, "top_n_sigma": -1.0, "xtc_probability": 0.0,
    "xtc_threshold": 0.10000000149011612, "typical_p": 1.0, "repeat_last_n": 64,
    "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "dry_multiplier": 0.0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 64,
}
_LLAMA_SAMPLING_TAIL: dict[str, Any] = {
    "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.10000000149011612,
    "adaptive_target": -1.0, "adaptive_decay": 0.8999999761581421,
}
_LLAMA_SAMPLERS = [
    "penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature",
]
# fmt: on
_LLAMA_BUILD = "b0-unknown"  # what a source build without git metadata reports
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _llama_generation_settings(n_predict: int, stream: bool) -> dict[str, Any]:
    out = dict(_LLAMA_SAMPLING)
    out["dry_sequence_breakers"] = ["\n", ":", '"', "*"]
    out.update(_LLAMA_SAMPLING_TAIL)
    out.update(
        {
            "stop": [],
            "max_tokens": n_predict,
            "n_predict": n_predict,
            "n_keep": 0,
            "n_discard": 0,
            "ignore_eos": False,
            "stream": stream,
            "logit_bias": [],
            "n_probs": 0,
            "min_keep": 0,
            "grammar": "",
            "grammar_lazy": False,
            "grammar_triggers": [],
            "preserved_tokens": [],
            "chat_format": "Content-only",
            "reasoning_format": "deepseek",
            "reasoning_in_content": False,
            "generation_prompt": "",
            "samplers": _LLAMA_SAMPLERS,
            "speculative.types": "none",
            "timings_per_token": False,
            "post_sampling_probs": False,
            "backend_sampling": False,
            "lora": [],
        }
    )
    return out


def _llama_props_body(model: str, ftype: str, slots: int) -> dict[str, Any]:
    params = dict(_LLAMA_SAMPLING)
    params.update(_LLAMA_SAMPLING_TAIL)
    params.update(
        {
            "max_tokens": -1,
            "n_predict": -1,
            "n_keep": 0,
            "n_discard": 0,
            "ignore_eos": False,
            "stream": False,
            "n_probs": 0,
            "min_keep": 0,
            "chat_format": "Content-only",
            "reasoning_format": "none",
            "reasoning_in_content": False,
            "generation_prompt": "",
            "samplers": _LLAMA_SAMPLERS,
            "speculative.types": "none",
            "timings_per_token": False,
            "post_sampling_probs": False,
            "backend_sampling": False,
            "lora": [],
        }
    )
    return {
        "default_generation_settings": {"params": params, "n_ctx": 4096},
        "total_slots": slots,
        "model_alias": model,
        "model_ftype": ftype,
        "model_path": model,
        "modalities": {"vision": False, "video": False, "audio": False},
        "media_marker": "<__media_simulator__>",
        "endpoint_slots": True,
        "endpoint_props": False,
        "endpoint_metrics": False,
        "ui": False,
        "ui_settings": {},
        "chat_template": (
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
            "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
        "chat_template_caps": {
            "supports_object_arguments": False,
            "supports_parallel_tool_calls": False,
            "supports_preserve_reasoning": False,
            "supports_reasoning_effort": False,
            "supports_string_content": True,
            "supports_system_role": True,
            "supports_tool_calls": False,
            "supports_tools": False,
            "supports_typed_content": False,
        },
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "build_info": _LLAMA_BUILD,
        "is_sleeping": False,
        "cors_proxy_enabled": False,
    }


def _token_id(piece: int) -> int:
    return (piece * 7919 + 253) % 49152  # a stable, plausible vocabulary id


class _LlamaBase(_Framer):
    """What llama-server does around every streamed answer.

    It sends its headers as soon as a slot takes the request (before prompt processing, so
    TTFB < TTFT), and after a streamed answer it closes the connection although it
    advertised `Keep-Alive: timeout=5, max=100` (seen on the real server: a pooled client's
    next request on that connection fails).
    """

    content_type = _SSE
    headers_at_start = True
    close_after_stream = True

    def headers(self) -> dict[str, str]:
        return {
            "Server": "llama.cpp",
            "Access-Control-Allow-Origin": "",
            "X-Accel-Buffering": "no",
            "Keep-Alive": "timeout=5, max=100",
        }

    def timings(self, t: _Timings) -> dict[str, Any]:
        n_prompt = self.plan.prompt_tokens
        n = len(self.plan.pieces)
        prompt_ms = t.prompt_eval / 1e6
        predicted_ms = t.eval / 1e6
        return {
            "cache_n": 0,
            "prompt_n": n_prompt,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / n_prompt,
            "prompt_per_second": 1e3 / prompt_ms * n_prompt,
            "predicted_n": n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / n if n else 0.0,
            "predicted_per_second": 1e3 / predicted_ms * n if n and predicted_ms else 0.0,
        }

    def stop_type(self) -> str:
        return "limit" if self.plan.reason == "length" else "eos"

    def whole_response(self, obj: dict[str, Any]) -> web.Response:
        resp = _utf8_json(orjson.dumps(obj))
        resp.headers["Access-Control-Allow-Origin"] = ""
        return resp

    def busy(self) -> web.Response:
        return _llama_error(503, "Loading model", "unavailable_error")


class _LlamaFramer(_LlamaBase):
    """Native /completion and /infill: `data: {...}\n\n` per token, a final `stop:true`
    event with timings and no `[DONE]`."""

    def __init__(self, sim: _Simulator, plan: _Plan, stream: bool, n_predict: int) -> None:
        super().__init__(sim, plan)
        self.stream = stream
        self.n_predict = n_predict
        self._i = 0
        self._tail = b',"tokens_evaluated":' + str(plan.prompt_tokens).encode() + b"}\n\n"

    def token(self, piece: int, ts_ns: int) -> bytes:
        self._i += 1
        return b"".join(
            (
                b'data: {"index":0,"content":',
                _VOCAB_JSON[piece],
                b',"tokens":[',
                str(_token_id(piece)).encode(),
                b'],"stop":false,"id_slot":-1,"tokens_predicted":',
                str(self._i).encode(),
                self._tail,
            )
        )

    def _final(self, t: _Timings, content: str) -> dict[str, Any]:
        p = self.plan
        n = len(p.pieces)
        return {
            "index": 0,
            "content": content,
            "tokens": [],
            "id_slot": p.slot,
            "stop": True,
            "model": self.sim.llama_model,
            "tokens_predicted": n,
            "tokens_evaluated": p.prompt_tokens,
            "generation_settings": _llama_generation_settings(self.n_predict, self.stream),
            "prompt": p.prompt_text,
            "has_new_line": False,
            "truncated": False,
            "stop_type": self.stop_type(),
            "stopping_word": "",
            "tokens_cached": p.prompt_tokens + max(n - 1, 0),
            "timings": self.timings(t),
        }

    def closing(self, t: _Timings) -> bytes:
        return b"data: " + orjson.dumps(self._final(t, "")) + b"\n\n"

    def whole(self, t: _Timings) -> web.Response:
        return self.whole_response(self._final(t, self.plan.text))


class _LlamaOAIChatFramer(_LlamaBase):
    """llama-server's /v1/chat/completions: keys in its (not OpenAI's) order, a role-only
    delta with `content: null` just before the first token, `delta: {}` on the finish event,
    usage (with prompt_tokens_details) only with include_usage, `timings` on the last event."""

    def __init__(self, sim: _Simulator, plan: _Plan, include_usage: bool) -> None:
        super().__init__(sim, plan)
        self.include_usage = include_usage
        self.id = "chatcmpl-" + "".join(plan.rng.choice(_ID_CHARS) for _ in range(32))
        self._first = True
        self._mid = b'}}],"created":'
        self._tail = (
            b',"id":"'
            + self.id.encode()
            + b'","model":'
            + orjson.dumps(sim.llama_model)
            + b',"system_fingerprint":"'
            + _LLAMA_BUILD.encode()
            + b'","object":"chat.completion.chunk"}\n\n'
        )

    def token(self, piece: int, ts_ns: int) -> bytes:
        return self._frame(b"content", piece, ts_ns)

    def reasoning(self, piece: int, ts_ns: int) -> bytes:
        """`--reasoning-format deepseek` (b11434, captured: tests/test_relay_llamacpp.py): the
        thinking in `reasoning_content` deltas with no `content` key."""
        return self._frame(b"reasoning_content", piece, ts_ns)

    def _frame(self, field: bytes, piece: int, ts_ns: int) -> bytes:
        created = str(ts_ns // _NS).encode()
        frame = (
            b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"' + field + b'":'
            + _VOCAB_JSON[piece]
            + self._mid
            + created
            + self._tail
        )
        if self._first:
            self._first = False
            role = (
                b'data: {"choices":[{"finish_reason":null,"index":0,"delta":'
                b'{"role":"assistant","content":null' + self._mid + created + self._tail
            )
            return role + frame
        return frame

    def _event(self, created: int, choices: list[Any], extra: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "choices": choices,
            "created": created,
            "id": self.id,
            "model": self.sim.llama_model,
            "system_fingerprint": _LLAMA_BUILD,
            "object": "chat.completion.chunk",
        }
        obj.update(extra)
        return obj

    def closing(self, t: _Timings) -> bytes:
        created = t.end_ns // _NS
        events = [
            self._event(created, [{"finish_reason": self.plan.reason, "index": 0, "delta": {}}], {})
        ]
        if self.include_usage:
            events.append(self._event(created, [], {"usage": _llama_usage(self.plan)}))
        events[-1]["timings"] = self.timings(t)
        return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    def whole(self, t: _Timings) -> web.Response:
        p = self.plan
        return self.whole_response(
            {
                "choices": [
                    {
                        "finish_reason": p.reason,
                        "index": 0,
                        "message": self._message(),
                    }
                ],
                "created": t.end_ns // _NS,
                "model": self.sim.llama_model,
                "system_fingerprint": _LLAMA_BUILD,
                "object": "chat.completion",
                "usage": _llama_usage(p),
                "id": self.id,
                "timings": self.timings(t),
            }
        )


    def _message(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": self.plan.text}
        if self.plan.thinking:  # after the content, as b11434 writes it
            message["reasoning_content"] = self.plan.thinking_text
        return message


class _LlamaOAICompletionFramer(_LlamaOAIChatFramer):
    """llama-server's /v1/completions: ids are "chatcmpl-..." there too; the final event
    always carries usage and timings."""

    def __init__(self, sim: _Simulator, plan: _Plan, include_usage: bool) -> None:
        super().__init__(sim, plan, include_usage)
        self._mid = b',"index":0,"logprobs":null,"finish_reason":null}],"created":'
        self._tail = (
            b',"model":'
            + orjson.dumps(sim.llama_model)
            + b',"system_fingerprint":"'
            + _LLAMA_BUILD.encode()
            + b'","object":"text_completion","id":"'
            + self.id.encode()
            + b'"}\n\n'
        )

    def token(self, piece: int, ts_ns: int) -> bytes:
        return (
            b'data: {"choices":[{"text":'
            + _VOCAB_JSON[piece]
            + self._mid
            + str(ts_ns // _NS).encode()
            + self._tail
        )

    def _body(self, t: _Timings, text: str) -> dict[str, Any]:
        p = self.plan
        return {
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": p.reason}],
            "created": t.end_ns // _NS,
            "model": self.sim.llama_model,
            "system_fingerprint": _LLAMA_BUILD,
            "object": "text_completion",
            "usage": _llama_usage(p),
            "id": self.id,
            "timings": self.timings(t),
        }

    def closing(self, t: _Timings) -> bytes:
        return b"data: " + orjson.dumps(self._body(t, "")) + b"\n\ndata: [DONE]\n\n"

    def whole(self, t: _Timings) -> web.Response:
        return self.whole_response(self._body(t, self.plan.text))


def _llama_usage(p: _Plan) -> dict[str, Any]:
    n = len(p.pieces)
    return {
        "completion_tokens": n,
        "prompt_tokens": p.prompt_tokens,
        "total_tokens": n + p.prompt_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def _llama_models(sim: _Simulator) -> web.Response:
    """llama-server's /v1/models: an Ollama-style `models` list and an OpenAI-style `data`."""
    name = sim.llama_model
    info = next(iter(sim.sched.models.values())).info
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": "",
        "families": [""],
        "parameter_size": "",
        "quantization_level": "",
    }
    meta = {
        "vocab_type": 2,
        "n_vocab": 49152,
        "n_ctx": 4096,
        "n_ctx_train": 8192,
        "n_embd": info.embed_dim,
        "n_params": 134515008,
        "size": info.size,
        "ftype": info.quantization,
    }
    obj = {
        "models": [
            {
                "name": name,
                "model": name,
                "modified_at": "",
                "size": "",
                "digest": "",
                "type": "model",
                "description": "",
                "tags": [""],
                "capabilities": ["completion"],
                "parameters": "",
                "details": details,
            }
        ],
        "object": "list",
        "data": [
            {
                "id": name,
                "aliases": [name],
                "tags": [],
                "object": "model",
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "created": _SEED_EPOCH_NS // _NS if sim.cfg.seed is not None else int(time.time()),
                "owned_by": "llamacpp",
                "meta": meta,
            }
        ],
    }
    return _utf8_json(orjson.dumps(obj))


def _llama_error(status: int, message: str, etype: str) -> web.Response:
    return _utf8_json(
        orjson.dumps({"error": {"code": status, "message": message, "type": etype}}), status
    )


# --------------------------------------------------------------------------- handlers


_SIM_KEY = web.AppKey("llmtap_simulator", _Simulator)


async def _json_body(request: web.Request) -> tuple[bytes, dict[str, Any] | None, str]:
    body = await request.read()
    if not body:
        return body, None, "missing request body"
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return body, None, str(exc)
    if not isinstance(obj, dict):
        return body, None, "request body must be a JSON object"
    return body, obj, ""


def _sim(request: web.Request) -> _Simulator:
    return request.app[_SIM_KEY]


async def _ollama_generate(request: web.Request) -> web.StreamResponse:
    return await _ollama_infer(request, chat=False)


async def _ollama_chat(request: web.Request) -> web.StreamResponse:
    return await _ollama_infer(request, chat=True)


async def _ollama_infer(request: web.Request, chat: bool) -> web.StreamResponse:
    sim = _sim(request)
    _, req, err = await _json_body(request)
    if req is None:
        return _ollama_error(400, err)
    name = req.get("model")
    m = sim.sched.lookup(name)
    if m is None:
        if chat and not name:
            return _ollama_error(400, "model is required")
        # v0.12.6 GenerateHandler/ChatHandler: GetModel fails with fs.ErrNotExist.
        return _ollama_error(404, f"model '{name if isinstance(name, str) else ''}' not found")
    assert isinstance(name, str)
    keep_alive = _parse_keep_alive(req.get("keep_alive"))
    if chat:
        messages = req.get("messages") or []
        text = "".join(_text_of(msg.get("content")) for msg in messages if isinstance(msg, dict))
        empty = not messages
    else:
        text = "".join(
            s
            for s in (req.get("system"), req.get("prompt"), req.get("suffix"))
            if isinstance(s, str)
        )
        empty = not req.get("prompt")
    if empty:
        return await _ollama_load_unload(request, sim, m, name, chat, keep_alive)
    raw = req.get("options")
    options = raw if isinstance(raw, dict) else {}
    limit = _positive_int(options.get("num_predict"))
    plan = sim.plan(m, name, text, limit, keep_alive, think=_asks_to_think(req))
    framer = _OllamaFramer(sim, plan, chat=chat, raw=bool(req.get("raw")))
    return await sim.run(request, plan, framer, stream=req.get("stream") is not False)


_THINK_LEVELS = ("low", "medium", "high", "max")


def _asks_to_think(req: dict[str, Any]) -> bool:
    """The request asks a thinking model to think: Ollama's `think` (true or a level), the
    OpenAI dialect's `reasoning_effort` (or Ollama's `reasoning.effort`) other than "none".
    (A real thinking model also thinks when the request says nothing; the simulator's models
    think only when asked, so that the answers of every other test stay as they were.)"""
    think = req.get("think")
    if think is True or think in _THINK_LEVELS:
        return True
    effort = req.get("reasoning_effort")
    reasoning = req.get("reasoning")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    return isinstance(effort, str) and effort != "none"


async def _ollama_load_unload(
    request: web.Request,
    sim: _Simulator,
    m: _Model,
    name: str,
    chat: bool,
    keep_alive: float | None,
) -> web.StreamResponse:
    """An empty prompt loads the model; with keep_alive 0 it unloads it (Ollama's API)."""
    now_ns = _SEED_EPOCH_NS if sim.cfg.seed is not None else time.time_ns()
    if keep_alive == 0:
        sim.sched.unload(m)
        reason = "unload"
    else:
        try:
            waiter = sim.sched.enqueue(m)
        except _QueueFull:
            sim.stats.rejected += 1
            return _ollama_error(503, _OLLAMA_BUSY)
        holding = waiter is None
        try:
            if waiter is not None:
                await sim.sched.wait_turn(m, waiter)
                holding = True
            await sim.sched.ensure_loaded(m)
        finally:
            if holding:
                sim.sched.release(m, keep_alive)
        reason = "load"
        if sim.cfg.seed is None:
            now_ns = time.time_ns()
    obj: dict[str, Any] = {"model": name, "created_at": _go_time(now_ns)}
    if chat:
        obj["message"] = {"role": "assistant", "content": ""}
    else:
        obj["response"] = ""
    obj["done"] = True
    obj["done_reason"] = reason
    return _gin(obj)


def _embedding(rng: random.Random, dim: int) -> list[float]:
    """A unit vector like Ollama's normalize(): float32 values, 6 significant digits."""
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    out = []
    for v in vec:
        x = v / norm
        if abs(x) < 1e-3:  # keep Go's and orjson's number formats identical (no exponent)
            x = math.copysign(1e-3, x)
        out.append(float(f"{x:.6g}"))
    return out


async def _embed_common(
    request: web.Request, m: _Model, name: str, inputs: list[str]
) -> tuple[_Plan, list[list[float]]] | web.Response:
    sim = _sim(request)
    plan = sim.plan(m, name, "".join(inputs), 0)
    plan.pieces = []
    plan.prompt_tokens = sum(_count_tokens(s) for s in inputs)
    try:
        waiter = sim.sched.enqueue(m)
    except _QueueFull:
        sim.stats.rejected += 1
        return _ollama_error(503, _OLLAMA_BUSY)
    sim.stats.started += 1
    loop = asyncio.get_running_loop()
    plan.t_arrival = loop.time()
    holding = waiter is None
    try:
        if waiter is not None:
            await sim.sched.wait_turn(m, waiter)
            holding = True
        plan.t_turn = loop.time()
        await sim.sched.ensure_loaded(m)
        plan.t_loaded = loop.time()
        # An embedding costs about one prompt pass: the time-to-first-token.
        await asyncio.sleep(sim.cfg.ttft)
        vectors = [_embedding(plan.rng, m.info.embed_dim) for _ in inputs]
    except asyncio.CancelledError:
        sim._count_cancel()
        raise
    else:
        sim.stats.completed += 1
    finally:
        if holding:
            sim.sched.release(m, None)
    return plan, vectors


def _inputs(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


async def _ollama_embed(request: web.Request) -> web.StreamResponse:
    sim = _sim(request)
    _, req, err = await _json_body(request)
    if req is None:
        return _ollama_error(400, err)
    name = req.get("model")
    m = sim.sched.lookup(name)
    if m is None:
        return _ollama_error(404, f'model "{name}" not found, try pulling it first')
    assert isinstance(name, str)
    inputs = _inputs(req.get("input", []))
    if inputs is None:
        return _ollama_error(400, "invalid input type")
    res = await _embed_common(request, m, name, inputs)
    if isinstance(res, web.Response):
        return res
    plan, vectors = res
    t = sim.timings(plan, asyncio.get_running_loop().time())
    obj: dict[str, Any] = {"model": name, "embeddings": vectors}
    obj.update({k: v for k, v in (("total_duration", t.total), ("load_duration", t.load)) if v})
    if plan.prompt_tokens:
        obj["prompt_eval_count"] = plan.prompt_tokens
    return _gin(obj)


async def _ollama_embeddings(request: web.Request) -> web.StreamResponse:
    sim = _sim(request)
    _, req, err = await _json_body(request)
    if req is None:
        return _ollama_error(400, err)
    name = req.get("model")
    if not name:
        return _ollama_error(400, "model is required")
    m = sim.sched.lookup(name)
    if m is None:
        return _ollama_error(404, f'model "{name}" not found, try pulling it first')
    assert isinstance(name, str)
    prompt = req.get("prompt") if isinstance(req.get("prompt"), str) else ""
    res = await _embed_common(request, m, name, [prompt] if prompt else [])
    if isinstance(res, web.Response):
        return res
    _plan, vectors = res
    # api.EmbeddingResponse is []float64: float32 values widened, so full float64 digits.
    vec = [struct.unpack("f", struct.pack("f", v))[0] for v in vectors[0]] if vectors else []
    return _gin({"embedding": vec})


async def _ollama_version(request: web.Request) -> web.Response:
    return _gin({"version": _sim(request).cfg.version})


async def _ollama_root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


def _sorted_infos(sim: _Simulator) -> list[_ModelInfo]:
    # ListHandler: most recently modified first.
    return sorted(
        (m.info for m in sim.sched.models.values()), key=lambda i: -(i.modified_ns // _NS)
    )


async def _ollama_tags(request: web.Request) -> web.Response:
    models = [
        {
            "name": i.name,
            "model": i.name,
            "modified_at": _go_time(i.modified_ns, local=True),
            "size": i.size,
            "digest": i.digest,
            # 0.34.4's tags add the lengths to details, and what the model can do.
            "details": {**_details(i), "context_length": 8192, "embedding_length": i.embed_dim},
            "capabilities": ["completion"],
        }
        for i in _sorted_infos(_sim(request))
    ]
    return _gin({"models": models})


async def _ollama_ps(request: web.Request) -> web.Response:
    sim = _sim(request)
    loaded = sorted(sim.sched.loaded_models(), key=lambda m: -(m.expires_ns // _NS))
    models = [
        {
            "name": m.info.name,
            "model": m.info.name,
            "size": m.info.size,
            "digest": m.info.digest,
            "details": _details(m.info),
            "expires_at": _go_time(m.expires_ns, local=True),
            "size_vram": m.info.size,
            "context_length": 4096,
        }
        for m in loaded
    ]
    return _gin({"models": models})


async def _ollama_pull(request: web.Request) -> web.StreamResponse:
    """`ollama pull` of a model the simulator serves: a new build arrives, with a new digest.

    The real endpoint downloads layers and streams progress; here the progress is the
    documented start and end lines, and the effect is what operators pin against: the
    installed digest changes.
    """
    try:
        body = await request.json()
    except ValueError:
        return _gin({"error": "invalid request body"}, 400)
    model = _sim(request).sched.lookup(body.get("model") or body.get("name"))
    if model is None:
        return _gin({"error": "pull model manifest: file does not exist"}, 500)
    fresh = hashlib.sha256((model.info.digest + ":pulled").encode()).hexdigest()
    model.info = dataclasses.replace(model.info, digest=fresh,
                                     modified_ns=model.info.modified_ns + 3600 * _NS)
    lines = [{"status": "pulling manifest"}, {"status": "verifying sha256 digest"},
             {"status": "writing manifest"}, {"status": "success"}]
    if body.get("stream") is False:
        return _gin(lines[-1])
    return web.Response(body=b"".join(_go_json(line) + b"\n" for line in lines),
                        content_type="application/x-ndjson")


async def _openai_chat(request: web.Request) -> web.StreamResponse:
    return await _openai_infer(request, chat=True)


async def _openai_completions(request: web.Request) -> web.StreamResponse:
    return await _openai_infer(request, chat=False)


async def _openai_infer(request: web.Request, chat: bool) -> web.StreamResponse:
    sim = _sim(request)
    llama = sim.cfg.openai_flavor == "llama.cpp"
    _, req, err = await _json_body(request)
    if req is None:
        if llama:
            return _llama_error(400, err, "invalid_request_error")
        return _oai_error(400, err, "invalid_request_error", gin=True)
    if chat:
        messages = req.get("messages")
        if not llama and (not isinstance(messages, list) or not messages):
            return _oai_error(
                400, "[] is too short - 'messages'", "invalid_request_error", gin=True
            )
        messages = messages if isinstance(messages, list) else []
        text = "".join(_text_of(msg.get("content")) for msg in messages if isinstance(msg, dict))
    else:
        prompt = req.get("prompt")
        text = prompt if isinstance(prompt, str) else "".join(_inputs(prompt) or [])
    name = req.get("model")
    if llama:
        m = next(iter(sim.sched.models.values()))  # llama-server ignores `model`
        name = sim.llama_model
    else:
        found = sim.sched.lookup(name)
        if found is None:
            return _oai_error(404, f"model '{name if isinstance(name, str) else ''}' not found",
                              "not_found_error")
        m = found
    assert isinstance(name, str)
    limit = _positive_int(req.get("max_tokens")) or _positive_int(req.get("max_completion_tokens"))
    plan = sim.plan(m, name, text, limit, think=chat and _asks_to_think(req))
    so = req.get("stream_options")
    include_usage = isinstance(so, dict) and so.get("include_usage") is True
    framer: _Framer
    if llama:
        framer = (_LlamaOAIChatFramer if chat else _LlamaOAICompletionFramer)(
            sim, plan, include_usage
        )
    else:
        framer = (_OpenAIChatFramer if chat else _OpenAICompletionFramer)(sim, plan, include_usage)
    return await sim.run(request, plan, framer, stream=req.get("stream") is True)


async def _openai_embeddings(request: web.Request) -> web.StreamResponse:
    sim = _sim(request)
    _, req, err = await _json_body(request)
    if req is None:
        return _oai_error(400, err, "invalid_request_error", gin=True)
    raw_input = req.get("input")
    inputs = [""] if raw_input == "" else _inputs(raw_input)
    if not inputs:
        return _oai_error(400, "invalid input", "invalid_request_error", gin=True)
    name = req.get("model")
    m = sim.sched.lookup(name)
    if m is None:
        return _oai_error(404, f'model "{name}" not found, try pulling it first',
                          "not_found_error")
    assert isinstance(name, str)
    res = await _embed_common(request, m, name, inputs)
    if isinstance(res, web.Response):
        return _oai_error(503, _OLLAMA_BUSY)
    plan, vectors = res
    obj = {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)
        ],
        "model": name,
        "usage": {"prompt_tokens": plan.prompt_tokens, "total_tokens": plan.prompt_tokens},
    }
    return web.Response(body=_go_json(obj) + b"\n", content_type=_PLAIN_JSON)


async def _openai_models(request: web.Request) -> web.Response:
    sim = _sim(request)
    if sim.cfg.openai_flavor == "llama.cpp":
        return _llama_models(sim)
    data = [
        {"id": i.name, "object": "model", "created": i.modified_ns // _NS, "owned_by": "library"}
        for i in _sorted_infos(_sim(request))
    ]
    return web.Response(
        body=_go_json({"object": "list", "data": data}) + b"\n", content_type=_PLAIN_JSON
    )


async def _llama_completion(request: web.Request) -> web.StreamResponse:
    sim = _sim(request)
    _, req, err = await _json_body(request)
    if req is None:
        return _llama_error(400, err or "Invalid request", "invalid_request_error")
    prompt = req.get("prompt")
    text = prompt if isinstance(prompt, str) else "".join(_inputs(prompt) or [])
    if request.path == "/infill":
        text = "".join(
            s
            for s in (req.get("input_prefix"), text, req.get("input_suffix"))
            if isinstance(s, str)
        )
    # llama-server serves its one model whatever name the client sends.
    m = next(iter(sim.sched.models.values()))
    n_predict = req.get("n_predict", -1)
    limit = _positive_int(n_predict)
    plan = sim.plan(m, sim.llama_model, text, limit)
    stream = req.get("stream") is True
    framer = _LlamaFramer(sim, plan, stream, n_predict if isinstance(n_predict, int) else -1)
    return await sim.run(request, plan, framer, stream=stream)


async def _llama_health(request: web.Request) -> web.Response:
    return _utf8_json(b'{"status":"ok"}')


async def _llama_props(request: web.Request) -> web.Response:
    sim = _sim(request)
    info = next(iter(sim.sched.models.values())).info
    body = orjson.dumps(_llama_props_body(sim.llama_model, info.quantization, sim.cfg.parallel))
    return _utf8_json(body)


async def _sim_stats(request: web.Request) -> web.Response:
    sim = _sim(request)
    s = sim.stats
    models = sim.sched.models.values()
    obj = {
        "started": s.started,
        "completed": s.completed,
        "cancelled": s.cancelled,
        "rejected": s.rejected,
        "active": sum(m.active for m in models),
        "queued": {m.info.name: m.queued for m in models},
        "loaded": [m.info.name for m in sim.sched.loaded_models()],
        "loads": s.loads,
        "last_cancel_monotonic": s.last_cancel_monotonic,
    }
    return web.json_response(obj, dumps=lambda o: orjson.dumps(o).decode())


async def _sim_reset(request: web.Request) -> web.Response:
    _sim(request).stats.reset()
    return await _sim_stats(request)


# --------------------------------------------------------------------------- app


def create_app(config: SimulatorConfig) -> web.Application:
    """The simulator as an aiohttp app. Serve it with handler_cancellation=True."""
    if not config.models:
        raise ValueError("SimulatorConfig.models must name at least one model")
    if config.parallel < 1:
        raise ValueError("SimulatorConfig.parallel must be >= 1")
    if config.openai_flavor not in ("ollama", "llama.cpp"):
        raise ValueError('SimulatorConfig.openai_flavor must be "ollama" or "llama.cpp"')
    app = web.Application()

    async def _init(app: web.Application) -> None:
        # Built on the serving loop: the scheduler owns asyncio primitives.
        app[_SIM_KEY] = _Simulator(config)

    app.on_startup.append(_init)
    r = app.router
    r.add_get("/", _ollama_root)
    r.add_post("/api/generate", _ollama_generate)
    r.add_post("/api/chat", _ollama_chat)
    r.add_post("/api/embed", _ollama_embed)
    r.add_post("/api/embeddings", _ollama_embeddings)
    r.add_get("/api/version", _ollama_version)
    r.add_get("/api/tags", _ollama_tags)
    r.add_get("/api/ps", _ollama_ps)
    r.add_post("/api/pull", _ollama_pull)
    r.add_post("/v1/chat/completions", _openai_chat)
    r.add_post("/v1/completions", _openai_completions)
    r.add_post("/v1/embeddings", _openai_embeddings)
    r.add_get("/v1/models", _openai_models)
    r.add_post("/completion", _llama_completion)
    r.add_post("/completions", _llama_completion)
    r.add_post("/infill", _llama_completion)
    r.add_get("/health", _llama_health)
    r.add_get("/props", _llama_props)
    r.add_get("/sim/stats", _sim_stats)
    r.add_post("/sim/reset", _sim_reset)
    return app


async def start_simulator(
    config: SimulatorConfig, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Start serving in the running loop; returns the runner (cleanup() it) and the port."""
    # handler_cancellation: a client disconnect cancels the handler, also while it is queued
    # or loading before any byte was sent, which is what real servers do and what
    # /sim/stats "cancelled" measures.
    runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    # A real server's backlog (Linux's somaxconn is 4096): with aiohttp's 128, a burst of a
    # few hundred connections had SYNs dropped and retried a second later, which a benchmark
    # then measured as the server's latency.
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, bound


async def run_simulator(config: SimulatorConfig, host: str, port: int) -> None:
    """Serve forever (until cancelled)."""
    runner, _ = await start_simulator(config, host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
