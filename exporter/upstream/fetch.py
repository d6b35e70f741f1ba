"""GETs against the upstream for the pollers: short timeouts, None instead of exceptions."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

POLL_TIMEOUT_S = 5.0
POLL_TIMEOUT = aiohttp.ClientTimeout(total=POLL_TIMEOUT_S, sock_connect=2)
# The largest poll answer read: a model list of thousands of models, or llama.cpp's /metrics,
# is well under it. A server that sends more (an endless body) gets its poll counted as failed
# instead of filling llmtap's memory for the 5 s the timeout allows.
MAX_POLL_BYTES = 8 << 20


class Fetcher:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Its own session: a hanging upstream holds only poll connections, never the
            # relay's pool.
            self._session = aiohttp.ClientSession(timeout=POLL_TIMEOUT)
        return self._session

    async def get(self, path: str, body: Any = None) -> tuple[int, bytes] | None:
        """GET (or POST `body` as JSON): status and body, None on any failure."""
        method = "GET" if body is None else "POST"
        data = None if body is None else orjson.dumps(body)
        try:
            async with self._client().request(
                    method, self.base_url + path, data=data, allow_redirects=False,
                    headers=None if data is None else {"Content-Type": "application/json"}) \
                    as resp:
                body = await resp.content.read(MAX_POLL_BYTES + 1)
                if len(body) > MAX_POLL_BYTES:
                    return None
                while len(body) <= MAX_POLL_BYTES and (more := await resp.content.read(
                        MAX_POLL_BYTES + 1 - len(body))):
                    body += more
                return (resp.status, body) if len(body) <= MAX_POLL_BYTES else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def json(self, path: str, body: Any = None) -> Any:
        """The parsed body of a 200 JSON answer (to a GET, or a POST of `body`), else None."""
        answer = await self.get(path, body)
        if answer is None or answer[0] != 200:
            return None
        try:
            return orjson.loads(answer[1])
        except orjson.JSONDecodeError:
            return None

    async def text(self, path: str) -> str | None:
        answer = await self.get(path)
        if answer is None or answer[0] != 200:
            return None
        return answer[1].decode("utf-8", "replace")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
