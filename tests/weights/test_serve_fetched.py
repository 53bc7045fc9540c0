"""From the (fake) hub to the running server: the sha256 /v1/models reports is the fetched file's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
from conftest import TINY, TINY_REPO, RunCli
from hubserver import serve_hub

from tests.conftest import start_cli


def _card(url: str) -> dict[str, object]:
    weights: dict[str, object] = httpx.get(f"{url}/v1/models").json()["weights"]
    return weights


def test_fetch_then_serve_reports_the_same_sha256(tmp_path: Path, run_cli: RunCli, tiny_safetensors: bytes) -> None:
    dest = tmp_path / "weights"
    with serve_hub({"model.safetensors": tiny_safetensors}, TINY_REPO) as hub:
        fetched = run_cli(["fetch", TINY, "--dest", str(dest), "--no-progress"], {"HF_ENDPOINT": hub})
    assert fetched.returncode == 0, fetched.stderr
    # the hub is gone: the server finds the fetched file through the folder's manifest
    with start_cli(tmp_path, weights_dir=dest, workers=1) as server:
        weights = _card(server.url)
    assert weights["sha256"] == hashlib.sha256(tiny_safetensors).hexdigest()
    assert weights["pretrained"] is True and weights["source"] == "local"


def test_first_start_fetches_the_published_checkpoint(tmp_path: Path, tiny_safetensors: bytes) -> None:
    dest = tmp_path / "empty-weights"
    with serve_hub({"model.safetensors": tiny_safetensors}, TINY_REPO) as hub:
        hf_env = {"HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        with start_cli(tmp_path, weights_dir=dest, fetch_weights="true", workers=1, extra_env=hf_env) as server:
            weights = _card(server.url)
    assert weights["sha256"] == hashlib.sha256(tiny_safetensors).hexdigest()
    assert weights["source"] == "fetched" and weights["pretrained"] is True
    assert (dest / f"{TINY}.safetensors").read_bytes() == tiny_safetensors  # kept for the next start
    assert "how=fetched" in server.log()
