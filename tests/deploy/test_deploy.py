"""Deployment files agree with the Kubernetes API, with the app's settings and routes, and with each other.

No Docker engine or cluster here: everything is parsed (YAML, the Dockerfile's instructions,
.dockerignore patterns) and checked against the Kubernetes schemas that kubernetes-validate
ships, the `Settings` class, and the repository's own files.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.app import create_app
from service.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"

# The app's real routes (building the app runs nothing: the lifespan only starts under a server).
APP_ROUTES = frozenset(create_app(Settings()).openapi()["paths"])
# The oldest Kubernetes the pinned kubernetes-validate (>=1.28) ships schemas for, and the newest installed.
K8S_VERSIONS = sorted({"1.28.0", kubernetes_validate.latest_version()})
SETTINGS_ENV = frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields)
DEFAULT_PORT: int = Settings.model_fields["port"].default
CROSSVIT_NAME = re.compile(r"\bCROSSVIT_[A-Z0-9_]+")

Doc = dict[str, Any]


# ---------------------------------------------------------------- helpers: YAML and a small kustomize


def _docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization(folder: Path) -> Doc:
    data = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _named(items: list[Any]) -> bool:
    return all(isinstance(x, dict) and "name" in x for x in items)


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize applies it to these files: maps merge, lists of named maps merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        by_name = {x["name"]: x for x in base}
        merged_list = [_merge(by_name[x["name"]], x) if x["name"] in by_name else copy.deepcopy(x) for x in patch]
        patched = {x["name"] for x in patch}
        return [x for x in base if x["name"] not in patched] + merged_list
    return copy.deepcopy(patch)


def _pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _all_containers(doc: Doc) -> list[Doc]:
    spec = _pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def _build(folder: Path) -> list[Doc]:
    """What `kubectl kustomize folder` gives, for the features these kustomizations use."""
    k = _kustomization(folder)
    out: list[Doc] = []
    for entry in k.get("resources", []):
        target = (folder / entry).resolve()
        out += _build(target) if target.is_dir() else copy.deepcopy(_docs(target))
    for patch in k.get("patches", []):
        (body,) = _docs(folder / patch["path"])
        target = patch.get("target", {"kind": body["kind"], "name": body["metadata"]["name"]})
        hits = [i for i, r in enumerate(out) if (r["kind"], r["metadata"]["name"]) == (target["kind"], target["name"])]
        assert hits, f"{folder / patch['path']} patches nothing ({target})"
        for i in hits:
            out[i] = _merge(out[i], {k: v for k, v in body.items() if k not in ("apiVersion", "kind", "metadata")})
    for image in k.get("images", []):
        for doc in out:
            for c in _all_containers(doc) if doc["kind"] == "Deployment" else []:
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    for doc in out:
        if "namespace" in k and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = k["namespace"]
        for labels in k.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(labels["pairs"])
    return out


def _overlays() -> list[Path]:
    return [K8S, *sorted(p.parent for p in K8S.glob("*/kustomization.yaml"))]


def _patch_files() -> set[Path]:
    return {(folder / p["path"]).resolve() for folder in _overlays() for p in _kustomization(folder).get("patches", [])}


def _manifest_files() -> list[Path]:
    """Every complete Kubernetes manifest under deploy/k8s (not kustomizations, not patches)."""
    skip = _patch_files()
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in skip)


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


@pytest.fixture(params=_overlays(), ids=lambda p: p.relative_to(REPO).as_posix())
def built(request: pytest.FixtureRequest) -> list[Doc]:
    return _build(request.param)


# ---------------------------------------------------------------- helpers: Dockerfile


@dataclass
class Stage:
    name: str
    base: str  # the image it starts from, through any stages it builds on
    instructions: list[tuple[str, str]] = field(default_factory=list)

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
            base = stages[base].base if base in stages else base
            current = stages[name.strip()] = Stage(name.strip(), base)
        elif current is None:
            assert keyword == "ARG", f"only ARG may precede the first FROM, found {keyword}"
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
        else:
            current.instructions.append((keyword, rest))
    return args, stages


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in stage.all("ENV"):
        env.update(item.split("=", 1) for item in shlex.split(rest))  # type: ignore[misc]
    return env


def _run_commands(stage: Stage) -> list[list[str]]:
    """Each `&&`-separated command of the stage's RUN instructions, as shell words."""
    return [shlex.split(part) for run in stage.all("RUN") for part in run.split("&&")]


def _final_stages() -> dict[str, Stage]:
    _, stages = _dockerfile()
    return {name: stages[name] for name in ("cpu", "cuda")}


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


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_matches_the_kubernetes_schema(version: str) -> None:
    checked = 0
    for path in _manifest_files():
        for doc in _docs(path):
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
    for folder in _overlays():  # the patched results too
        for doc in _build(folder):
            kubernetes_validate.validate(doc, version, strict=True)
    assert checked >= 7


