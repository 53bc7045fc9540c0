"""deploy/kserve: the InferenceServices carry what KServe needs to run our image as a custom predictor
speaking v2, and agree with the app (settings, routes, port) and with the Kubernetes Pod schema.

No cluster here: KServe's own SDK models name every field a PredictorSpec may hold, and the pod part
of the predictor is validated as a Kubernetes PodSpec (kubernetes-validate, strict).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kserve import models as kserve_models

from service.app import create_app
from service.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]
KSERVE = REPO / "deploy" / "kserve"
MANIFESTS = sorted(KSERVE.glob("*.yaml"))
OPEN_ROUTES = {"/v2/health/live", "/v2/health/ready"}  # probes reach them without an API key
APP_ROUTES = frozenset(create_app(Settings()).openapi()["paths"])
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

Doc = dict[str, Any]


def _load(path: Path) -> Doc:
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert isinstance(doc, dict)
    return doc


def _container(doc: Doc) -> Doc:
    (container,) = doc["spec"]["predictor"]["containers"]
    assert isinstance(container, dict)
    return container


def _env(container: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_there_is_a_cpu_and_a_gpu_service() -> None:
    assert [p.name for p in MANIFESTS] == ["inferenceservice-gpu.yaml", "inferenceservice.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_a_custom_predictor_speaking_v2(path: Path) -> None:
    doc = _load(path)
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    name = doc["metadata"]["name"]
    assert DNS_1035.match(name) and len(name) <= 45, name  # KServe's limit leaves room for its suffixes
    assert set(doc["spec"]) == {"predictor"}
    predictor = doc["spec"]["predictor"]
    known = set(kserve_models.V1beta1PredictorSpec.attribute_map.values())
    assert set(predictor) <= known, f"not PredictorSpec fields: {sorted(set(predictor) - known)}"
    frameworks = {"model", "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "pmml", "lightgbm",
                  "paddle", "huggingface"}
    assert not set(predictor) & frameworks, "a custom predictor names its container, not a model format"
    container = _container(doc)
    assert container["name"] == "kserve-container"  # KServe finds the predictor's container by this name
    env = _env(container)
    assert env["PROTOCOL"] == "v2"  # protocolVersion of a custom container; KServe's webhook takes v1 or v2
    assert re.match(r"^(hf|s3|gs|pvc|https?)://", env["STORAGE_URI"]), env["STORAGE_URI"]
    assert env["CROSSVIT_WEIGHTS"].startswith("/mnt/models/")  # where the storage initializer puts it
    assert env["CROSSVIT_FETCH_WEIGHTS"] == "false" and env["CROSSVIT_ALLOW_RANDOM_WEIGHTS"] == "false"
    assert predictor["enableServiceLinks"] is False
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_settings_port_and_probes_agree_with_the_app(path: Path) -> None:
    doc = _load(path)
    container = _container(doc)
    env = _env(container)
    crossvit = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    settings = Settings(**crossvit)  # every CROSSVIT_* is a real setting with a valid value
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port == 8080 and port["name"] in ("http1", "h2c")
    assert settings.host == "0.0.0.0"
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    for probe in probes.values():
        assert probe["path"] in APP_ROUTES and probe["path"] in OPEN_ROUTES
        assert probe["port"] == port["containerPort"]
    pre_stop_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert doc["spec"]["predictor"]["terminationGracePeriodSeconds"] > settings.shutdown_timeout_s + pre_stop_s
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests)
    if settings.device.startswith("cuda"):
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 1
        assert settings.backend == "torch" and container["image"].endswith(":cuda")
    else:
        # the checkpoint comes at run time (STORAGE_URI): converting it needs the image with torch
        assert "nvidia.com/gpu" not in limits and container["image"].endswith(":cpu-full")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_the_predictor_pod_is_a_valid_pod(path: Path) -> None:
    predictor = _load(path)["spec"]["predictor"]
    extension = set(kserve_models.V1beta1ComponentExtensionSpec.attribute_map.values())
    pod_spec = {k: v for k, v in predictor.items() if k not in extension}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    mounts = {m["name"] for m in _container(_load(path))["volumeMounts"]}
    assert mounts == {v["name"] for v in pod_spec["volumes"]}
