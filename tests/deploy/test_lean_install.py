"""The base install is the lean CPU server: a fresh venv with requirements/lean.txt alone (no torch)
serves a model prepared elsewhere, and its answers are timm's.

The venv is made the way the default image makes its final stage: requirements/install.py with the
lean lock, then the project with --no-deps, from a copy of its sources (as the Dockerfile copies
them), and the server is started from outside the repo, so that the installed package is what runs.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import Reference, cli_env, free_port, wait_ready
from tests.photos import encode, photo
from tests.service.test_api import _timm_logits

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "model", "service", "weights", "client")
measured = logging.getLogger("tests.measured")  # the numbers a report quotes (pytest -rP shows them)


def _run(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs)  # type: ignore[call-overload,no-any-return]


@pytest.fixture(scope="module")
def lean_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lean")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    installed = _run(python, REPO / "requirements" / "install.py", REPO / "requirements" / "lean.txt")
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    project = _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", source)
    assert project.returncode == 0, project.stderr[-3000:]
    return python


def test_the_lean_install_has_no_torch(lean_python: Path) -> None:
    for module in ("torch", "safetensors", "huggingface_hub", "timm"):
        probe = _run(lean_python, "-c", f"import {module}")
        assert probe.returncode != 0 and "No module named" in probe.stderr, (module, probe.stderr[-500:])
    versions = _run(lean_python, "-m", "pip", "list", "--format=freeze").stdout
    assert "openvino==" in versions and "numpy==" in versions
    size = sum(f.stat().st_size for f in (lean_python.parents[1] / "lib").rglob("*") if f.is_file())
    measured.warning(f"lean venv: {size / 2**20:.0f} MiB")


@pytest.fixture
def prepared(tmp_path: Path, reference: Reference) -> Path:
    """The model prepared where torch is (this venv), through the real CLI."""
    cache = tmp_path / "models"
    env = cli_env(tmp_path, weights=reference.checkpoint, cache_dir=cache, precision="fp32")
    done = _run(sys.executable, "-m", "service.cli", "--prepare-only", env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return cache


@pytest.fixture
def lean_server(tmp_path: Path, lean_python: Path, prepared: Path) -> Iterator[str]:
    port = free_port()
    env = cli_env(tmp_path, port=port, cache_dir=prepared, precision="fp32", workers=1, threads_per_worker=1)
    log = tmp_path / "lean-server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([lean_python.parent / "crossvit-serve"], env=env, cwd=tmp_path, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        try:
            wait_ready(f"http://127.0.0.1:{port}")
        except TimeoutError:
            raise AssertionError(log.read_text()[-4000:]) from None
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(timeout=30)


def test_the_lean_server_classifies_a_photo_as_timm_does(lean_server: str, reference: Reference) -> None:
    data = encode(photo("chelsea"), "JPEG")
    response = httpx.post(f"{lean_server}/v1/classify", params={"top_k": 1000},
                          files={"images": ("c.jpg", data, "image/jpeg")}, timeout=60)
    assert response.status_code == 200, response.text
    served = torch.zeros(1000)
    for p in response.json()["results"][0]["predictions"]:
        served[p["class_id"]] = p["logit"]
    expected = _timm_logits(reference, data)
    assert float((served - expected).abs().max() / expected.abs().max()) <= 1e-4
    card = httpx.get(f"{lean_server}/v1/models", timeout=10).json()
    assert card["workers"][0]["backend"] == "openvino" and card["workers"][0]["mode"] == "fp32"