def test_validation_would_catch_a_typo() -> None:
    (deployment,) = _docs(K8S / "deployment.yaml")
    broken = copy.deepcopy(deployment)
    _main_container(broken)["readinesProbe"] = _main_container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest_meant_to_be_applied() -> None:
    listed = _kustomization(K8S)["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    # Subfolders are overlays (their own kustomization) or documented alternatives applied by hand.
    for folder in (p for p in K8S.iterdir() if p.is_dir()):
        assert (folder / "kustomization.yaml").is_file() or folder.name == "optional", folder
    for overlay in _overlays()[1:]:
        k = _kustomization(overlay)
        assert [(overlay / r).resolve() for r in k["resources"]] == [K8S.resolve()]
        assert all((overlay / p["path"]).is_file() for p in k["patches"])
        assert {p.name for p in overlay.glob("*.yaml")} == {"kustomization.yaml", *(p["path"] for p in k["patches"])}


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


def test_probes_hit_real_routes_on_the_app_port(built: list[Doc]) -> None:
    deployment, config = _one(built, "Deployment"), _one(built, "ConfigMap")
    container = _main_container(deployment)
    (port,) = container["ports"]
    assert port["containerPort"] == DEFAULT_PORT == int(config["data"].get("CROSSVIT_PORT", DEFAULT_PORT))
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {kind: p["path"] for kind, p in probes.items()} == {
        "startupProbe": "/readyz",  # model loaded and warmed
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",  # the process answers; never restart a pod for being busy
    }
    assert {p["path"] for p in probes.values()} <= APP_ROUTES
    assert all(_port_number(container, p["port"]) == DEFAULT_PORT for p in probes.values())
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300  # room for a model load


def test_prometheus_annotations(built: list[Doc]) -> None:
    deployment = _one(built, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == DEFAULT_PORT
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in APP_ROUTES


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


def test_init_container_fetches_into_the_servers_weights_dir(built: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, config = _one(built, "Deployment"), _one(built, "ConfigMap")
    settings = _validate_settings(config["data"], monkeypatch)
    (init,) = _pod_spec(deployment)["initContainers"]
    scripts = _console_scripts()
    assert init["command"] == ["crossvit-weights"] and "crossvit-weights" in scripts
    args = init["args"]
    assert args[:2] == ["fetch", "$(CROSSVIT_MODEL)"]
    assert Path(args[args.index("--dest") + 1]) == settings.weights_dir
    known = set(config["data"]) | {e["name"] for e in init.get("env", [])}
    assert set(re.findall(r"\$\((\w+)\)", " ".join(args))) <= known  # every $(VAR) expands
    assert init["image"] == _main_container(deployment)["image"]
    init_mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    server_mounts = {m["mountPath"]: m for m in _main_container(deployment)["volumeMounts"]}
    weights = str(settings.weights_dir)
    assert init_mounts[weights]["name"] == server_mounts[weights]["name"]  # one shared volume
    assert not init_mounts[weights].get("readOnly") and server_mounts[weights]["readOnly"] is True
    assert settings.fetch_weights is False  # the init container fetched; a missing file must fail, not refetch


def test_gpu_overlay_requests_a_gpu_and_the_cuda_image(monkeypatch: pytest.MonkeyPatch) -> None:
    built = _build(K8S / "gpu")
    deployment, config = _one(built, "Deployment"), _one(built, "ConfigMap")
    container = _main_container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert all(c["image"].endswith(":cuda") for c in _all_containers(deployment))
    assert _validate_settings(config["data"], monkeypatch).device == "cuda"
    assert "cuda" in _final_stages()


def test_queue_depth_hpa_uses_the_gauge_the_app_exports() -> None:
    (hpa,) = _docs(K8S / "optional" / "hpa-queue-depth.yaml")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "crossvit_queue_depth_images"
    assert hpa["metadata"]["name"] == _one(_build(K8S), "HorizontalPodAutoscaler")["metadata"]["name"]  # replaces it


# ================================================================ settings named and valued in deploy files


def _deploy_texts() -> dict[str, str]:
    files = [DOCKERFILE, COMPOSE, REPO / "deploy" / "README.md", *sorted(K8S.rglob("*.yaml"))]
    return {p.relative_to(REPO).as_posix(): p.read_text() for p in files}


def test_every_crossvit_name_is_a_setting() -> None:
    used: dict[str, set[str]] = {}
    for name, text in _deploy_texts().items():
        used[name] = set(CROSSVIT_NAME.findall(text))
    # parsed, too: ConfigMap keys, env names, compose and Dockerfile ENV keys
    for folder in _overlays():
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


def test_dockerfile_targets_and_bases() -> None:
    args, stages = _dockerfile()
    final = _final_stages()
    assert final["cpu"].base == "python:3.11-slim"
    assert final["cuda"].base.startswith("nvidia/cuda:")
    assert list(stages)[-1] == "cpu"  # `docker build .` without --target builds the CPU image
    cpu_torch = [c for c in _run_commands(stages["cpu-build"]) if "torch" in c]
    assert cpu_torch and "--index-url" in cpu_torch[0]
    index = cpu_torch[0][cpu_torch[0].index("--index-url") + 1]
    assert index.strip("$") == "TORCH_CPU_INDEX" and args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    cuda_torch = [c for c in _run_commands(stages["cuda-build"]) if "torch" in c]
    assert cuda_torch and "--index-url" not in cuda_torch[0]  # PyPI's torch is the CUDA build


def test_dockerfile_install_is_make_setups_pip_command() -> None:
    recipe = [line.strip() for line in (REPO / "Makefile").read_text().splitlines() if " pip install " in line]
    (make_install,) = recipe
    words = shlex.split(make_install)[1:]  # drop $(PY)
    assert "-e" in words and ".[dev]" in words
    expected = [w for w in words if w != "-e"]
    expected[expected.index(".[dev]")] = "."  # non-editable, without the dev extra
    _, stages = _dockerfile()
    for build in ("cpu-build", "cuda-build"):
        commands = [c[1:] for c in _run_commands(stages[build]) if c[:1] == ["/opt/venv/bin/python"]]
        assert expected in commands, (build, commands)


def test_final_stages_run_as_a_user_and_serve() -> None:
    scripts = _console_scripts()
    for name, stage in _final_stages().items():
        uid, _, gid = stage.all("USER")[-1].partition(":")
        # numeric, so Kubernetes' runAsNonRoot can check it
        assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0, name
        assert stage.all("EXPOSE") == [str(DEFAULT_PORT)], name
        assert json.loads(stage.all("CMD")[-1]) == ["crossvit-serve"] and "crossvit-serve" in scripts
        env = _env(stage)
        assert env["CROSSVIT_HOST"] == "0.0.0.0" and env["CROSSVIT_ALLOW_RANDOM_WEIGHTS"] == "false"
        assert env["CROSSVIT_WEIGHTS_DIR"] == "/weights"
        assert env["PATH"].startswith("/opt/venv/bin:")
        # only built artefacts reach the final stage: the venv and the weights folder
        copies = [shlex.split(c) for c in stage.all("COPY")]
        assert all(c[0].startswith("--from=") for c in copies), name
        assert {c[-1] for c in copies} == {"/opt/venv", env["CROSSVIT_WEIGHTS_DIR"]}, name


def test_bake_weights_fetches_into_the_weights_dir() -> None:
    _, stages = _dockerfile()
    for name in ("cpu-weights", "cuda-weights"):
        run = " ".join(stages[name].all("RUN"))
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
    assert {"pyproject.toml", "README.md", "model", "service", "weights"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), source
        assert not _ignored(source), f"{source} is COPY'd but .dockerignore leaves it out"
    # package data the image needs (pyproject's package-data) is not ignored either
    assert not _ignored("weights/imagenet_classes.txt")


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python", ".git/HEAD", "weights/crossvit_18_dagger_240.safetensors",
        "weights/crossvit_18_dagger_224.pth", "weights/sub/x.bin", "weights/manifest.json",
        "weights/.cache/models--timm--x/blobs/abc", "model/__pycache__/crossvit.cpython-311.pyc",
        "tests/model/test_crossvit.py", ".mypy_cache/3.11/x.json",
    ],
)
def test_dockerignore_leaves_out(path: str) -> None:
    assert _ignored(path)


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "README.md", "model/crossvit.py", "service/settings.py", "weights/cli.py",
             "weights/labels.py", "weights/imagenet_classes.txt"],
)
def test_dockerignore_keeps(path: str) -> None:
    assert not _ignored(path)


