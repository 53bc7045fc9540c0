"""Deployment files agree with the Kubernetes API, with the app's settings and routes, and with each other.

Every kustomization under deploy/ is rendered with `kubectl kustomize` (what `kubectl apply -k`
applies) and the rendered objects are checked against the Kubernetes schemas that
kubernetes-validate ships, the `Settings` class, and the repository's own files. The Dockerfile
and .dockerignore are parsed; the healthchecks run against a stub server. `make image-test`
(deploy/image_test.py) builds and runs the image itself.
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi import FastAPI

from service.api.probes import create_probe_app
from service.app import create_app
from service.metrics import Metrics
from service.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
GPU = K8S / "overlays" / "gpu"
QUEUE_HPA = K8S / "overlays" / "queue-hpa"
BAKED = K8S / "overlays" / "baked-weights"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"

# The app's real routes (building the app runs nothing: the lifespan only starts under a server).
APP_ROUTES = frozenset(create_app(Settings()).openapi()["paths"])
# The oldest Kubernetes the pinned kubernetes-validate (>=1.28) ships schemas for, and the newest installed.
K8S_VERSIONS = sorted({"1.28.0", kubernetes_validate.latest_version()})
SETTINGS_ENV = frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields)
DEFAULT_PORT: int = Settings.model_fields["port"].default
PROBE_PORT: int = Settings.model_fields["probe_port"].default
PROBE_ROUTES = frozenset(route.path for route in create_probe_app(FastAPI(), Metrics(max_batch_size=1)).routes)
CROSSVIT_NAME = re.compile(r"\bCROSSVIT_[A-Z0-9_]+")

Doc = dict[str, Any]


# ---------------------------------------------------------------- helpers: YAML and kustomize


def _docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization(folder: Path) -> Doc:
    data = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _kustomizations() -> list[Path]:
    """Every folder under deploy/ that `kubectl apply -k` can be pointed at."""
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


@functools.cache
def _render(folder: Path) -> tuple[Doc, ...]:
    """What `kubectl kustomize folder` renders: exactly what `kubectl apply -k folder` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: the Kubernetes tests render every kustomization with it")
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"kubectl kustomize {folder} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d is not None)


def _build(folder: Path) -> list[Doc]:
    return copy.deepcopy(list(_render(folder)))


