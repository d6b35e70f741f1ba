"""Session-wide real servers: one llama-server and one Ollama (SmolLM2), one simulator, llmtap
before each.

A real part that CI is meant to have and that is missing fails the run (RuntimeError in the
fixture), it never skips.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import LlamaServer, Llmtap, Ollama, RedisServer, Simulator

# Fast, deterministic simulator answers; several requests per model at once so tests that
# do not look at queueing do not queue.
SIM_ARGS = ("--seed", "7", "--ttft", "0.02", "--tokens-per-second", "400",
            "--output-tokens", "12", "--parallel", "8", "--models", "sim-small,sim-large")


@pytest.fixture(scope="session")
def llama_server() -> Iterator[LlamaServer]:
    server = LlamaServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_tap(llama_server: LlamaServer) -> Iterator[Llmtap]:
    tap = Llmtap(llama_server.url)
    yield tap
    tap.stop()


@pytest.fixture(scope="session")
def ollama() -> Iterator[Ollama]:
    server = Ollama()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sim() -> Iterator[Simulator]:
    server = Simulator(*SIM_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sim_tap(sim: Simulator) -> Iterator[Llmtap]:
    tap = Llmtap(sim.url)
    yield tap
    tap.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real Redis for the router's shared-state tests; each test uses its own prefix."""
    server = RedisServer()
    yield server
    server.stop()
