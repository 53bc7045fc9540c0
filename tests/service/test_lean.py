"""The lean CPU path: `--prepare-only` where torch is, then a server that cannot import torch at all.

The server and its workers run with a `sitecustomize` that makes torch (and timm, safetensors,
huggingface_hub, NNCF) unimportable, as in an install without the torch and int8 extras; tests/deploy's fresh-venv
test checks the real base install the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from service.worker.backends import prepared as prepared_module
from service.worker.backends import resolve_backend
from service.worker.backends.prepared import PreparedMeta, cache_key, find_prepared
from tests.conftest import Reference, cli_env, start_cli
from tests.photos import encode, photo
from tests.service.test_api import _timm_logits

BLOCKED = ("torch", "torchvision", "timm", "safetensors", "huggingface_hub", "nncf")
SITECUSTOMIZE = f'''import sys


class _NoTorch:
    """Refuses {BLOCKED}: the process behaves as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the lean test)")
        return None


sys.meta_path.insert(0, _NoTorch())
'''


def _no_torch_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "no-torch"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": f"{site}:{Path.cwd()}"}


def _prepare(tmp_path: Path, **settings: object) -> subprocess.CompletedProcess[str]:
    env = cli_env(tmp_path, **settings)
    return subprocess.run([sys.executable, "-m", "service.cli", "--prepare-only"], env=env, capture_output=True,
                          text=True, timeout=600)


def _loads_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_a_prepared_model_serves_timm_logits_where_torch_cannot_be_imported(
    tmp_path: Path, reference: Reference
) -> None:
    cache = tmp_path / "models"
    done = _prepare(tmp_path, weights=reference.checkpoint, cache_dir=cache, precision="fp32")
    assert done.returncode == 0, done.stderr[-3000:]
    [folder] = [f for f in cache.iterdir() if f.is_dir() and f.name != "compiled"]
    assert json.loads((folder / "prepared.json").read_text())["source"] == "configured"

    data = encode(photo("chelsea"), "JPEG")
    # no checkpoint at all on this side: the prepared folder is the model
    with start_cli(tmp_path, cache_dir=cache, precision="fp32", workers=1, threads_per_worker=1,
                   extra_env=_no_torch_env(tmp_path)) as server:
        response = httpx.post(f"{server.url}/v1/classify", params={"top_k": 1000},
                              files={"images": ("c.jpg", data, "image/jpeg")}, timeout=60)
        assert response.status_code == 200, response.text
        card = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
        assert children and not any(_loads_torch(int(pid)) for pid in [server.process.pid, *children])
    served = torch.zeros(1000)
    for p in response.json()["results"][0]["predictions"]:
        served[p["class_id"]] = p["logit"]
    expected = _timm_logits(reference, data)
    assert float((served - expected).abs().max() / expected.abs().max()) <= 1e-4
    assert card["weights"]["file"] == folder.name and card["weights"]["pretrained"] is True
    assert card["workers"][0]["backend"] == "openvino"
    assert "serving a prepared model; no checkpoint at hand" in server.log()


def test_a_checkpoint_nobody_prepared_is_refused_with_the_command_that_prepares_it(
    tmp_path: Path, reference: Reference
) -> None:
    with start_cli(tmp_path, wait=False, weights=reference.checkpoint, cache_dir=tmp_path / "empty",
                   extra_env=_no_torch_env(tmp_path)) as server:
        assert server.process.wait(timeout=120) != 0
    log = server.log()
    assert "no prepared OpenVINO model for" in log and "crossvit-serve --prepare-only" in log, log[-3000:]


def test_without_torch_the_torch_backend_and_cuda_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.worker import backends

    monkeypatch.setattr(backends, "torch_available", lambda: False)
    with pytest.raises(ValueError, match="torch is not installed"):
        resolve_backend("torch", "cpu", "fp32")
    with pytest.raises(ValueError, match="torch is not installed"):
        resolve_backend("auto", "cuda:0", "auto")
    choice = resolve_backend("auto", "cpu", "auto")
    assert (choice.name, choice.fallback) == ("openvino", False)  # nothing to fall back to


def _fake_entry(cache: Path, sha: str, *, pretrained: bool, variant: str = "crossvit_tiny_240") -> Path:
    folder = cache / cache_key(variant, sha)
    folder.mkdir(parents=True)
    for name in prepared_module.FILES:
        (folder / name).write_text("")
    meta = PreparedMeta(variant, sha, "local" if pretrained else "random", pretrained, 1,
                        prepared_module.openvino_version())
    (folder / "prepared.json").write_text(json.dumps(meta.__dict__))
    return folder


def test_without_a_checkpoint_the_pretrained_prepared_model_wins_and_random_needs_consent(tmp_path: Path) -> None:
    random = _fake_entry(tmp_path, "a" * 64, pretrained=False)
    assert find_prepared(tmp_path, "crossvit_tiny_240", allow_random=False) is None
    assert find_prepared(tmp_path, "crossvit_tiny_240", allow_random=True)[0] == random  # type: ignore[index]
    pretrained = _fake_entry(tmp_path, "b" * 64, pretrained=True)
    _fake_entry(tmp_path, "c" * 64, pretrained=True, variant="crossvit_9_240")  # another variant: never
    assert find_prepared(tmp_path, "crossvit_tiny_240", allow_random=True)[0] == pretrained  # type: ignore[index]
