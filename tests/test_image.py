"""The container image, built for real by `bash scripts/build-image` and run through podman.

One image per session (the module fixture `image`): on this kind of host it is built on a local
Debian base made with debootstrap (registry images cannot be pulled); elsewhere on the
registry base. Then:
- `llmtap --help` and `llmtap route --help` run in it;
- it runs as uid 10001 with a read-only root filesystem and /tmp the only writable tmpfs;
- `llmtap serve` in it, in front of `llmtap simulate` on the host network, relays and measures;
- its HEALTHCHECK passes while it serves and fails once it has stopped;
- SIGTERM drains: a stream that can finish within --shutdown-timeout finishes, a longer one
  is cut at the timeout, and the process is gone by then;
- its layers hold nothing of the build host (CA bundle, resolv.conf, pip caches, sources);
- the Kubernetes base's model-server pod, rendered by kustomize, played with `podman kube play`
  (the model server is `llmtap simulate` in the same image, standing in for Ollama; llmtap the
  sidecar in the pod's network): a request through the sidecar is measured and every probe of
  both containers answers as the kubelet would ask it;
- the router's Deployment: the same image running `llmtap route` with the base's generated
  config mounted read-only, routing to that pod through the headless Service's name.

podman, buildah, runc, catatonit and debootstrap come from scripts/test (Debian packages);
missing, these tests fail (RuntimeError), they never skip. docs/deploy.md says what this runs
for real and what it changes in the manifests for podman.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.helpers import Metrics, Simulator, free_port, running, wait_http
from tests.test_deploy import KUBE, one, pod_spec, render

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
DOCS = ROOT / "docs" / "deploy.md"
# Names of what these tests create, apart from another session's on the same host.
PREFIX = f"llmtap-test-{os.getpid()}"
_names = itertools.count(1)
# Hardened as the Kubernetes base runs it: read-only root, /tmp the only writable tmpfs (no
# podman tmpfs on /run, /var/tmp), no capabilities, no privilege escalation. The user is the
# image's own (USER 10001:10001): never passed. No health-check timer (this host has no
# systemd to run one): the tests run the HEALTHCHECK with `podman healthcheck run`.
HARDENED = ("--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,nosuid,nodev,size=64m",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--health-interval", "disable")
SIM_MODELS = "sim-small,sim-large"


def podman(*args: str, timeout: float = 120, check: bool = True,
           ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
                            check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return result


def name() -> str:
    return f"{PREFIX}-{next(_names)}"


@pytest.fixture(scope="session")
def image() -> str:
    """`bash scripts/build-image`, once per session: its stdout is the image reference."""
    for tool in ("podman", "buildah"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: run `bash scripts/test`, which "
                               "installs it (Debian packages podman buildah runc catatonit "
                               "debootstrap)")
    remove_stale()
    started = time.monotonic()
    result = subprocess.run(["bash", str(ROOT / "scripts" / "build-image")], cwd=ROOT,
                            capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/build-image failed:\n{result.stderr[-4000:]}")
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"build-image prints only the reference: {result.stdout!r}"
    [reference] = lines
    assert re.fullmatch(r"localhost/llmtap:\d+\.\d+\.\d+", reference), reference
    print(f"\nscripts/build-image: {reference} in {time.monotonic() - started:.1f} s")
    return reference


def remove_stale() -> None:
    """Pods and containers an earlier session of these tests left behind when it was killed
    (its pid is gone): removed, so that they hold no ports or memory."""
    for kind in ("pod", "container"):
        listed = podman(kind, "ps", "-a", "--format", "{{.Name}}" if kind == "pod" else
                        "{{.Names}}", "--filter", "name=^llmtap-test-", check=False).stdout
        for found in listed.split():
            match = re.match(r"llmtap-test-(\d+)-", found)
            if match and not Path(f"/proc/{match[1]}").exists():
                podman(kind, "rm", "-f", found, check=False)


@contextlib.contextmanager
def container(image: str, *argv: str, options: tuple[str, ...] = ()) -> Iterator[str]:
    """A detached, hardened container of `image`, removed afterwards; yields its name."""
    ctr = name()
    podman("run", "-d", "--name", ctr, *HARDENED, *options, image, *argv)
    try:
        yield ctr
    finally:
        podman("rm", "-f", "-t", "0", ctr, check=False)


def logs(ctr: str) -> str:
    result = podman("logs", ctr, check=False)
    return (result.stdout + result.stderr)[-3000:]


def wait_up(url: str, ctr: str, timeout: float = 30) -> None:
    try:
        wait_http(url, timeout)
    except RuntimeError as exc:
        raise AssertionError(f"{exc}\ncontainer log:\n{logs(ctr)}") from None


def inspect(ref: str, what: str = "container") -> dict[str, Any]:
    found = json.loads(podman(what, "inspect", ref).stdout)
    if isinstance(found, dict):  # `podman pod inspect` answers one object, the rest a list
        return found
    [info] = found
    return dict(info)


def ollama_chat(url: str, model: str, num_predict: int | None = None,
                timeout: float = 30) -> list[dict[str, Any]]:
    """A streamed Ollama /api/chat through `url`: every NDJSON line, parsed."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if num_predict is not None:
        body["options"] = {"num_predict": num_predict}
    request = urllib.request.Request(url + "/api/chat", data=orjson.dumps(body),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.status == 200
        return [orjson.loads(line) for line in response if line.strip()]


def scrape(admin: str) -> Metrics:
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as response:
        return Metrics(response.read().decode())


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # refused, reset, timed out: no answer
        return 0


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def host_network_serve(image: str, upstream: str, *flags: str,
                       ) -> tuple[contextlib.AbstractContextManager[str], str, str]:
    """`llmtap serve` (the ENTRYPOINT) on the host network, on ports free here."""
    proxy, admin = free_port(), free_port()
    env = ("-e", f"LLMTAP_UPSTREAM={upstream}", "-e", f"LLMTAP_LISTEN=127.0.0.1:{proxy}",
           "-e", f"LLMTAP_ADMIN_LISTEN=127.0.0.1:{admin}", "-e", "LLMTAP_GPU=off")
    return (container(image, *flags, options=("--network", "host", *env)),
            f"http://127.0.0.1:{proxy}", f"http://127.0.0.1:{admin}")


# --- the image on its own --------------------------------------------------------------------

def test_llmtap_and_llmtap_route_help_run_in_the_image(image: str) -> None:
    for entrypoint, argv, needle in ((None, ["--help"], "usage: llmtap serve"),
                                     ("llmtap", ["--help"], "usage: llmtap"),
                                     ("llmtap", ["route", "--help"], "usage: llmtap route")):
        options = ("--entrypoint", entrypoint) if entrypoint else ()
        result = podman("run", "--rm", "--network", "none", *HARDENED, *options, image, *argv)
        assert needle in result.stdout, result.stdout + result.stderr


# Run inside the container: who it runs as, which mounts are writable, what can be written.
PROBE_INSIDE = r"""
import json, os
mounts = []
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    fstype = fields[fields.index("-") + 1]
    mounts.append({"path": fields[4], "options": fields[5].split(","), "type": fstype})
writes = {}
for folder in ("/", "/opt/llmtap", "/var/tmp", "/run", "/etc", "/tmp"):
    try:
        with open(os.path.join(folder, "llmtap-probe"), "w") as f:
            f.write("x")
        os.unlink(os.path.join(folder, "llmtap-probe"))
        writes[folder] = "ok"
    except OSError as exc:
        writes[folder] = exc.errno
status = dict(l.split(":", 1) for l in open("/proc/1/status") if l.startswith(("Uid", "Gid")))
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "pid1": status,
                  "mounts": mounts, "writes": writes}))
"""


def test_it_runs_as_10001_on_a_read_only_root_with_only_tmp_writable(image: str) -> None:
    config = inspect(image, "image")["Config"]
    assert config["User"] == "10001:10001"
    with container(image, options=("--network", "none", "-e", "LLMTAP_UPSTREAM=http://127.0.0.1:9",
                                   "-e", "LLMTAP_GPU=off")) as ctr:
        wait_until_healthy(ctr)
        seen = json.loads(podman("exec", ctr, "python", "-c", PROBE_INSIDE).stdout)
        # As root (uid 0, no capabilities) the root filesystem still refuses: read-only, not
        # just not ours.
        as_root = podman("exec", "--user", "0", ctr, "python", "-c",
                         "open('/opt/llmtap/x', 'w')", check=False)
    assert (seen["uid"], seen["gid"]) == (10001, 10001)
    # llmtap itself (PID 1) runs as 10001 too: real, effective, saved and filesystem ids.
    assert seen["pid1"]["Uid"].split() == ["10001"] * 4, seen["pid1"]
    assert seen["pid1"]["Gid"].split() == ["10001"] * 4, seen["pid1"]
    [root] = [m for m in seen["mounts"] if m["path"] == "/"]
    assert "ro" in root["options"], root
    # Outside the kernel's and devices' own (/dev, /proc, /sys), the one writable mount is
    # the /tmp tmpfs: /etc/hosts, resolv.conf and the rest of podman's are read-only too.
    writable = [(m["path"], m["type"]) for m in seen["mounts"] if "rw" in m["options"]
                and not m["path"].startswith(("/dev", "/proc", "/sys"))]
    assert writable == [("/tmp", "tmpfs")], seen["mounts"]
    assert seen["writes"]["/tmp"] == "ok"
    erofs, eacces = 30, 13
    for folder in ("/", "/opt/llmtap", "/var/tmp", "/run", "/etc"):
        assert seen["writes"][folder] in (erofs, eacces), (folder, seen["writes"])
    assert as_root.returncode != 0 and "Read-only file system" in as_root.stderr, as_root.stderr


def wait_until_healthy(ctr: str, timeout: float = 30) -> None:
    """`podman healthcheck run`: the image's HEALTHCHECK command, run in the container."""
    deadline = time.monotonic() + timeout
    while True:
        result = podman("healthcheck", "run", ctr, check=False)
        if result.returncode == 0:
            return
        assert time.monotonic() < deadline, \
            f"HEALTHCHECK never passed: {result.stdout}{result.stderr}\n{logs(ctr)}"
        time.sleep(0.3)


def test_serve_relays_and_measures_in_front_of_the_simulator(image: str) -> None:
    """`llmtap serve` in the container, `llmtap simulate` on the host, the host network
    between them: the answer arrives whole and /metrics has measured it."""
    with running(Simulator("--seed", "3", "--ttft", "0.02", "--tokens-per-second", "400",
                           "--output-tokens", "12", "--models", SIM_MODELS)) as sim:
        serving, proxy, admin = host_network_serve(image, sim.url)
        with serving as ctr:
            wait_up(admin + "/readyz", ctr)
            through = ollama_chat(proxy, "sim-small")
            direct = ollama_chat(sim.url, "sim-small")
            metrics = scrape(admin)
            state = json.loads(urllib.request.urlopen(admin + "/llmtap/v1/state",
                                                      timeout=5).read())
    assert through[-1]["done"] is True
    assert [c["message"]["content"] for c in through] == \
        [c["message"]["content"] for c in direct], "relayed unchanged (the simulator is seeded)"
    labels = {"gen_ai_request_model": "sim-small:latest", "gen_ai_provider_name": "ollama",
              "gen_ai_operation_name": "chat"}
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count", **labels) == 1, \
        metrics.text[:3000]
    assert metrics.value("gen_ai_server_time_per_output_token_seconds_count", **labels) == 1
    assert metrics.value("gen_ai_client_token_usage_sum", gen_ai_token_type="output",
                         **labels) == through[-1]["eval_count"]
    assert metrics.value("gen_ai_server_request_duration_seconds_count", error_type="",
                         **labels) == 1
    assert metrics.value("llmtap_requests_in_flight") == 0
    assert metrics.value("llmtap_upstream_up") == 1
    assert state["upstream"]["kind"] == "ollama" and state["upstream"]["up"] is True


def test_healthcheck_passes_while_serving_and_fails_after_stop(image: str) -> None:
    check = inspect(image, "image")["Healthcheck"]  # docker format: the OCI config has none
    assert check["Test"][0] == "CMD" and not {"curl", "wget"} & set(check["Test"]), check
    command = check["Test"][1:]
    serving, _, admin = host_network_serve(image, "http://127.0.0.1:9")  # no upstream: alive
    admin_env = ("-e", f"LLMTAP_ADMIN_LISTEN={admin.removeprefix('http://')}")
    # The same command in a fresh container on the same network: it can run after the
    # serving container has gone, which `podman healthcheck run` cannot.
    fresh = ("run", "--rm", "--network", "host", *HARDENED, *admin_env,
             "--entrypoint", command[0], image, *command[1:])
    with serving as ctr:
        wait_until_healthy(ctr)
        assert podman(*fresh, check=False).returncode == 0
        podman("stop", "-t", "20", ctr)
        assert inspect(ctr)["State"]["ExitCode"] == 0, logs(ctr)
    after = podman(*fresh, check=False)
    assert after.returncode == 1 and "unhealthy" in after.stderr, after.stdout + after.stderr


def test_sigterm_drains_within_the_shutdown_timeout(image: str) -> None:
    """SIGTERM to the container (what `podman stop` and the kubelet send): /readyz turns 503
    and the proxy refuses new connections at once; a stream that ends within
    --shutdown-timeout ends whole; a longer one is cut at the timeout; then it exits 0."""
    grace = 4.0
    with running(Simulator("--seed", "5", "--ttft", "0.01", "--tokens-per-second", "10",
                           "--output-tokens", "200", "--parallel", "4",
                           "--models", SIM_MODELS)) as sim:
        serving, proxy, admin = host_network_serve(image, sim.url, "--shutdown-timeout",
                                                   str(grace))
        with serving as ctr:
            wait_up(admin + "/readyz", ctr)
            results: dict[str, Any] = {}

            def stream(label: str, num_predict: int) -> None:
                try:
                    results[label] = ollama_chat(proxy, "sim-small", num_predict, timeout=60)
                except Exception as exc:  # the cut stream: how it ended is the result
                    results[label] = exc
                results[label + "_at"] = time.monotonic()

            threads = [threading.Thread(target=stream, args=("short", 20)),  # ~2 s
                       threading.Thread(target=stream, args=("long", 200))]  # ~20 s
            for thread in threads:
                thread.start()
            wait_for(lambda: scrape(admin).value("llmtap_requests_in_flight") == 2, 10)
            time.sleep(0.3)
            signalled = time.monotonic()
            podman("kill", "--signal", "TERM", ctr)
            # Within moments (the signal reaches the event loop): not ready, no new requests.
            wait_for(lambda: status_of(admin + "/readyz") == 503, 2)
            wait_for(lambda: status_of(proxy + "/api/version") == 0, 2)
            exit_code = podman("wait", ctr, timeout=60).stdout.strip()
            exited = time.monotonic() - signalled
            for thread in threads:
                thread.join(30)
            log = logs(ctr)
    print(f"\nSIGTERM: short stream ended {results['short_at'] - signalled:.2f} s after, "
          f"long one cut {results['long_at'] - signalled:.2f} s after, exit {exited:.2f} s")
    assert exit_code == "0", log
    short, long = results["short"], results["long"]
    assert isinstance(short, list) and short[-1]["done"] is True, short
    assert results["short_at"] - signalled < grace, "the short stream ended inside the grace"
    # The long one was cut at the grace: a truncated chunked body, or its last line not done.
    assert isinstance(long, Exception) or not long[-1].get("done"), long
    assert grace - 0.5 <= results["long_at"] - signalled <= grace + 2.0, results
    assert exited <= grace + 2.5, f"exited {exited:.1f} s after SIGTERM"


# --- what the image holds --------------------------------------------------------------------

def host_fingerprints() -> tuple[dict[str, str], list[bytes]]:
    """What of the build host must not be in a layer: files by content hash (the CA bundle
    pip used, resolv.conf, hostname), and the locally added CA certificates by their
    base64 body (the TLS-intercepting proxy's CA, on this host)."""
    files = {}
    for path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/resolv.conf", "/etc/hostname"):
        with contextlib.suppress(OSError):
            data = Path(path).read_bytes()
            if data.strip():
                files[hashlib.sha256(data).hexdigest()] = path
    bodies = []
    for cert in sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt")):
        for body in re.findall(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----",
                               cert.read_bytes(), re.S):
            bodies.append(b"".join(body.split()))
    return files, bodies


# Paths that are the build's or a tool's leftovers, never the runtime's.
LEFTOVERS = re.compile(r"(^|/)\.cache(/|$)|^(src|wheels)(/|$)|^run/secrets(/|$)"
                       r"|^tmp/.+|^var/tmp/.+|^var/cache/apt/archives/.+\.deb$"
                       r"|^var/lib/apt/lists/.+|(^|/)pip-(req-build|install|ephem)")


def host_traces(layer: tarfile.TarFile, files: dict[str, str], bodies: list[bytes]) -> list[str]:
    """Every member of one layer that carries something of the build host."""
    found = []
    for member in layer:
        path = member.name.removeprefix("./").rstrip("/")
        if LEFTOVERS.search(path):
            found.append(f"{path}: a build leftover")
        if not member.isfile() or member.size == 0:
            continue
        handle = layer.extractfile(member)
        data = handle.read() if handle is not None else b""
        if hashlib.sha256(data).hexdigest() in files:
            found.append(f"{path}: the host's {files[hashlib.sha256(data).hexdigest()]}")
        if b"-----BEGIN CERTIFICATE-----" in data:
            flat = b"".join(data.split())
            found += [f"{path}: a certificate added on the host"
                      for body in bodies if body in flat]
    return found


def test_the_scan_for_host_traces_finds_them(tmp_path: Path) -> None:
    """The layer scan below is not vacuous: a layer with the host's CA bundle, a pip cache
    and a build secret is caught on each."""
    files, bodies = host_fingerprints()
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as layer:
        layer.add(bundle, arcname="usr/lib/python3/dist-packages/certifi/cacert.pem")
        for path in ("root/.cache/pip/http/x", "run/secrets/pip-ca", "opt/llmtap/ok.py"):
            info = tarfile.TarInfo(path)
            info.size = 1
            layer.addfile(info, io.BytesIO(b"x"))
    buffer.seek(0)
    with tarfile.open(fileobj=buffer) as layer:
        found = host_traces(layer, files, bodies)
    assert any("cacert.pem: the host's" in f for f in found), found
    assert any(f.startswith("root/.cache/pip") for f in found), found
    assert any(f.startswith("run/secrets/pip-ca") for f in found), found
    assert not any(f.startswith("opt/llmtap") for f in found), found


def test_the_layers_hold_nothing_from_the_build_host(image: str, tmp_path: Path) -> None:
    """Every file of every layer of the final image (`podman save` as an OCI layout): no CA
    bundle of the host (pip's build secret), no certificate added on the host, no
    resolv.conf or hostname of it, no pip cache, no source tree or wheels, no secret mount."""
    out = tmp_path / "oci"
    podman("save", "--format", "oci-dir", "-o", str(out), image, timeout=300)
    index = json.loads((out / "index.json").read_text())
    [manifest_ref] = index["manifests"]
    blob = out / "blobs" / "sha256"
    manifest = json.loads((blob / manifest_ref["digest"].split(":")[1]).read_text())
    config = json.loads((blob / manifest["config"]["digest"].split(":")[1]).read_text())
    files, bodies = host_fingerprints()
    found: list[str] = []
    for layer in manifest["layers"]:
        with tarfile.open(blob / layer["digest"].split(":")[1], mode="r:*") as tar:
            found += host_traces(tar, files, bodies)
    assert not found, "\n".join(found[:50])
    text = json.dumps(config)
    assert "PIP_CERT" not in text and "pip-ca" not in text and "ca-certificates.crt" not in text
    assert len(manifest["layers"]) == len(config["rootfs"]["diff_ids"])


def test_docs_report_the_image_size_and_layer_count(image: str) -> None:
    """docs/deploy.md's figures are this image's: the layer count exactly, the size within
    15% (dependency updates move it a little)."""
    info = inspect(image, "image")
    layers, size_mb = len(info["RootFS"]["Layers"]), info["Size"] / 1e6
    match = re.search(r"(\d+) MB in (\d+) layers", DOCS.read_text())
    assert match, "docs/deploy.md: say `NNN MB in N layers` for the image built here"
    assert int(match[2]) == layers, f"the image has {layers} layers"
    assert abs(int(match[1]) - size_mb) <= 0.15 * size_mb, f"the image is {size_mb:.0f} MB"


# --- the sidecar pod, played with podman kube play -------------------------------------------

def model_server_deployment(tree: str) -> dict[str, Any]:
    directory = KUBE / "base" if tree == "base" else KUBE / "overlays" / tree
    return one(render(directory), "Deployment", "ollama")


def local_pod(deployment: dict[str, Any], image: str) -> dict[str, Any]:
    """The Deployment's pod as podman can play it here, changed only where it must be:
    - images: the local one; the model server runs `llmtap simulate` on Ollama's address,
      and its probes run the image's health check against the simulator instead of
      `ollama list` (no Ollama in the image); no GPU request (none here);
    - POD_NAMESPACE: the namespace as a value (podman has no downward API for it);
    - every containerPort gets a free hostPort: podman 4.3 publishes container ports on the
      host, and the default ones may be taken on a shared machine.
    Probes, securityContext, resources, volumes, env and ports are otherwise the base's."""
    template = copy.deepcopy(deployment["spec"]["template"])
    spec = template["spec"]
    for ctr in spec.get("initContainers", []) + spec["containers"]:
        ctr["image"] = image
        for var in ctr.get("env", []):
            if var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") \
                    == "metadata.namespace":
                del var["valueFrom"]
                var["value"] = deployment["metadata"]["namespace"]
        for port in ctr.get("ports", []):
            port["hostPort"] = free_port()
        if ctr["name"] != "ollama":
            continue
        env = {e["name"]: e.get("value") for e in ctr["env"]}
        ctr["command"] = ["llmtap", "simulate", "--listen", env["OLLAMA_HOST"],
                          "--models", SIM_MODELS, "--seed", "9", "--ttft", "0.02",
                          "--tokens-per-second", "400", "--output-tokens", "12",
                          "--parallel", "4"]
        ctr["env"].append({"name": "LLMTAP_HEALTHCHECK_URL",
                           "value": f"http://{env['OLLAMA_HOST']}/api/version"})
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in ctr:
                assert ctr[probe]["exec"]["command"] == ["ollama", "list"], ctr[probe]
                ctr[probe]["exec"]["command"] = ["/opt/llmtap/bin/python",
                                                 "/opt/llmtap/healthcheck.py"]
        for kind in ("requests", "limits"):
            ctr["resources"][kind].pop("nvidia.com/gpu", None)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name(), "labels": template["metadata"]["labels"]},
            "spec": spec}


