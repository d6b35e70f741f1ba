"""The processes of one benchmark run: the synthetic upstream and the proxies in front of it.

Pinning (2 cores here): core 0 holds the simulator, the load generator and the orchestrator
(OTLP receiver, /metrics scraper); core 1 holds the proxy under test, every process and thread
of it. Each proxy thus gets one whole core to itself and pays for all of its own work there,
and none of them can borrow cycles from the client or the upstream. On a machine with more
cores the same split applies (core 0 / core 1); `--no-pin` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT_CPU = 0
PROXY_CPU = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_to(cpu: int | None) -> None:
    """Pin this process (the orchestrator) where the client side lives."""
    if cpu is not None and hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


@dataclass
class Child:
    """A process (group) with its output in a log file."""

    name: str
    argv: list[str]
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    cpu: int | None = None
    cwd: Path = ROOT  # where `-m exporter` is found: another checkout runs older code
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - closed in stop()
        cpu = self.cpu

        def pin() -> None:
            if cpu is not None and cpu < (os.cpu_count() or 1):
                os.sched_setaffinity(0, {cpu})

        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, cwd=self.cwd,
                                     start_new_session=True, preexec_fn=pin)
        log.close()  # the child holds its own copy

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = (self.workdir / f"{self.name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout:.0f} s")

    def pids(self) -> list[int]:
        """The process and its descendants (nginx's worker, LiteLLM's server)."""
        if self.proc is None:
            return []
        found = [self.proc.pid]
        for pid in found:
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                found.extend(int(child) for child in children)
        return found

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes, every thread included, in ns precision (schedstat: the
    scheduler's own runtime count, not the 10 ms tick sampling of /proc/PID/stat)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


@dataclass
class Target:
    """One way of reaching the upstream: its base URL and the processes that make it."""

    name: str
    url: str
    child: Child | None = None  # None: direct
    admin: str = ""  # llmtap's admin URL, scraped during runs when telemetry is on

    def pids(self) -> list[int]:
        return self.child.pids() if self.child is not None else []


def simulator(workdir: Path, pin: bool) -> Target:
    port = free_port()
    child = Child("simulator", [sys.executable, "-m", "exporter", "simulate",
                                "--listen", f"127.0.0.1:{port}", "--models", "sim-small",
                                "--parallel", "4096", "--max-queue", "100000",
                                "--tokens-per-second", "50", "--ttft", "0.05",
                                "--seed", "7"],
                  workdir, cpu=CLIENT_CPU if pin else None)
    child.start()
    child.wait_http(f"http://127.0.0.1:{port}/api/version")
    return Target("upstream", f"http://127.0.0.1:{port}", child)


def llmtap(workdir: Path, upstream: str, telemetry: bool, otlp: str, pin: bool,
           name: str = "", root: Path = ROOT) -> Target:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}  # empty: no exporter at all
    extra: list[str] = []
    if telemetry:  # metrics (scraped each second), every span exported, access log to a file
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
               "OTEL_TRACES_SAMPLER": "always_on"}
        name = name or "llmtap-full"
    else:  # the relay and its in-memory accounting only: no spans, no log lines, no scrapes
        extra = ["--access-log", "off", "--log-level", "warning"]
        name = name or "llmtap-off"
    return llmtap_with(workdir, upstream, name, extra, env, pin, root,
                       admin_scraped=telemetry)


def llmtap_with(workdir: Path, upstream: str, name: str, extra: list[str],
                env: dict[str, str], pin: bool, root: Path = ROOT,
                admin_scraped: bool = True) -> Target:
    """`llmtap serve` from the checkout at `root` (its `exporter` package first on the path,
    this venv's interpreter), with these extra flags and environment."""
    port, admin = free_port(), free_port()
    argv = [sys.executable, "-m", "exporter", "serve", "--upstream", upstream,
            "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
            "--gpu", "off", *extra]
    env = {**env, "PYTHONPATH": str(root)}
    child = Child(name, argv, workdir, env=env, cpu=PROXY_CPU if pin else None, cwd=root)
    child.start()
    child.wait_http(f"http://127.0.0.1:{admin}/readyz")
    return Target(name, f"http://127.0.0.1:{port}", child,
                  admin=f"http://127.0.0.1:{admin}" if admin_scraped else "")


def gobench_upstream(workdir: Path, binary: Path, pin: bool) -> Target:
    """The Go upstream (benchmarks/overhead/gobench): fast and not ours, so what a proxy in
    front of it costs is the proxy's own work."""
    port = free_port()
    child = Child("gobench-upstream", [str(binary), "upstream", "--listen", f"127.0.0.1:{port}",
                                       "--gomaxprocs", "1"],
                  workdir, cpu=CLIENT_CPU if pin else None)
    child.start()
    child.wait_http(f"http://127.0.0.1:{port}/api/version")
    return Target("upstream", f"http://127.0.0.1:{port}", child)


NGINX_CONF = """\
worker_processes 1;
error_log {workdir}/nginx-error.log warn;
pid {workdir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log {workdir}/nginx-access.log;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    upstream model {{ server {upstream}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx(workdir: Path, upstream: str, pin: bool) -> Target:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workdir=workdir, port=port,
                                      upstream=upstream.removeprefix("http://")))
    child = Child("nginx", [binary, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                  workdir, cpu=PROXY_CPU if pin else None)
    child.start()
    child.wait_http(f"http://127.0.0.1:{port}/api/version")
    return Target("nginx", f"http://127.0.0.1:{port}", child)


LITELLM_CONF = """\
# LiteLLM's proxy in front of the same upstream, the way its users set it up: the OpenAI
# route maps the model to the upstream's OpenAI-compatible API (LiteLLM parses each chunk and
# re-serialises it), and Ollama's /api/chat goes through a pass-through endpoint (its own
# /v1/chat/completions route shadows a pass-through on that path). No database, and (like
# llmtap and nginx here) no key: LiteLLM refuses to start keyless unless told it is local.
model_list:
  - model_name: sim-small
    litellm_params:
      model: openai/sim-small
      api_base: {upstream}/v1
      api_key: none
general_settings:
  dangerously_permit_weak_or_unset_master_key: true
  pass_through_endpoints:
    - path: /api/chat
      target: {upstream}/api/chat
litellm_settings:
  telemetry: false
"""


def litellm(workdir: Path, upstream: str, python: Path, pin: bool) -> Target:
    port = free_port()
    conf = workdir / "litellm.yaml"
    conf.write_text(LITELLM_CONF.format(upstream=upstream))
    env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True",
           "NO_DOCS": "True"}
    child = Child("litellm", [str(python.parent / "litellm"), "--config", str(conf),
                              "--host", "127.0.0.1", "--port", str(port),
                              "--num_workers", "1"],
                  workdir, env=env, cpu=PROXY_CPU if pin else None)
    child.start()
    child.wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
    return Target("litellm", f"http://127.0.0.1:{port}", child)
