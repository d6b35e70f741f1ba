"""`llmtap serve | route | simulate | demo | top | ...`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from exporter import __version__
from exporter.config import ConfigError, add_arguments, parse_host_port, resolve

DESCRIPTION = """\
llmtap: an observability sidecar for local LLM servers (Ollama, llama.cpp's llama-server,
OpenAI-compatible servers such as vLLM). Point clients at llmtap instead of the server: every
byte is relayed unchanged and unbuffered, and time to first token, time per output token,
tokens, queue depth and errors are exported as Prometheus metrics on a separate admin port.
"""

SERVE_EPILOG = """\
examples:
  llmtap serve --upstream http://127.0.0.1:11434          # in front of Ollama
  llmtap serve --upstream http://127.0.0.1:8080 --listen 127.0.0.1:8081
  LLMTAP_UPSTREAM=http://ollama:11434 llmtap serve        # every flag has an LLMTAP_* twin

then: clients use http://HOST:11435 where they used the server; Prometheus scrapes
http://HOST:9464/metrics. Precedence: flags > LLMTAP_* environment > --config YAML file.
"""


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop  # a faster event loop where available (Linux, macOS)
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _run_service(coro: Coroutine[Any, Any, None]) -> int:
    """Run `llmtap serve` or `llmtap route`; a failed start is one error line and exit 1."""
    from exporter.server import StartupError

    try:
        _run(coro)
    except StartupError as exc:
        print(f"llmtap: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}")
    return value


def _host_port(text: str) -> Any:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    from exporter.simulator import SimulatorConfig

    defaults = SimulatorConfig()
    parser.add_argument("--models", default=",".join(defaults.models),
                        help="comma-separated model names it serves (default: %(default)s)")
    parser.add_argument("--ttft", type=_positive_float, default=defaults.ttft,
                        help="seconds from the start of work to the first token "
                             "(default: %(default)s)")
    parser.add_argument("--tokens-per-second", type=_positive_float,
                        default=defaults.tokens_per_second,
                        help="decode speed per request (default: %(default)s)")
    parser.add_argument("--output-tokens", type=int, default=defaults.output_tokens,
                        help="tokens per answer unless the request asks fewer "
                             "(default: %(default)s)")
    parser.add_argument("--parallel", type=int, default=defaults.parallel,
                        help="requests processed at once per model; the rest queue, like "
                             "Ollama's OLLAMA_NUM_PARALLEL (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="queued requests per model before answering 503 "
                             "(default: %(default)s)")
    parser.add_argument("--cold-load", type=_positive_float, default=defaults.cold_load,
                        help="seconds to load a model that is not resident "
                             "(default: %(default)s)")
    parser.add_argument("--max-loaded-models", type=int, default=defaults.max_loaded_models,
                        help="models resident at once, 0 = no limit; loading one more evicts "
                             "the least recently used (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="make every answer deterministic for a given request (model, prompt, "
                             "length limit), however its JSON is spelled")


def _simulator_config(args: argparse.Namespace) -> Any:
    from exporter.simulator import SimulatorConfig

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    return SimulatorConfig(
        models=models, ttft=args.ttft, tokens_per_second=args.tokens_per_second,
        output_tokens=args.output_tokens, parallel=args.parallel, max_queue=args.max_queue,
        cold_load=args.cold_load, max_loaded_models=args.max_loaded_models, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtap", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"llmtap {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve", help="run the sidecar in front of one model server",
        description="Relay every request to --upstream unchanged and measure it.",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(serve)

    simulate = commands.add_parser(
        "simulate", help="run the synthetic model server (all three dialects)",
        description="A synthetic model server speaking Ollama's, OpenAI's and llama.cpp's APIs "
                    "with real timing, for demos, load tests and dashboards without a GPU.")
    simulate.add_argument("--listen", type=_host_port, default=parse_host_port("127.0.0.1:11434"),
                          metavar="HOST:PORT", help="address to serve on (default: "
                          "127.0.0.1:11434, Ollama's port)")
    _add_simulator_arguments(simulate)

    route = commands.add_parser(
        "route", help="run the router: load-aware routing across sidecars, cloud spillover",
        description="Serve the OpenAI-compatible and Ollama APIs and send each request to the "
                    "backend that will answer soonest (docs/routing.md).")
    route.add_argument("--config", required=True, metavar="FILE",
                       help="router YAML file: listen addresses, backends, cloud, routes")

    from exporter.gpu import add_gpu_command
    from exporter.top import add_top_command

    add_gpu_command(commands)
    add_top_command(commands)
    from exporter.routing.learn.commands import add_commands as add_classifier_commands

    add_classifier_commands(commands)
    key = commands.add_parser(
        "key", help="make an API key and the line to put in --api-key-file",
        description="Print a new random API key (give it to the client) and the line for "
                    "--api-key-file (it holds only the key's SHA-256).")
    key.add_argument("name", help="a name for the key, shown in the access log")

    demo = commands.add_parser(
        "demo", help="simulator + llmtap + a little traffic: see real numbers in one command",
        description="Starts the synthetic server, puts llmtap in front of it, sends a little "
                    "traffic through llmtap and prints what it measured and where to look.")
    demo.add_argument("--listen", type=_host_port, default=parse_host_port("127.0.0.1:11435"),
                      metavar="HOST:PORT", help="llmtap's proxy port (default: %(default)s)")
    demo.add_argument("--admin-listen", type=_host_port,
                      default=parse_host_port("127.0.0.1:9464"), metavar="HOST:PORT",
                      help="llmtap's admin port with /metrics (default: %(default)s)")
    demo.add_argument("--requests", type=int, default=12,
                      help="requests to send (default: %(default)s)")
    demo.add_argument("--exit", action="store_true",
                      help="exit after the traffic instead of serving until Ctrl-C")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            from exporter.server import serve
            from exporter.telemetry.logs import configure

            settings = resolve(vars(args))
            configure(settings.log_level, settings.log_format)
            return _run_service(serve(settings))
        elif args.command == "route":
            from exporter.routing.config import load_config
            from exporter.routing.service import route
            from exporter.telemetry.logs import configure

            router_config = load_config(args.config)
            configure(router_config.log_level, router_config.log_format)
            return _run_service(route(router_config))
        elif args.command == "simulate":
            from exporter.simulator import run_simulator

            config = _simulator_config(args)
            print(f"llmtap simulator serving {', '.join(config.models)} on "
                  f"http://{args.listen}", file=sys.stderr)
            _run(run_simulator(config, args.listen.host, args.listen.port))
        elif args.command == "key":
            from exporter.auth import key_file_line, new_key

            secret = new_key()
            print(f"key (give it to the client; it is not stored anywhere): {secret}")
            print(f"line for --api-key-file: {key_file_line(args.name, secret)}")
        elif args.command == "top":
            from exporter.top import run_top_command

            return run_top_command(args)
        elif args.command in ("classify", "classifier"):
            from exporter.routing.learn.commands import run

            return run(args)
        elif args.command == "gpu":
            from exporter.gpu import run_gpu_command

            return run_gpu_command(args)
        elif args.command == "demo":
            from exporter.demo import run_demo
            from exporter.server import StartupError

            try:
                return int(_run(run_demo(args.listen, args.admin_listen, args.requests,
                                         args.exit)))
            except StartupError as exc:
                print(f"llmtap: error: {exc} (choose other ports with --listen and "
                      "--admin-listen)", file=sys.stderr)
                return 1
    except ConfigError as exc:
        parser.exit(2, f"llmtap {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return 130
    return 0