# ================================================================ healthchecks (Dockerfile and compose), executed


class _Health(BaseHTTPRequestHandler):
    status = 200
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(self.status if self.path == "/healthz" else 404)
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
        checks[f"compose:{name}"] = test[1:]
    return checks


@pytest.mark.parametrize("name", sorted(_healthchecks()))
def test_healthcheck_probes_healthz_on_the_configured_port(name: str, health_server: tuple[int, type[_Health]]) -> None:
    port, handler = health_server
    argv = _healthchecks()[name]
    assert argv[:2] == ["python", "-c"]  # slim images have no curl
    assert re.search(rf"CROSSVIT_PORT', '{DEFAULT_PORT}'", argv[2])  # the default agrees with the app's
    env = {**os.environ, "CROSSVIT_PORT": str(port)}
    ok = subprocess.run([sys.executable, "-c", argv[2]], env=env, capture_output=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    assert handler.seen == ["/healthz"] and "/healthz" in APP_ROUTES
    handler.status = 503
    failing = subprocess.run([sys.executable, "-c", argv[2]], env=env, capture_output=True, timeout=30, check=False)
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
        image_env = _env(stages[service["build"]["target"]])
        weights_dir = service["environment"].get("CROSSVIT_WEIGHTS_DIR", image_env["CROSSVIT_WEIGHTS_DIR"])
        volume = next(v for v in service["volumes"] if v.split(":")[1] == weights_dir)
        assert volume.split(":")[0] in compose["volumes"]
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace > float(service["environment"]["CROSSVIT_SHUTDOWN_TIMEOUT_S"]), name
    assert "profiles" not in services["crossvit"]
    gpu = services["crossvit-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["CROSSVIT_DEVICE"] == "cuda"
