"""`llmtap demo`: the simulator, llmtap in front of it, a little traffic, and where to look."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

import aiohttp
from aiohttp import web

from exporter.config import HostPort, Settings
from exporter.server import Sidecar
from exporter.simulator import SimulatorConfig, create_app
from exporter.telemetry.logs import configure

MODELS = ["sim-small", "sim-large"]


def _requests(count: int) -> list[tuple[str, dict[str, object]]]:
    """A mix of dialects, streamed and not, spread over both models."""
    shapes: list[tuple[str, dict[str, object]]] = [
        ("/api/chat", {"messages": [{"role": "user", "content": "Why is the sky blue?"}]}),
        ("/api/generate", {"prompt": "Write a haiku about GPUs.", "stream": False}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello!"}],
                                  "stream": True, "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16}),
    ]
    out = []
    for i in range(count):
        path, body = shapes[i % len(shapes)]
        out.append((path, {**body, "model": MODELS[1 if i % 3 == 2 else 0]}))
    return out


async def _send(session: aiohttp.ClientSession, base: str, path: str,
                body: dict[str, object]) -> None:
    async with session.post(base + path, json=body) as resp:
        async for _ in resp.content.iter_any():
            pass


def _summary(sidecar: Sidecar) -> str:
    """Per model: requests, mean TTFT and TPOT, tokens — read back from llmtap's registry."""
    totals: dict[str, dict[str, float]] = {}
    wanted = {
        "gen_ai_server_request_duration_seconds_count": "requests",
        "gen_ai_server_time_to_first_token_seconds_sum": "ttft_sum",
        "gen_ai_server_time_to_first_token_seconds_count": "ttft_n",
        "gen_ai_server_time_per_output_token_seconds_sum": "tpot_sum",
        "gen_ai_server_time_per_output_token_seconds_count": "tpot_n",
    }
    for family in sidecar.registry.collect():
        for sample in family.samples:
            model = sample.labels.get("gen_ai_request_model")
            if model is None:
                continue
            row = totals.setdefault(model, {})
            key = wanted.get(sample.name)
            if sample.name == "gen_ai_client_token_usage_sum":
                key = "tokens_" + sample.labels["gen_ai_token_type"]
            if key is not None:
                row[key] = row.get(key, 0.0) + sample.value
    lines = [f"{'model':<18}{'requests':>9}{'TTFT mean':>12}{'TPOT mean':>12}"
             f"{'tokens in':>11}{'tokens out':>11}"]
    for model, row in sorted(totals.items()):
        ttft = f"{row['ttft_sum'] / row['ttft_n'] * 1000:.1f} ms" if row.get("ttft_n") else "-"
        tpot = f"{row['tpot_sum'] / row['tpot_n'] * 1000:.1f} ms" if row.get("tpot_n") else "-"
        lines.append(f"{model:<18}{row.get('requests', 0):>9.0f}{ttft:>12}{tpot:>12}"
                     f"{row.get('tokens_input', 0):>11.0f}{row.get('tokens_output', 0):>11.0f}")
    return "\n".join(lines)


async def run_demo(listen: HostPort, admin: HostPort, count: int, exit_after: bool) -> int:
    configure("error", "console")
    simulator = web.AppRunner(create_app(SimulatorConfig(models=MODELS, ttft=0.08,
                                                         tokens_per_second=60,
                                                         output_tokens=24, cold_load=0.4)),
                              handler_cancellation=True)
    await simulator.setup()
    site = web.TCPSite(simulator, "127.0.0.1", 0)
    await site.start()
    sim_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    upstream = f"http://127.0.0.1:{sim_port}"
    sidecar = Sidecar(Settings(upstream=upstream, listen=listen, admin_listen=admin,
                               access_log=False, log_format="console", log_level="error"))
    try:
        await sidecar.start()
        proxy = f"http://{listen.host}:{sidecar.proxy_address.port}"  # type: ignore[union-attr]
        metrics = f"http://{admin.host}:{sidecar.admin_address.port}"  # type: ignore[union-attr]
        print(f"simulator (stands in for Ollama): {upstream}")
        print(f"llmtap proxy: {proxy}    admin: {metrics}")
        print(f"sending {count} requests through llmtap, several at once so they queue ...")
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(_send(session, proxy, path, body)
                                   for path, body in _requests(count)))
        print()
        print(_summary(sidecar))
        print()
        print("where to look:")
        print(f"  live, in another terminal:  llmtap top {metrics}")
        print(f"  curl -s {metrics}/metrics | grep -E '^(gen_ai|llmtap)_'")
        print(f"  curl -s {metrics}/llmtap/v1/state")
        print(f"  send your own:  curl -s {proxy}/api/chat -d "
              "'{\"model\":\"sim-small\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'")
        sys.stdout.flush()
        if not exit_after:
            print("serving until Ctrl-C ...")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        return 0
    finally:
        with contextlib.suppress(Exception):
            await sidecar.stop()
        await simulator.cleanup()