def _pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _all_containers(doc: Doc) -> list[Doc]:
    spec = _pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _one(docs: list[Doc], kind: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def _main_container(deployment: Doc) -> Doc:
    (container,) = [c for c in _pod_spec(deployment)["containers"] if c["name"] == "crossvit-serve"]
    return container


def _port_number(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


@pytest.fixture(params=_kustomizations(), ids=lambda p: p.relative_to(REPO).as_posix())
def built(request: pytest.FixtureRequest) -> list[Doc]:
    return _build(request.param)


# ---------------------------------------------------------------- helpers: Dockerfile


@dataclass
class Stage:
    name: str
    base: str  # the image it starts from, through any stages it builds on
    parent: Stage | None = None  # the stage it builds on, if any
    own: list[tuple[str, str]] = field(default_factory=list)

    @property
    def instructions(self) -> list[tuple[str, str]]:
        """Its own instructions after those of the stages it builds on (what the image inherits)."""
        return [*(self.parent.instructions if self.parent else []), *self.own]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    logical = ""
    for line in text.splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.strip().partition(" ")
        yield keyword.upper(), args.strip()
        logical = ""


def _dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name, FROM images with ARGs substituted."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image.strip())
            parent = stages.get(base)
            current = stages[name.strip()] = Stage(name.strip(), parent.base if parent else base, parent)
        elif current is None:
            assert keyword == "ARG", f"only ARG may precede the first FROM, found {keyword}"
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
        else:
            current.own.append((keyword, rest))
    return args, stages


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage.all("ENV"):
        env.update(item.split("=", 1) for item in shlex.split(rest))  # type: ignore[misc]
    return env


def _run_commands(stage: Stage) -> list[list[str]]:
    """Each command of the stage's own RUN instructions (split at `&&`, `;`, if/else), as shell words."""
    commands = []
    for run in (args for kw, args in stage.own if kw == "RUN"):
        run = re.sub(r"^(--mount=\S+\s+)+", "", run)
        for part in re.split(r"&&|;|\bthen\b|\belse\b|\bfi\b", run):
            words = shlex.split(part)
            if words and words[0] == "if":
                continue
            if words:
                commands.append(words)
    return commands


def _pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments after `pip install` of each pip command the stage runs."""
    return [c[c.index("install") + 1:] for c in _run_commands(stage) if c[:3] == ["/opt/venv/bin/python", "-m", "pip"]
            and "install" in c]


def _final_stages() -> dict[str, Stage]:
    _, stages = _dockerfile()
    return {name: stages[name] for name in ("cpu", "cpu-full", "cuda")}


# ---------------------------------------------------------------- helpers: .dockerignore (moby/patternmatcher)


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def _pyproject_packages() -> list[str]:
    """The package patterns pyproject.toml's setuptools `packages.find` includes."""
    line = re.search(r"^include = (\[.*\])$", (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert line, "pyproject.toml lists [tool.setuptools.packages.find] include on one line"
    return list(json.loads(line.group(1)))


def _ignored(path: str) -> bool:
    """Whether the build context leaves `path` out: the last matching pattern (on it or a parent) decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in _dockerignore_patterns():
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------- helpers: settings


def _console_scripts() -> set[str]:
    """The commands `pip install .` puts on PATH (pyproject's [project.scripts])."""
    return {ep.name for ep in distribution("crossvit-serve").entry_points if ep.group == "console_scripts"}


def _validate_settings(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the container builds them: from exactly these environment variables."""
    for name in os.environ:
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return Settings()


def _service_link_vars(service: Doc) -> set[str]:
    """The variables Kubernetes injects for a Service when enableServiceLinks is on (the docker-link style)."""
    prefix = service["metadata"]["name"].upper().replace("-", "_")
    names = {f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT", f"{prefix}_PORT"}
    for port in service["spec"]["ports"]:
        proto = port.get("protocol", "TCP")
        base = f"{prefix}_PORT_{port['port']}_{proto}"
        names |= {base, f"{base}_PROTO", f"{base}_PORT", f"{base}_ADDR"}
        if "name" in port:
            names.add(f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
    return names


# ================================================================ Kubernetes


@pytest.mark.parametrize("folder", _kustomizations(), ids=lambda p: p.relative_to(REPO).as_posix())
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kustomization_renders_objects_that_match_the_schema(folder: Path, version: str) -> None:
    rendered = _render(folder)
    assert {d["kind"] for d in rendered} == {
        "Namespace", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"
    }
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_would_catch_a_typo() -> None:
    broken = _one(_build(BASE), "Deployment")
    _main_container(broken)["readinesProbe"] = _main_container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_rendering_would_catch_an_overlay_inside_its_base(tmp_path: Path) -> None:
    """The layout the README once had: kustomize refuses an overlay that lives inside its own base."""
    shutil.copytree(BASE, tmp_path / "k8s")
    (tmp_path / "k8s" / "gpu").mkdir()
    (tmp_path / "k8s" / "gpu" / "kustomization.yaml").write_text("resources: [../]\n")
    with pytest.raises(AssertionError, match="cycle detected"):
        _render(tmp_path / "k8s" / "gpu")


def test_base_and_overlays_are_siblings_and_list_every_file() -> None:
    assert _kustomizations() == [BASE, *sorted((K8S / "overlays").iterdir())]
    listed = _kustomization(BASE)["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    for overlay in _kustomizations()[1:]:
        k = _kustomization(overlay)
        assert [(overlay / r).resolve() for r in k["resources"]] == [BASE.resolve()], overlay
        patches = [p["path"] for p in k.get("patches", [])]
        assert {p.name for p in overlay.iterdir()} == {"kustomization.yaml", *patches}, overlay
    # no kustomization lies inside another's folder (kustomize's "cycle detected")
    for outer in _kustomizations():
        assert not [inner for inner in _kustomizations() if outer in inner.parents], outer


def test_overlays_change_only_what_they_say(built: list[Doc]) -> None:
    """Against the base, each overlay touches only its own objects' fields."""
    base = {(d["kind"], d["metadata"]["name"]): d for d in _build(BASE)}
    changed = {(d["kind"], d["metadata"]["name"]) for d in built if base[(d["kind"], d["metadata"]["name"])] != d}
    name = "crossvit-serve"
    expected = {
        "base": set(),
        "gpu": {("ConfigMap", "crossvit-serve-config"), ("Deployment", name), ("HorizontalPodAutoscaler", name)},
        "queue-hpa": {("HorizontalPodAutoscaler", name)},
        "baked-weights": {("Deployment", name)},
    }
    folders = {f.name: f for f in _kustomizations()}
    (which,) = [n for n, f in folders.items() if _build(f) == built]
    assert changed == expected[which]


def test_built_resources_reference_each_other(built: list[Doc]) -> None:
    deployment, service = _one(built, "Deployment"), _one(built, "Service")
    hpa, pdb = _one(built, "HorizontalPodAutoscaler"), _one(built, "PodDisruptionBudget")
    config = _one(built, "ConfigMap")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    # the budget must leave room for a voluntary disruption at the smallest size
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    env_from = [ref for c in _all_containers(deployment) for ref in c["envFrom"]]
    config_refs = {ref["configMapRef"]["name"] for ref in env_from if "configMapRef" in ref}
    assert config_refs == {config["metadata"]["name"]}
    namespaces = {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"}
    assert namespaces == {_one(built, "Namespace")["metadata"]["name"]}


def test_probes_hit_real_routes_on_the_probe_listener(built: list[Doc]) -> None:
    deployment, config = _one(built, "Deployment"), _one(built, "ConfigMap")
    container = _main_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": DEFAULT_PORT, "probes": PROBE_PORT}
    assert DEFAULT_PORT == int(config["data"].get("CROSSVIT_PORT", DEFAULT_PORT))
    assert PROBE_PORT == int(config["data"].get("CROSSVIT_PROBE_PORT", PROBE_PORT))
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {kind: p["path"] for kind, p in probes.items()} == {
        "startupProbe": "/readyz",  # model loaded and warmed
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",  # the process answers; never restart a pod for being busy
    }
    assert {p["path"] for p in probes.values()} <= PROBE_ROUTES
    # the probe listener, which no data-plane load reaches (service/api/probes.py)
    assert all(_port_number(container, p["port"]) == PROBE_PORT for p in probes.values())
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300  # room for a model load


def test_prometheus_annotations(built: list[Doc]) -> None:
    deployment = _one(built, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == PROBE_PORT
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in PROBE_ROUTES


def test_pod_security(built: list[Doc]) -> None:
    deployment = _one(built, "Deployment")
    spec = _pod_spec(deployment)
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    docker_uid = {s.all("USER")[-1].split(":")[0] for s in _final_stages().values()}
    assert {str(spec["securityContext"]["runAsUser"])} == docker_uid  # the image's user
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in _all_containers(deployment):
        ctx = c["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False, c["name"]
        assert ctx["readOnlyRootFilesystem"] is True, c["name"]
        assert ctx["capabilities"]["drop"] == ["ALL"], c["name"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], c["name"]  # writable scratch on a read-only root
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"][kind].keys(), (c["name"], kind)


def test_termination_outlasts_drain_and_prestop(built: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, config = _one(built, "Deployment"), _one(built, "ConfigMap")
    settings = _validate_settings(config["data"], monkeypatch)
    pre_stop = _main_container(deployment)["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_s = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert Path(command[0]).name == "sleep" and len(command) == 2, command
        sleep_s = float(command[1])
    assert sleep_s > 0
    assert _pod_spec(deployment)["terminationGracePeriodSeconds"] > settings.shutdown_timeout_s + sleep_s


def test_service_routes_to_the_app_and_its_links_cannot_collide(built: list[Doc]) -> None:
    deployment, service = _one(built, "Deployment"), _one(built, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert _port_number(_main_container(deployment), port["targetPort"]) == DEFAULT_PORT
    assert not _service_link_vars(service) & SETTINGS_ENV
    # the check has teeth: a Service called `crossvit` would inject CROSSVIT_PORT=tcp://...
    assert "CROSSVIT_PORT" in _service_link_vars({"metadata": {"name": "crossvit"}, "spec": {"ports": [port]}})


def test_init_containers_fetch_and_prepare_what_the_server_reads(
    built: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights at run time: fetch-weights and prepare-model (cpu-full, torch inside) fill the `models` volume that
    the lean server (cpu, no torch) reads as CROSSVIT_CACHE_DIR; it needs no checkpoint, except under the torch
    backend (the gpu overlay), which loads the fetched checkpoint itself."""
    deployment, config = _one(built, "Deployment"), _one(built, "ConfigMap")
    settings = _validate_settings(config["data"], monkeypatch)
    assert settings.fetch_weights is False  # the init container fetched (or the image has them): never refetch
    inits = _pod_spec(deployment).get("initContainers", [])
    server = _main_container(deployment)
    server_mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    weights, models = str(settings.weights_dir), str(settings.cache_dir)
    lean_env = _env(_final_stages()["cpu"])
    assert models == lean_env["CROSSVIT_CACHE_DIR"]  # the init container's entries lie over the image's own
    if not inits:  # baked-weights: the image's own prepared /opt/models, no volume over it
        assert weights not in server_mounts and models not in server_mounts
        assert server["image"].endswith(":cpu-18d")
        return
    fetch, prepare = inits  # fetch, then prepare the model for the OpenVINO backend into the models volume
    scripts = _console_scripts()
    assert fetch["command"] == ["crossvit-weights"] and "crossvit-weights" in scripts
    assert prepare["command"] == ["crossvit-serve"] and prepare["args"] == ["--prepare-only"]
    assert "crossvit-serve" in scripts and prepare["envFrom"] == fetch["envFrom"]
    args = fetch["args"]
    assert args[:2] == ["fetch", "$(CROSSVIT_MODEL)"]
    assert Path(args[args.index("--dest") + 1]) == settings.weights_dir
    known = set(config["data"]) | {e["name"] for e in fetch.get("env", [])}
    assert set(re.findall(r"\$\((\w+)\)", " ".join(args))) <= known  # every $(VAR) expands
    fetch_mounts = {m["mountPath"]: m for m in fetch["volumeMounts"]}
    prepare_mounts = {m["mountPath"]: m for m in prepare["volumeMounts"]}
    assert not fetch_mounts[weights].get("readOnly") and prepare_mounts[weights]["readOnly"] is True
    assert prepare_mounts[weights]["name"] == fetch_mounts[weights]["name"]  # one shared weights volume
    assert not prepare_mounts[models].get("readOnly") and server_mounts[models]["readOnly"] is True
    assert prepare_mounts[models]["name"] == server_mounts[models]["name"]  # one shared models volume
    if settings.backend == "openvino":  # the base: the lean server with the init containers of the full image
        assert server["image"].endswith(":cpu") and {fetch["image"], prepare["image"]} == {
            server["image"].removesuffix(":cpu") + ":cpu-full"}
        assert weights not in server_mounts  # no checkpoint in the lean server
    else:  # gpu: one image throughout, whose torch backend reads the checkpoint
        assert fetch["image"] == prepare["image"] == server["image"]
        assert server_mounts[weights]["name"] == fetch_mounts[weights]["name"] and server_mounts[weights]["readOnly"]


def test_baked_weights_overlay_drops_the_fetch_and_its_volume() -> None:
    deployment = _one(_build(BAKED), "Deployment")
    spec = _pod_spec(deployment)
    assert "initContainers" not in spec
    assert not {"weights", "models"} & {v["name"] for v in spec["volumes"]}
    assert {m["mountPath"] for m in _main_container(deployment)["volumeMounts"]} == {"/tmp", "/dev/shm"}
    # the tag the overlay's comment builds with BAKE_WEIGHTS, which the Dockerfile's weights stages take
    assert "BAKE_WEIGHTS=crossvit_18_dagger_240" in (BAKED / "kustomization.yaml").read_text()
    assert _one(_build(BAKED), "ConfigMap")["data"]["CROSSVIT_MODEL"] == "crossvit_18_dagger_240"


def test_gpu_overlay_requests_a_gpu_and_the_cuda_image(monkeypatch: pytest.MonkeyPatch) -> None:
    built = _build(GPU)
    deployment, config = _one(built, "Deployment"), _one(built, "ConfigMap")
    container = _main_container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {c["image"] for c in _all_containers(deployment)} == {"crossvit-serve:cuda"}
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert toleration in _pod_spec(deployment)["tolerations"]
    settings = _validate_settings(config["data"], monkeypatch)
    assert (settings.device, settings.workers, settings.max_batch_size) == ("cuda", 1, 32)
    assert "cuda" in _final_stages() and _env(_final_stages()["cuda"])["CROSSVIT_DEVICE"] == "cuda"
    # the base stays CPU-only
    base = _one(_build(BASE), "Deployment")
    assert "nvidia.com/gpu" not in _main_container(base)["resources"]["limits"]
    assert _validate_settings(_one(_build(BASE), "ConfigMap")["data"], monkeypatch).device == "cpu"


def test_queue_hpa_overlay_scales_on_the_gauge_the_app_exports() -> None:
    hpa = _one(_build(QUEUE_HPA), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "crossvit_queue_depth_images"
    exported = {m.name for m in Metrics(max_batch_size=8).registry.collect()}
    assert "crossvit_queue_depth_images" in exported
    assert hpa["spec"]["minReplicas"] == _one(_build(BASE), "HorizontalPodAutoscaler")["spec"]["minReplicas"]


# ================================================================ settings named and valued in deploy files


def _deploy_texts() -> dict[str, str]:
    files = [DOCKERFILE, COMPOSE, DEPLOY / "README.md", DEPLOY / "image_test.py", *sorted(K8S.rglob("*.yaml"))]
    return {p.relative_to(REPO).as_posix(): p.read_text() for p in files}


def test_every_crossvit_name_is_a_setting() -> None:
    used: dict[str, set[str]] = {}
    for name, text in _deploy_texts().items():
        used[name] = set(CROSSVIT_NAME.findall(text))
    # parsed, too: ConfigMap keys, env names, compose and Dockerfile ENV keys
    for folder in _kustomizations():
        for doc in _build(folder):
            if doc["kind"] == "ConfigMap":
                used.setdefault("configmaps", set()).update(doc["data"])
            if doc["kind"] == "Deployment":
                used.setdefault("env", set()).update(e["name"] for c in _all_containers(doc) for e in c.get("env", []))
    compose = yaml.safe_load(COMPOSE.read_text())
    used["compose env"] = {k for s in compose["services"].values() for k in s.get("environment", {})}
    used["Dockerfile ENV"] = {k for s in _final_stages().values() for k in _env(s)}
    crossvit = {where: {n for n in names if n.startswith(ENV_PREFIX)} for where, names in used.items()}
    unknown = {where: sorted(names - SETTINGS_ENV) for where, names in crossvit.items() if names - SETTINGS_ENV}
    assert not unknown, f"not settings: {unknown}; settings are {sorted(SETTINGS_ENV)}"
    assert len(set().union(*crossvit.values())) >= 10


def test_kubernetes_values_are_valid_settings(built: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    config = _one(built, "ConfigMap")
    for stage in _final_stages().values():
        env = {k: v for k, v in _env(stage).items() if k.startswith(ENV_PREFIX)} | config["data"]
        settings = _validate_settings(env, monkeypatch)  # raises, naming the setting, if a value is invalid
        assert settings.host == "0.0.0.0" and settings.allow_random_weights is False


def test_compose_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    stages = _final_stages()
    for name, service in compose["services"].items():
        image_env = {k: v for k, v in _env(stages[service["build"]["target"]]).items() if k.startswith(ENV_PREFIX)}
        settings = _validate_settings(image_env | service["environment"], monkeypatch)
        assert settings.port == DEFAULT_PORT, name


def test_invalid_values_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="shutdown_timeout_s"):
        _validate_settings({"CROSSVIT_SHUTDOWN_TIMEOUT_S": "soon"}, monkeypatch)


# ================================================================ Dockerfile and .dockerignore


def test_dockerfile_pulls_nothing_but_its_base_image() -> None:
    """No `# syntax=` parser directive (BuildKit would pull that frontend image); every FROM is the base or a stage."""
    first = DOCKERFILE.read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE), first
    args, stages = _dockerfile()
    assert args["BASE_IMAGE"] == "python:3.11-slim"  # overridable: make image-test passes a local bookworm
    assert {s.base for s in stages.values()} == {args["BASE_IMAGE"], "scratch"}


def test_dockerfile_targets() -> None:
    args, stages = _dockerfile()
    final = _final_stages()
    assert list(stages)[-1] == "cpu"  # `docker build .` without --target builds the (lean) CPU image
    assert final["cpu"].base == final["cpu-full"].base == final["cuda"].base == args["BASE_IMAGE"]
    cuda = _env(final["cuda"])
    assert "compute" in cuda["NVIDIA_DRIVER_CAPABILITIES"].split(",") and cuda["NVIDIA_VISIBLE_DEVICES"] == "all"
    for name in ("cpu", "cpu-full"):
        env = _env(final[name])
        assert "NVIDIA_VISIBLE_DEVICES" not in env and (env["CROSSVIT_DEVICE"], env["CROSSVIT_BACKEND"]) == (
            "cpu", "openvino"), name


def _lock_file(words: list[str]) -> str:
    return words[words.index("-r") + 1]


def _lock_installs(stage: Stage) -> list[list[str]]:
    """The arguments of each `requirements/install.py` the stage runs."""
    return [c[2:] for c in _run_commands(stage) if c[:2] == ["/opt/venv/bin/python", "requirements/install.py"]]


def test_images_install_exactly_the_lock() -> None:
    """Every dependency comes from a lock file through install.py (pinned pip, hash-checked, nothing resolved,
    pip check); what is not hashed is torch alone, pinned and installed with --no-deps."""
    args, stages = _dockerfile()
    venvs = ("venv-cuda", "venv-cpu-full", "venv-cpu")
    cuda, full, lean = (_pip_installs(stages[name]) for name in venvs)
    # cuda: serve.txt as locked (PyPI's CUDA torch), then the project without resolving anything
    assert _lock_installs(stages["venv-cuda"]) == [["requirements/serve.txt"]]
    # cpu-full: the pinned pip, torch from TORCH_INDEX_URL at the locked version, the rest; or serve.txt when it
    # is empty
    assert _lock_installs(stages["venv-cpu-full"]) == [
        [], ["requirements/serve-cpu.txt"], ["requirements/serve.txt"]
    ]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert [c for c in full if "-r" in c] == [
        ["-q", "--no-deps", "--index-url", "$TORCH_INDEX_URL", "-r", "requirements/torch.txt"]
    ]
    # cpu: the lean lock alone, no torch from anywhere
    assert _lock_installs(stages["venv-cpu"]) == [["requirements/lean.txt"]]
    assert [c for c in lean if "-r" in c] == [] and "TORCH_INDEX_URL" not in " ".join(stages["venv-cpu"].all("ARG"))
    for installs in (cuda, full, lean):
        project = [c for c in installs if "-r" not in c]
        assert project == [["-q", "--no-deps", "--no-build-isolation", "."]]
        assert all("--no-deps" in words for words in installs)  # nothing resolved freely
    for name in venvs:
        assert ["/opt/venv/bin/python", "-m", "pip", "check"] in _run_commands(stages[name]), name
    assert any("requirements/install.py" in copy.split() for copy in stages["build"].all("COPY"))


def test_make_setup_installs_the_dev_lock_the_same_way() -> None:
    recipe = [shlex.split(line.strip()) for line in (REPO / "Makefile").read_text().splitlines()
              if line.strip().startswith(("$(PIP)", "$(PY) requirements/install.py"))]
    assert recipe == [["$(PY)", "requirements/install.py", "requirements/dev.txt"],
                      ["$(PIP)", "--no-deps", "--no-build-isolation", "-e", "."]]


def test_final_stages_run_as_a_user_and_serve() -> None:
    scripts = _console_scripts()
    for name, stage in _final_stages().items():
        uid, _, gid = stage.all("USER")[-1].partition(":")
        # numeric, so Kubernetes' runAsNonRoot can check it
        assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0, name
        assert stage.all("EXPOSE") == [f"{DEFAULT_PORT} {PROBE_PORT}"], name
        assert json.loads(stage.all("CMD")[-1]) == ["crossvit-serve"] and "crossvit-serve" in scripts
        env = _env(stage)
        # random weights only when asked at run time (make image-test asks; the server flags them)
        assert env["CROSSVIT_HOST"] == "0.0.0.0" and env["CROSSVIT_ALLOW_RANDOM_WEIGHTS"] == "false"
        assert env["CROSSVIT_WEIGHTS_DIR"] == "/weights"
        assert env["PATH"].startswith("/opt/venv/bin:")
        # only built artefacts reach the final stage: its own target's venv and weights folder, or for the lean
        # cpu image the prepared models alone (no checkpoint)
        copies = [shlex.split(c) for c in stage.all("COPY")]
        artefact = ("--from=models-cpu", env["CROSSVIT_CACHE_DIR"]) if name == "cpu" else (
            f"--from=weights-{name}", env["CROSSVIT_WEIGHTS_DIR"])
        assert {(c[0], c[-1]) for c in copies} == {(f"--from=venv-{name}", "/opt/venv"), artefact}, name


def test_the_lean_image_serves_what_a_stage_with_torch_prepared() -> None:
    """cpu: torch only in the stage that runs --prepare-only into CROSSVIT_CACHE_DIR; the image reads it there
    and cannot fetch. Random entries only without BAKE_WEIGHTS, and the image does not serve them by default."""
    _, stages = _dockerfile()
    models, lean = stages["models-cpu"], _env(_final_stages()["cpu"])
    assert "venv-cpu-full" in {s.name for s in _ancestors(models)}  # CPU torch, as cpu-full has it
    assert _env(models)["CROSSVIT_CACHE_DIR"] == lean["CROSSVIT_CACHE_DIR"] == "/opt/models"
    assert lean["CROSSVIT_FETCH_WEIGHTS"] == "false" and lean["CROSSVIT_ALLOW_RANDOM_WEIGHTS"] == "false"
    (run,) = [args for kw, args in models.own if kw == "RUN"]
    baked, _, unbaked = run.partition(" else ")
    assert 'CROSSVIT_MODEL="$BAKE_WEIGHTS" /opt/venv/bin/crossvit-serve --prepare-only' in baked
    assert "ALLOW_RANDOM" not in baked
    assert "for model in $RANDOM_MODELS" in unbaked and "CROSSVIT_ALLOW_RANDOM_WEIGHTS=true" in unbaked
    assert {a.partition("=")[0] for a in models.all("ARG")} >= {"BAKE_WEIGHTS", "RANDOM_MODELS"}


def _ancestors(stage: Stage) -> list[Stage]:
    found = []
    while stage.parent is not None:
        stage = stage.parent
        found.append(stage)
    return found


def test_bake_weights_fetches_into_the_weights_dir() -> None:
    _, stages = _dockerfile()
    for name in ("fetched-cpu", "weights-cuda"):  # fetched-cpu: for cpu-full and for cpu's prepared model
        run = " ".join(args for kw, args in stages[name].own if kw == "RUN")
        assert 'crossvit-weights fetch "$BAKE_WEIGHTS" --dest /weights' in run, name
        assert "crossvit-weights verify /weights" in run, name
        assert "BAKE_WEIGHTS" in {a.partition("=")[0] for a in stages[name].all("ARG")}


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    _, stages = _dockerfile()
    sources = []
    for stage in stages.values():
        for copy_args in stage.all("COPY") + stage.all("ADD"):
            words = shlex.split(copy_args)
            if any(w.startswith("--from=") for w in words):
                continue
            sources += [w for w in words[:-1] if not w.startswith("--")]
    # every package pyproject.toml installs is copied: `pip install .` fails on a missing one
    packages = {name.partition(".")[0] for name in _pyproject_packages()}
    assert {"pyproject.toml", "README.md", "requirements/*.txt", *packages} <= set(sources)
    for source in sources:
        matches = glob.glob(source, root_dir=REPO)
        assert matches, source
        for match in matches:
            assert not _ignored(match), f"{match} is COPY'd but .dockerignore leaves it out"
    assert {f"requirements/{n}.txt" for n in ("serve", "serve-cpu", "torch", "lean")} <= set(glob.glob(
        "requirements/*.txt", root_dir=REPO))
    # package data the image needs (pyproject's package-data) is not ignored either
    assert not _ignored("weights/imagenet_classes.txt")


def test_a_built_wheel_holds_every_module(tmp_path: Path) -> None:
    """What the image installs (`pip install .`, not editable) has every module of the source tree:
    a package missing from pyproject's list passes every editable-install test and fails only in
    the image."""
    source = tmp_path / "src"
    keep = ["pyproject.toml", "README.md", *{n.partition(".")[0] for n in _pyproject_packages()}]
    for name in keep:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    modules = {p.relative_to(source).as_posix() for p in source.rglob("*.py")}  # before the build's build/
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = set(archive.namelist())
    assert modules - packaged == set()
    assert {"weights/imagenet_classes.txt", "service/api/static/index.html"} <= packaged


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python", ".git/HEAD", "weights/crossvit_18_dagger_240.safetensors",
        "weights/crossvit_18_dagger_224.pth", "weights/sub/x.bin", "weights/manifest.json",
        "weights/.cache/models--timm--x/blobs/abc", "model/__pycache__/crossvit.cpython-311.pyc",
        "tests/model/test_crossvit.py", ".mypy_cache/3.11/x.json", "build/image-test/build.log",
        "build/lock-tool/bin/uv",
    ],
)
def test_dockerignore_leaves_out(path: str) -> None:
    assert _ignored(path)


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "README.md", "model/crossvit.py", "service/settings.py", "weights/cli.py",
             "weights/labels.py", "weights/imagenet_classes.txt", "requirements/serve.txt",
             "requirements/serve-cpu.txt", "requirements/torch.txt", "requirements/lean.txt", "client/cli.py"],
)
def test_dockerignore_keeps(path: str) -> None:
    assert not _ignored(path)


# ================================================================ healthchecks (Dockerfile and compose), executed


class _Health(BaseHTTPRequestHandler):
    status = 200
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"seen": [], "status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _healthchecks() -> dict[str, list[str]]:
    checks = {}
    for name, stage in _final_stages().items():
        (healthcheck,) = stage.all("HEALTHCHECK")
        options, _, command = healthcheck.partition(" CMD ")
        assert "--start-period=" in options
        checks[f"Dockerfile:{name}"] = json.loads(command)
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        checks[f"compose:{name}"] = [arg.replace("$$", "$") for arg in test[1:]]  # compose's escape of $
    return checks


def test_compose_healthcheck_is_the_images() -> None:
    checks = _healthchecks()
    assert len({json.dumps(argv) for argv in checks.values()}) == 1, checks
    (healthcheck,) = _final_stages()["cpu"].all("HEALTHCHECK")
    compose = yaml.safe_load(COMPOSE.read_text())
    for service in compose["services"].values():
        for option in ("interval", "timeout", "retries", "start_period"):
            flag = re.search(rf"--{option.replace('_', '-')}=(\S+)", healthcheck)
            assert flag and str(service["healthcheck"][option]) == flag.group(1), option


@pytest.mark.parametrize("name", sorted(_healthchecks()))
def test_healthcheck_probes_readyz_on_the_configured_port(name: str, health_server: tuple[int, type[_Health]]) -> None:
    """Healthy means ready: Docker has no readiness of its own, and compose's service_healthy means 'can serve'."""
    port, handler = health_server
    argv = _healthchecks()[name]
    assert argv[:2] == ["bash", "-c"]  # slim images have no curl; bash's /dev/tcp costs no interpreter start
    # the probe listener, whose default agrees with the app's
    assert re.search(rf"\$\{{CROSSVIT_PROBE_PORT:-{PROBE_PORT}\}}", argv[2])
    env = {**os.environ, "CROSSVIT_PROBE_PORT": str(port)}
    ok = subprocess.run(["bash", "-c", argv[2]], env=env, capture_output=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    assert handler.seen == ["/readyz"] and "/readyz" in PROBE_ROUTES
    handler.status = 503
    failing = subprocess.run(["bash", "-c", argv[2]], env=env, capture_output=True, timeout=30, check=False)
    assert failing.returncode != 0


# ================================================================ compose


def test_compose_services() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"crossvit", "crossvit-gpu"}
    _, stages = _dockerfile()
    for name, service in services.items():
        assert service["build"]["target"] in stages, name
        assert service["restart"] in ("unless-stopped", "always", "on-failure"), name
        (mapping,) = service["ports"]
        assert int(str(mapping).rsplit(":", 1)[1]) == int(service["environment"]["CROSSVIT_PORT"]) == DEFAULT_PORT
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace > float(service["environment"]["CROSSVIT_SHUTDOWN_TIMEOUT_S"]), name
    # the lean image serves the model its build prepared from the baked checkpoint of CROSSVIT_MODEL: no
    # volume, no fetching (it cannot: no torch)
    cpu = services["crossvit"]
    assert "profiles" not in cpu and cpu["build"]["target"] == "cpu" and "volumes" not in cpu
    assert cpu["build"]["args"]["BAKE_WEIGHTS"] == cpu["environment"]["CROSSVIT_MODEL"]
    assert cpu["environment"]["CROSSVIT_FETCH_WEIGHTS"] == "false"
    gpu = services["crossvit-gpu"]
    # the cuda image fetches into its named volume on the first start
    weights_dir = gpu["environment"].get("CROSSVIT_WEIGHTS_DIR", _env(stages["cuda"])["CROSSVIT_WEIGHTS_DIR"])
    volume = next(v for v in gpu["volumes"] if v.split(":")[1] == weights_dir)
    assert volume.split(":")[0] in compose["volumes"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["CROSSVIT_DEVICE"] == "cuda"
