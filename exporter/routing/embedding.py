"""Text to vectors for the learned classifier, two ways:

- `wordllama` (the default): WordLlama's l2_supercat static token embeddings, 256
  dimensions, whose weights (16 MB) and tokenizer ship inside the PyPI wheel: loaded from
  there with downloads disabled, so the router never reaches out to a model hub. A text's
  vector is the mean of its tokens' vectors, normalised: ~0.1 ms per request on one core.
- `server`: the operator's own model server's embeddings endpoint (`/v1/embeddings` of
  llama-server started with `--embeddings`, vLLM, or Ollama's `/api/embed`): better vectors
  from a real model, at the cost of a request to it per classification.

A model is trained against one embedder and only works with that one: the model file says
which, and loading checks it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from exporter.routing.threads import Threads

WORDLLAMA_CONFIG = "l2_supercat"
WORDLLAMA_DIM = 256
# Its dimensions are trained nested (Matryoshka): the first 64 or 128 are an embedding of
# their own. Fewer features fit better from a thousand labelled tasks, and faster.
WORDLLAMA_DIMS = (64, 128, 256)


class Embedder(Protocol):
    dim: int

    def describe(self) -> dict[str, Any]: ...

    async def embed(self, texts: list[str]) -> np.ndarray: ...

    def embed_many(self, texts: list[str]) -> np.ndarray: ...

    async def close(self) -> None: ...


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


class WordLlamaEmbedder:
    def __init__(self, threads: Threads | None = None, dim: int = WORDLLAMA_DIM) -> None:
        if dim not in WORDLLAMA_DIMS:
            raise ValueError(f"wordllama dimensions: one of {WORDLLAMA_DIMS}, not {dim}")
        # wordllama calls logging.basicConfig(level=INFO) when imported, which would give the
        # root logger a stderr handler and turn on every library's INFO lines; the router
        # logs through structlog, so that side effect is undone here.
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        try:
            import wordllama
            from wordllama import WordLlama
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        # Its loader looks for the tokenizer under "<package>/tokenizer/" but the wheel has it
        # under "tokenizers/", which is where it looks inside a cache_dir: the package's own
        # directory as cache_dir finds both files, and downloads stay disabled.
        package = Path(wordllama.__file__).parent
        self.model = WordLlama.load(WORDLLAMA_CONFIG, dim=WORDLLAMA_DIM, cache_dir=package,
                                    disable_download=True)
        self.dim = dim
        self.threads = threads or Threads()

    def describe(self) -> dict[str, Any]:
        return {"kind": "wordllama", "config": WORDLLAMA_CONFIG, "dim": self.dim}

    def embed_many(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # An empty text has no tokens: its vector is zeros (wordllama's would be NaN).
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        filled = [i for i, t in enumerate(texts) if t.strip()]
        if filled:
            raw = self.model.embed([texts[i] for i in filled], norm=False)
            # Mean pooling is linear: slicing the pooled vector is slicing every token's.
            vectors[filled] = _normalised(np.asarray(raw, dtype=np.float32)[:, :self.dim])
        return vectors

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await self.threads.run(self.embed_many, texts)

    async def close(self) -> None:
        pass


class NoEmbedder:
    """For a model that reads no embedding (cues and scalars only): nothing to load."""

    dim = 0

    def describe(self) -> dict[str, Any]:
        return {"kind": "none", "dim": 0}

    def embed_many(self, texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts), 0), dtype=np.float32)

    async def embed(self, texts: list[str]) -> np.ndarray:
        return self.embed_many(texts)

    async def close(self) -> None:
        pass


class ServerEmbedder:
    """An OpenAI-compatible `/v1/embeddings` (or Ollama `/api/embed`) endpoint."""

    def __init__(self, url: str, model: str = "", dim: int = 0, timeout: float = 5.0) -> None:
        self.url = url
        self.model = model
        self.dim = dim
        self.timeout = timeout
        self._session: Any = None

    def describe(self) -> dict[str, Any]:
        return {"kind": "server", "model": self.model, "dim": self.dim}

    def _payload(self, texts: list[str]) -> dict[str, Any]:
        payload: dict[str, Any] = {"input": [t or " " for t in texts]}
        if self.model:
            payload["model"] = self.model
        return payload

    def _vectors(self, data: Any) -> np.ndarray:
        if isinstance(data, dict) and isinstance(data.get("embeddings"), list):  # Ollama
            rows = data["embeddings"]
        else:  # OpenAI: {"data": [{"index": i, "embedding": [...]}]}
            items = sorted(data["data"], key=lambda d: d.get("index", 0))
            rows = [d["embedding"] for d in items]
        vectors = np.asarray(rows, dtype=np.float32)
        if vectors.ndim == 3:  # llama-server without pooling: one vector per token
            vectors = vectors.mean(axis=1)
        if self.dim and vectors.shape[1] != self.dim:
            raise ValueError(f"the embeddings endpoint gives {vectors.shape[1]} dimensions; "
                             f"the model was trained on {self.dim}")
        self.dim = vectors.shape[1]
        return _normalised(vectors)

    async def embed(self, texts: list[str]) -> np.ndarray:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.post(self.url, json=self._payload(texts)) as response:
            response.raise_for_status()
            return self._vectors(await response.json(content_type=None))

    def embed_many(self, texts: list[str], batch: int = 32) -> np.ndarray:
        """For training: many texts, in batches, from synchronous code."""
        import urllib.request

        import orjson

        out = []
        for i in range(0, len(texts), batch):
            request = urllib.request.Request(
                self.url, data=orjson.dumps(self._payload(texts[i:i + batch])),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                out.append(self._vectors(orjson.loads(response.read())))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_embedder(spec: dict[str, Any], url: str = "", model: str = "",
                  threads: Threads | None = None) -> Embedder:
    """The embedder a model file names (`spec`), with the server's URL from the config."""
    if spec.get("kind") == "wordllama":
        if spec.get("config") != WORDLLAMA_CONFIG or spec.get("dim") not in WORDLLAMA_DIMS:
            raise ValueError(f"the model was trained on wordllama {spec}; this llmtap ships "
                             f"{WORDLLAMA_CONFIG} in {WORDLLAMA_DIMS} dimensions")
        return WordLlamaEmbedder(threads, int(spec["dim"]))
    if spec.get("kind") == "server":
        if not url:
            raise ValueError("the model was trained on a server's embeddings: set "
                             "classifier.embeddings.url")
        return ServerEmbedder(url, model or str(spec.get("model") or ""),
                              int(spec.get("dim") or 0))
    raise ValueError(f"unknown embedder {spec!r}")
