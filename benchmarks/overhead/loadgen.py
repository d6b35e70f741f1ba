"""Open-loop load generator: its own process, so its work never shares a loop with a proxy.

    python -m benchmarks.overhead.loadgen --url URL --dialect ollama|openai --rate R \
        --count N [--no-stream] [--tokens K] --out FILE.json

Request i starts at t0 + i / rate whatever happened to the earlier ones (open loop: a slow
proxy builds a queue instead of slowing the client down, so its queueing shows in TTFT).
Each response is kept as (arrival time, bytes) per read and cut into frames afterwards, so
the reading loop does nothing but stamp and store. Written per request: TTFT (first frame with
generated content), the gaps between content frames, the content pieces in order (for the
lost/reordered check) and how late the request started against its schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import itertools
import json
import time
from typing import Any

import aiohttp
import orjson

PATHS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
WALL_OFFSET = time.time() - time.perf_counter()


def request_body(dialect: str, index: int, tokens: int, stream: bool,
                 model: str = "sim-small") -> bytes:
    """A distinct prompt per request: the seeded simulator answers each one differently."""
    messages = [{"role": "user", "content": f"request {index}: why is the sky blue?"}]
    if dialect == "ollama":
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream,
                                "options": {"num_predict": tokens}}
    else:
        body = {"model": model, "messages": messages, "stream": stream,
                "max_tokens": tokens}
    # Python's own json layout: a proxy that parses and re-serialises the body with it (LiteLLM)
    # sends the upstream the very same bytes, so the seeded answer stays comparable.
    return json.dumps(body).encode()


def content_frames(dialect: str, stream: bool, reads: list[tuple[float, bytes]]
                   ) -> list[tuple[float, str, int]]:
    """(arrival, content piece) for every frame carrying generated text, in wire order.

    A frame's arrival is that of the read that completed it. Works on what came over the
    wire, so a proxy that re-frames (LiteLLM re-serialises SSE) is judged on content."""
    if not stream:
        whole = b"".join(chunk for _, chunk in reads)
        try:
            answer = orjson.loads(whole)
        except orjson.JSONDecodeError:
            return []
        text = (answer.get("message") or {}).get("content") if dialect == "ollama" else \
            ((answer.get("choices") or [{}])[0].get("message") or {}).get("content")
        return [(reads[-1][0], text, 0)] if text else []
    separator = b"\n" if dialect == "ollama" else b"\n\n"
    frames: list[tuple[float, str, int]] = []
    pending = b""
    for arrival, chunk in reads:
        pending += chunk
        *complete, pending = pending.split(separator)
        for frame in complete:
            piece, created = _piece(dialect, frame.strip())
            if piece:
                frames.append((arrival, piece, created))
    return frames


def _piece(dialect: str, frame: bytes) -> tuple[str, int]:
    """The generated text of one frame, and (Ollama) when the upstream made it, in ns."""
    if not frame:
        return "", 0
    if dialect == "openai":
        if not frame.startswith(b"data:"):
            return "", 0
        frame = frame[5:].strip()
        if frame == b"[DONE]":
            return "", 0
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return "", 0
    if dialect == "ollama":
        return (event.get("message") or {}).get("content") or "", _go_ns(event.get("created_at"))
    choices = event.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or "", 0


def _go_ns(stamp: Any) -> int:
    """Wall-clock ns of a Go RFC 3339 UTC time ("2026-11-30T09:30:01.123456789Z"); 0 if not."""
    if not isinstance(stamp, str) or not stamp.endswith("Z"):
        return 0
    head, _, fraction = stamp[:-1].partition(".")
    try:
        seconds = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0
    return seconds * 1_000_000_000 + int((fraction + "000000000")[:9] or 0)


async def one(session: aiohttp.ClientSession, url: str, body: bytes, dialect: str,
              stream: bool, due: float) -> dict[str, Any]:
    start = time.perf_counter()
    reads: list[tuple[float, bytes]] = []
    status = 0
    error = ""
    try:
        async with session.post(url, data=body,
                                headers={"Content-Type": "application/json"}) as response:
            status = response.status
            read = response.content.readany
            while chunk := await read():
                reads.append((time.perf_counter(), chunk))
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = type(exc).__name__
    frames = content_frames(dialect, stream, reads) if status == 200 else []
    ttft = frames[0][0] - start if frames else None
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(frames)]
    # Upstream-to-client delay of each frame the upstream stamped with the wall clock (an
    # unseeded simulator's Ollama frames): a stall anywhere on the path shows up here.
    delays = [arrival + WALL_OFFSET - created / 1e9
              for arrival, _, created in frames if created]
    return {"late": start - due, "status": status, "error": error, "ttft": ttft,
            "gaps": gaps, "delays": delays, "pieces": [piece for _, piece, _ in frames],
            "total": (reads[-1][0] - start) if reads else None}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    url = args.url.rstrip("/") + PATHS[args.dialect]
    bodies = [request_body(args.dialect, args.first + i, args.tokens, args.stream, args.model)
              for i in range(args.count)]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    # A request still unanswered after a minute is a failure to report, not a wait to sit out.
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Unmeasured: open the connections a steady client would already hold, so the first
        # scheduled requests do not pay for TCP set-up (which is no proxy's per-request cost).
        warm = [request_body(args.dialect, -1 - i, 2, args.stream, args.model)
                for i in range(args.warmup)]
        await asyncio.gather(*(one(session, url, body, args.dialect, args.stream, 0.0)
                               for body in warm))
        tasks: list[asyncio.Task[dict[str, Any]]] = []
        t0 = time.perf_counter() + 0.05
        for i, body in enumerate(bodies):
            due = t0 + i / args.rate if args.rate > 0 else t0  # rate 0: all at once (burst)
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(
                one(session, url, body, args.dialect, args.stream, due)))
        results = await asyncio.gather(*tasks)
    for index, result in enumerate(results):
        result["index"] = args.first + index
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--dialect", choices=sorted(PATHS), required=True)
    parser.add_argument("--rate", type=float, required=True,
                        help="requests started per second (0: all at once)")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first prompt")
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--model", default="sim-small")
    parser.add_argument("--warmup", type=int, default=0,
                        help="unmeasured requests sent at once first, to open connections")
    parser.add_argument("--no-stream", dest="stream", action="store_false")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()  # the same loop for every target: the client is never the variable
    except ImportError:
        pass
    results = asyncio.run(run(args))
    with open(args.out, "wb") as out:
        out.write(orjson.dumps(results))


if __name__ == "__main__":
    main()
