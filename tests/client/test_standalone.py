"""The client stands alone: `pip install ./client` into a fresh venv gives `import client` and a working
`crossvit-classify`, with neither torch nor OpenVINO nor the server installed.

The client's dependencies come from the lock (hash-checked, through requirements/install.py, as
`make setup` installs); `pip check` there proves the closure below is complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from tests.client.helpers import write_photos

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "requirements"))

from lock import parse, requirement_lines  # noqa: E402

measured = logging.getLogger("tests.measured")
# httpx, pydantic and tqdm with what they need (setuptools: to build the client without isolation)
CLOSURE = {"httpx", "httpcore", "h11", "anyio", "idna", "certifi", "sniffio", "exceptiongroup", "typing-extensions",
           "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "tqdm", "colorama", "setuptools"}


def _lock_subset(path: Path) -> Path:
    pins = [p for p in parse((REPO / "requirements" / "dev.txt").read_text()) if p.name in CLOSURE]
    path.write_text(requirement_lines(pins))
    return path


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the client alone; its bin folder."""
    tmp = tmp_path_factory.mktemp("client-alone")
    venv.EnvBuilder(with_pip=True).create(tmp / "venv")
    python = tmp / "venv" / "bin" / "python"
    subprocess.run([str(python), str(REPO / "requirements" / "install.py"), str(_lock_subset(tmp / "lock.txt"))],
                   check=True, capture_output=True, timeout=600)
    source = tmp / "src" / "client"
    shutil.copytree(REPO / "client", source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", str(source)], check=True, capture_output=True, timeout=300)
    return python.parent


def test_the_client_imports_without_torch_openvino_or_the_server(client_venv: Path) -> None:
    probe = ("import importlib.util, sys, time; t = time.perf_counter(); import client; "
             "took = time.perf_counter() - t; "
             "print(took, [m for m in ('torch', 'openvino', 'numpy', 'service', 'model') "
             "if importlib.util.find_spec(m) is not None])")
    done = subprocess.run([str(client_venv / "python"), "-c", probe], capture_output=True, text=True, check=True,
                          cwd=client_venv)  # not the repo: its folders would be importable from there
    took, present = done.stdout.split(" ", 1)
    assert json.loads(present.strip().replace("'", '"')) == [], present
    site = next((client_venv.parent / "lib").glob("python3*/site-packages"))
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and "/pip/" not in str(f)
               and "/setuptools/" not in str(f) and "/_distutils_hack/" not in str(f))
    measured.warning(f"client alone: import client {float(took) * 1000:.0f} ms, "
                     f"installed {size / 2**20:.1f} MiB (pip and setuptools left out)")


def test_the_standalone_cli_classifies_against_the_real_server(client_venv: Path, server: str, tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos", 3)
    out = tmp_path / "results.jsonl"
    begun = time.monotonic()
    done = subprocess.run([str(client_venv / "crossvit-classify"), str(photos[0].parent), "--url", server,
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["ok"] for r in rows), rows
    measured.warning(f"standalone crossvit-classify: 3 photos in {time.monotonic() - begun:.1f} s")
