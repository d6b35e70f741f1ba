"""Container health check for llmtap: GET the admin port's /healthz, exit 0 if it answers 200.

The image has no curl (nothing but Python and the llmtap virtualenv), so the Dockerfile's
HEALTHCHECK runs this with the image's Python. It needs only the standard library.

URL: $LLMTAP_HEALTHCHECK_URL when set (the router serves its admin port on 9465), else
http://127.0.0.1:PORT/healthz with PORT taken from $LLMTAP_ADMIN_LISTEN (default 9464), so a
moved admin port keeps the check right without a second setting.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping


def health_url(env: Mapping[str, str]) -> str:
    explicit = env.get("LLMTAP_HEALTHCHECK_URL", "").strip()
    if explicit:
        return explicit
    port = env.get("LLMTAP_ADMIN_LISTEN", "0.0.0.0:9464").rpartition(":")[2] or "9464"
    return f"http://127.0.0.1:{port}/healthz"


def main() -> int:
    url = health_url(os.environ)
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            ok = response.status == 200
    except OSError as exc:  # URLError, refused, timeout
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
