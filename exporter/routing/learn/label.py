"""Labels from the operator's own local model: each task is sent to it (temperature 0) and
its answer checked; light = it answered right, so the request can stay local.

The labelled set keeps the request, the verdict and the start of the answer (to audit the
checkers), one JSON object a line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from exporter.routing.learn.checks import check

ANSWER_KEPT = 160  # characters of each answer kept in the labelled set


async def _answer(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                  model: str) -> str:
    payload = {**body, "stream": False, **({"model": model} if model else {})}
    async with session.post(url, json=payload) as response:
        response.raise_for_status()
        data = await response.json(content_type=None)
    choice = (data.get("choices") or [{}])[0]
    return str((choice.get("message") or {}).get("content") or "")


async def label(tasks: Iterable[dict[str, Any]], base_url: str, model: str = "",
                concurrency: int = 2, per_task: float = 120.0,
                progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Run every task on the local server's OpenAI chat completions API and check it."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
    todo = list(tasks)
    results: list[dict[str, Any] | None] = [None] * len(todo)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(todo)):
        queue.put_nowait(i)
    done = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while not queue.empty():
            i = queue.get_nowait()
            task = todo[i]
            started = time.monotonic()
            answer = await _answer(session, url, task["body"], model)
            # A code check runs a subprocess: off the event loop, so the other worker's
            # request keeps the model busy meanwhile.
            right = await asyncio.to_thread(check, answer, task["check"])
            results[i] = {"id": task["id"], "family": task["family"], "level": task["level"],
                          "body": task["body"], "check": task["check"],
                          "local_correct": right, "answer": answer[:ANSWER_KEPT],
                          "seconds": round(time.monotonic() - started, 3)}
            done += 1
            if progress is not None:
                progress(done, len(todo))

    async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=per_task)) as session:
        await asyncio.gather(*(worker(session) for _ in range(max(1, concurrency))))
    return [r for r in results if r is not None]
