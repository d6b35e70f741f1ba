"""`llmtap top [URL ...]`: a live terminal view of sidecars and routers (see app.py)."""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_URL = "http://127.0.0.1:9464"

EPILOG = """\
examples:
  llmtap top                                  # the sidecar on this machine (admin port 9464)
  llmtap top http://gpu-a:9464 http://gpu-b:9464
  llmtap top http://router:9465               # a router, its backends and their models

Per backend and model: requests in flight and waiting (no first token yet), TTFT p50 / p95
and output tokens per second over the last minute, loaded or not, VRAM, recent error rate.
Per GPU: utilization and memory. For a router: each backend's breaker, the spilling routes,
cloud spend against its budget. Keys: s changes the sort, q quits.
"""


def add_top_command(commands: Any) -> None:
    top = commands.add_parser(
        "top", help="live terminal view of sidecars and routers",
        description="A live view of llmtap sidecars and routers, read from their admin "
                    "ports (/llmtap/v1/state, /llmtap/v1/router, /metrics).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("urls", nargs="*", metavar="URL", default=[DEFAULT_URL],
                     help=f"admin URLs of sidecars or routers (default: {DEFAULT_URL})")
    top.add_argument("--interval", type=float, default=1.0,
                     help="seconds between refreshes (default: %(default)s)")
    top.add_argument("--timeout", type=float, default=1.0,
                     help="seconds a URL may take before it is shown as slow "
                          "(default: %(default)s)")


def run_top_command(args: argparse.Namespace) -> int:
    from exporter.top.app import TopApp

    urls = [u if "://" in u else f"http://{u}" for u in args.urls]
    TopApp(urls, interval=max(0.2, args.interval), timeout=max(0.1, args.timeout)).run()
    return 0
