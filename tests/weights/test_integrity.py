"""The served bytes are the verified bytes: manifest sha256 at start-up, the same hash in every
(re)started worker, and no paths or pids in /v1/models."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from pathlib import Path

import httpx
import torch
from conftest import TINY
from safetensors.torch import load_file, save_file

from tests.conftest import Reference, run_server, start_cli, until, worker_pids
from weights.store import MANIFEST_NAME, read_manifest, record


def _other_checkpoint(source: Path, target: Path) -> None:
    """A valid checkpoint of the same variant with other values: it loads fine, only its hash tells."""
    state = load_file(source)
    state["head.0.bias"] = state["head.0.bias"] + torch.ones_like(state["head.0.bias"])
    save_file(state, target)


def test_a_file_that_no_longer_matches_its_manifest_sha256_refuses_to_start(
    tmp_path: Path, tiny_safetensors: bytes
) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    path = folder / f"{TINY}.safetensors"
    path.write_bytes(tiny_safetensors)
    record(folder, TINY, path, source="hub", origin="timm/crossvit_tiny_240.in1k")
    recorded = read_manifest(folder)[TINY].sha256
    _other_checkpoint(path, path)  # replaced in place: still a valid checkpoint of the variant
    with start_cli(tmp_path, wait=False, weights_dir=folder, workers=1) as server:
        code = server.process.wait(timeout=120)
    assert code != 0, server.log()
    log = server.log()
    assert recorded in log and hashlib.sha256(path.read_bytes()).hexdigest() in log, log
    assert f"the manifest records {recorded}" in log and MANIFEST_NAME in log


def test_a_restarted_worker_refuses_a_replaced_file_and_the_pool_reports_it(
    tmp_path: Path, reference: Reference
) -> None:
    path = tmp_path / f"{TINY}.safetensors"
    shutil.copyfile(reference.checkpoint, path)
    verified = hashlib.sha256(path.read_bytes()).hexdigest()
    with run_server(weights=str(path), workers=1, threads_per_worker=1, precision="fp32") as url:
        card = httpx.get(f"{url}/v1/models").json()
        assert card["weights"]["sha256"] == verified
        replacement = tmp_path / "replacement.safetensors"
        _other_checkpoint(path, replacement)
        os.replace(replacement, path)  # as a deploy script or a fetch into the same folder would
        [pid] = worker_pids(url)
        os.kill(pid, signal.SIGKILL)

        def refused() -> bool:
            worker = httpx.get(f"{url}/v1/models").json()["workers"][0]
            return "verified at start-up" in (worker["last_error"] or "")

        until(refused, 60, "the restarted worker to refuse the replaced file")
        card = httpx.get(f"{url}/v1/models").json()
        assert card["weights"]["sha256"] == verified  # still the truth: nothing serves the new file
        assert card["workers"][0]["state"] != "ready"
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert str(tmp_path) not in httpx.get(f"{url}/v1/models").text  # the error names the file, not its path


def test_models_shows_no_absolute_path_and_no_pid(tmp_path: Path, reference: Reference) -> None:
    path = tmp_path / f"{TINY}.safetensors"
    shutil.copyfile(reference.checkpoint, path)
    with run_server(weights=str(path), workers=1, threads_per_worker=1) as url:
        response = httpx.get(f"{url}/v1/models")
    card = response.json()
    assert card["weights"]["file"] == path.name and "path" not in card["weights"]
    assert str(tmp_path) not in response.text
    assert card["workers"] and all("pid" not in w for w in card["workers"])