def test_podman_cannot_play_the_native_sidecar_form(image: str, tmp_path: Path) -> None:
    """podman 4.3 (Debian bookworm) refuses an init container with probes, so the native
    sidecar (restartPolicy: Always) cannot be played: the pod below is the pre-1.29
    overlay's (docs/deploy.md). When podman learns it, this fails: play the base then."""
    pod = local_pod(model_server_deployment("base"), image)
    assert pod["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    try:
        result = podman("kube", "play", str(path), check=False)
    finally:
        podman("pod", "rm", "-f", pod["metadata"]["name"], check=False)
    assert result.returncode != 0
    assert "cannot create an init container that has either of lifecycle, livenessProbe" \
        in result.stderr, result.stderr


class PlayedPod:
    def __init__(self, manifest: dict[str, Any], ip: str) -> None:
        self.manifest = manifest
        self.name = manifest["metadata"]["name"]
        self.ip = ip

    def container(self, name: str) -> dict[str, Any]:
        [ctr] = [c for c in self.manifest["spec"]["containers"] if c["name"] == name]
        return dict(ctr)

    def podman_name(self, container: str) -> str:
        return f"{self.name}-{container}"  # how kube play names a pod's containers

    def port(self, container: str, port: int | str) -> int:
        if isinstance(port, int):
            return port
        [number] = [p["containerPort"] for p in self.container(container)["ports"]
                    if p["name"] == port]
        return int(number)

    def url(self, container: str, port: int | str) -> str:
        return f"http://{self.ip}:{self.port(container, port)}"

    def probe(self, container: str, kind: str) -> tuple[bool, str]:
        """One probe as the kubelet runs it: httpGet from the node to the pod's IP (2xx or
        3xx passes), exec inside the container (exit 0 passes)."""
        spec = self.container(container)[kind]
        if "httpGet" in spec:
            get = spec["httpGet"]
            url = self.url(container, get["port"]) + get["path"]
            code = status_of(url)
            return 200 <= code < 400, f"{url}: {code}"
        command = spec["exec"]["command"]
        done = podman("exec", self.podman_name(container), *command, check=False)
        return done.returncode == 0, f"{command}: {done.returncode} {done.stderr[-500:]}"


@pytest.fixture(scope="module")
def pod(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlayedPod]:
    """The pre-1.29 overlay's model-server pod, played with `podman kube play` on podman's
    default bridge network: the pod has its own IP, as in a cluster."""
    manifest = local_pod(model_server_deployment("pre-1.29"), image)
    path = tmp_path_factory.mktemp("pod") / "pod.yaml"
    path.write_text(yaml.safe_dump(manifest))
    podman("kube", "play", str(path), timeout=120)
    try:
        infra = inspect(inspect(manifest["metadata"]["name"], "pod")["InfraContainerID"])
        [ip] = [n["IPAddress"] for n in infra["NetworkSettings"]["Networks"].values()]
        played = PlayedPod(manifest, ip)
        deadline = time.monotonic() + 60
        while not played.probe("llmtap", "readinessProbe")[0]:
            assert time.monotonic() < deadline, \
                f"the sidecar never got ready:\n{logs(played.podman_name('llmtap'))}"
            time.sleep(0.2)
        yield played
    finally:
        podman("pod", "rm", "-f", manifest["metadata"]["name"], check=False)


def test_the_pod_runs_both_containers_as_the_base_says(pod: PlayedPod) -> None:
    """The securityContext podman applied is the manifest's: uid/gid 10001 (the pod's
    runAsUser/runAsGroup), read-only root, no capabilities, no privilege escalation; both
    containers in the pod's one network namespace, and its process namespace shared."""
    for name in ("llmtap", "ollama"):
        ctr = inspect(pod.podman_name(name))
        assert ctr["State"]["Running"], name
        assert ctr["Config"]["User"] in ("10001", "10001:10001"), ctr["Config"]["User"]
        assert ctr["HostConfig"]["ReadonlyRootfs"] is True, name
        assert not ctr["EffectiveCaps"], (name, ctr["EffectiveCaps"])
        assert "no-new-privileges" in ctr["HostConfig"]["SecurityOpt"], name
        assert ctr["HostConfig"]["NetworkMode"].startswith("container:"), name
    shared = {inspect(pod.podman_name(n))["HostConfig"]["NetworkMode"]
              for n in ("llmtap", "ollama")}
    assert len(shared) == 1, "one network namespace for the pod"
    # The sidecar has no volume: nothing at all is writable in it (podman adds no tmpfs for
    # a pod's container, as the kubelet adds none), and llmtap serves regardless.
    seen = json.loads(podman("exec", pod.podman_name("llmtap"), "python", "-c",
                             PROBE_INSIDE).stdout)
    assert (seen["uid"], seen["gid"]) == (10001, 10001)
    writable = [m["path"] for m in seen["mounts"] if "rw" in m["options"]
                and not m["path"].startswith(("/dev", "/proc", "/sys"))]
    assert writable == [], seen["mounts"]
    assert "ok" not in seen["writes"].values(), seen["writes"]
    # shareProcessNamespace: the sidecar sees the model server's process.
    seen = podman("exec", pod.podman_name("llmtap"), "python", "-c",
                  "import os; print([open(f'/proc/{p}/cmdline').read() for p in os.listdir"
                  "('/proc') if p.isdigit()])").stdout
    assert "simulate" in seen, seen


def test_request_through_the_sidecar_is_measured_and_every_probe_answers(pod: PlayedPod,
                                                                         ) -> None:
    llmtap, model_server = pod.container("llmtap"), pod.container("ollama")
    # Probes as the base has them for the sidecar (/healthz, /readyz on the named admin port).
    assert {llmtap[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe")} == \
        {"/healthz"} and llmtap["readinessProbe"]["httpGet"]["path"] == "/readyz"
    proxy = pod.url("llmtap", "proxy")
    answer = ollama_chat(proxy, "sim-small")
    assert answer[-1]["done"] is True
    metrics = scrape(pod.url("llmtap", "admin"))
    assert metrics.value("gen_ai_server_time_to_first_token_seconds_count",
                         gen_ai_request_model="sim-small:latest",
                         gen_ai_provider_name="ollama") == 1, metrics.text[:3000]
    assert metrics.value("gen_ai_client_token_usage_sum", gen_ai_token_type="output",
                         gen_ai_request_model="sim-small:latest") == answer[-1]["eval_count"]
    # The model server listens on loopback only: from outside the pod only llmtap answers.
    ollama_port = int(next(e["value"] for e in model_server["env"]
                           if e["name"] == "OLLAMA_HOST").rpartition(":")[2])
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{pod.ip}:{ollama_port}/api/version", timeout=3)
    for name, ctr in (("llmtap", llmtap), ("ollama", model_server)):
        kinds = [k for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in ctr]
        assert kinds, name
        for kind in kinds:
            ok, what = pod.probe(name, kind)
            assert ok, f"{name} {kind}: {what}"


# --- the router's image path -----------------------------------------------------------------

def test_router_image_routes_to_the_pod_with_its_config_mounted_read_only(
        image: str, pod: PlayedPod) -> None:
    """The base's router Deployment, run as it says: the same image, `llmtap route --config
    /etc/llmtap/router.yaml` from the generated ConfigMap mounted read-only. Its backend is
    the headless Service's name (llmtap-sidecars.llm.svc.cluster.local), which resolves here
    to the played pod's IP as the cluster's DNS would resolve it to each ready pod."""
    docs = render(KUBE / "base")
    deployment = one(docs, "Deployment", "llmtap-router")
    spec = pod_spec(deployment)
    [router] = spec["containers"]
    config_path = Path(router["command"][3])
    [mount] = [m for m in router["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    assert mount["readOnly"] is True
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    config_text = one(docs, "ConfigMap", volume["configMap"]["name"])["data"][config_path.name]
    config = yaml.safe_load(config_text)
    [backend] = config["backends"]
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-router-"))
    try:
        folder.chmod(0o755)
        (folder / config_path.name).write_text(config_text)
        (folder / config_path.name).chmod(0o644)
        env = [arg for e in router["env"] if "value" in e
               for arg in ("-e", f"{e['name']}={e['value']}")]
        admin_port = int(config["admin_listen"].rpartition(":")[2])
        options = ("--add-host", f"{backend['dns']}:{pod.ip}",
                   "-v", f"{folder}:{mount['mountPath']}:ro", *env,
                   "-e", f"LLMTAP_HEALTHCHECK_URL=http://127.0.0.1:{admin_port}/healthz",
                   "--entrypoint", router["command"][0])
        with container(image, *router["command"][1:], options=options) as ctr:
            info = inspect(ctr)
            [config_mount] = [m for m in info["Mounts"]
                              if m["Destination"] == mount["mountPath"]]
            assert config_mount["RW"] is False
            [ip] = [n["IPAddress"] for n in info["NetworkSettings"]["Networks"].values()]
            listen_port = int(config["listen"].rpartition(":")[2])
            admin = f"http://{ip}:{admin_port}"
            wait_up(admin + "/readyz", ctr, timeout=60)
            wait_until_healthy(ctr)
            wait_for(lambda: "sim-large" in urllib.request.urlopen(
                f"http://{ip}:{listen_port}/api/tags", timeout=5).read().decode(), 30)
            answer = ollama_chat(f"http://{ip}:{listen_port}", "sim-large")
            router_metrics = scrape(admin)
            log = logs(ctr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert answer[-1]["done"] is True, answer
    sidecar = scrape(pod.url("llmtap", "admin"))
    assert sidecar.value("gen_ai_server_time_to_first_token_seconds_count",
                         gen_ai_request_model="sim-large:latest") == 1, \
        f"the router's request reached the pod's sidecar:\n{log}"
    assert router_metrics.value("llmtap_router_decisions_total") >= 1, router_metrics.text[:2000]
