"""resolve_weights: configured file, directory or hub id; local manifest; fetch; and the none outcome."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from pathlib import Path

import huggingface_hub.constants
import pytest
from hubserver import serve_hub

from weights.fetch import FetchError
from weights.resolve import Resolved, hub_repo_id, resolve_weights
from weights.store import WeightsNotFoundError, record

TINY = "crossvit_tiny_240"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """HF_HUB_OFFLINE=1 as huggingface_hub saw it at import: any hub fetch fails at once, without a socket."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield


def _resolve(weights: str | None, weights_dir: Path, *, fetch: bool = True, source: str = "hub") -> Resolved:
    return resolve_weights(TINY, weights=weights, weights_dir=weights_dir, fetch=fetch, source=source)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


def test_configured_file_is_used_as_is(tmp_path: Path) -> None:
    file = _touch(tmp_path / "mine.bin")
    resolved = _resolve(str(file), tmp_path / "weights", fetch=False)
    assert (resolved.path, resolved.how) == (file, "configured")
    assert str(file) in resolved.detail
    with pytest.raises(FrozenInstanceError):
        resolved.how = "none"  # type: ignore[misc]


def test_a_foreign_manifest_beside_a_configured_file_is_not_fatal(tmp_path: Path) -> None:
    """`manifest.json` is a common name: another tool's file beside the checkpoint must not stop the start."""
    file = _touch(tmp_path / "mine.bin")
    (tmp_path / "manifest.json").write_text('{"tool": "something else", "files": [1, 2]}')
    resolved = _resolve(str(file), tmp_path / "weights", fetch=False)
    assert (resolved.path, resolved.how, resolved.recorded_sha256) == (file, "configured", None)


def test_configured_directory_is_searched(tmp_path: Path) -> None:
    found = _touch(tmp_path / "mounted" / "crossvit_tiny_224.pth")
    resolved = _resolve(str(tmp_path / "mounted"), tmp_path / "weights", fetch=False)
    assert (resolved.path, resolved.how) == (found, "configured")


def test_configured_directory_without_the_checkpoint_raises(tmp_path: Path, offline: None) -> None:
    (tmp_path / "mounted").mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"no checkpoint for crossvit_tiny_240 in .*mounted: looked for"):
        _resolve(str(tmp_path / "mounted"), tmp_path / "weights")


@pytest.mark.parametrize("missing", ["/nowhere/crossvit.safetensors", "weights/missing.pth", "./timm/crossvit", "~/x"])
def test_missing_configured_path_raises_and_never_falls_back(tmp_path: Path, missing: str, offline: None) -> None:
    _touch(tmp_path / f"{TINY}.safetensors")  # a local checkpoint that must not be picked instead
    with pytest.raises(WeightsNotFoundError, match="weights '.*' do not exist; CROSSVIT_WEIGHTS takes") as info:
        _resolve(missing, tmp_path)
    assert "timm/crossvit_tiny_240.in1k" in str(info.value)  # names what would be valid


@pytest.mark.parametrize(
    ("value", "repo"),
    [
        ("timm/crossvit_9_dagger_240.in1k", "timm/crossvit_9_dagger_240.in1k"),
        ("hf-hub:timm/crossvit_tiny_240.in1k", "timm/crossvit_tiny_240.in1k"),
        ("me/my-finetune", "me/my-finetune"),
        ("weights/crossvit.safetensors", None),
        ("ckpt/model.pth", None),
        ("/abs/path", None),
        ("./rel/path", None),
        ("a/b/c", None),
        ("just-a-name", None),
    ],
)
def test_hub_repo_id(value: str, repo: str | None) -> None:
    assert hub_repo_id(value) == repo


def test_local_manifest_hit(tmp_path: Path, offline: None) -> None:
    recorded = _touch(tmp_path / "custom.safetensors")
    _touch(tmp_path / f"{TINY}.pth")  # conventional name, but the manifest wins
    record(tmp_path, TINY, recorded, source="local", origin="custom.safetensors")
    resolved = _resolve(None, tmp_path)
    assert (resolved.path, resolved.how) == (recorded, "local")


def test_conventional_local_file(tmp_path: Path, offline: None) -> None:
    found = _touch(tmp_path / "crossvit_tiny_224.pth")
    resolved = _resolve(None, tmp_path)
    assert (resolved.path, resolved.how) == (found, "local")
    assert resolved.detail == f"found {found} for {TINY} in {tmp_path}"


def test_nothing_local_and_fetching_disabled(tmp_path: Path) -> None:
    resolved = _resolve(None, tmp_path, fetch=False)
    assert (resolved.path, resolved.how) == (None, "none")
    assert "fetching is disabled" in resolved.detail


def test_fetch_failure_gives_none_with_the_reason(tmp_path: Path, offline: None) -> None:
    resolved = _resolve(None, tmp_path)
    assert (resolved.path, resolved.how) == (None, "none")
    assert resolved.detail.startswith(f"no checkpoint for {TINY} in {tmp_path}; fetch failed: could not download")
    assert "timm/crossvit_tiny_240.in1k" in resolved.detail and "offline mode" in resolved.detail


def test_unknown_source_or_variant_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'hub' or 'official'"):
        _resolve(None, tmp_path, source="s3")
    with pytest.raises(KeyError, match="unknown CrossViT variant"):
        resolve_weights("vit_base", weights=None, weights_dir=tmp_path, fetch=False, source="hub")


def test_configured_hub_id_not_present_and_fetching_disabled_raises(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="name hub repo me/tiny, which is not in .* fetching is disabled"):
        _resolve("me/tiny", tmp_path, fetch=False)


def test_configured_hub_id_that_cannot_be_fetched_raises(tmp_path: Path, offline: None) -> None:
    with pytest.raises(FetchError, match="hub repo me/tiny"):
        _resolve("me/tiny", tmp_path)


_RESOLVE_IN_A_CHILD = """
import json, sys
from pathlib import Path
from weights.resolve import resolve_weights
r = resolve_weights(sys.argv[1], weights=sys.argv[2], weights_dir=Path(sys.argv[3]), fetch=True, source="hub")
sys.stdout.write(json.dumps({"path": str(r.path), "how": r.how, "detail": r.detail}))
"""


def test_configured_hub_id_is_fetched_then_found_locally(
    tmp_path: Path, tiny_safetensors: bytes, offline: None
) -> None:
    repo = "someone/crossvit-tiny-finetune"
    with serve_hub({"model.safetensors": tiny_safetensors}, repo) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CROSSVIT_"))}
        env |= {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        child = subprocess.run(
            [sys.executable, "-c", _RESOLVE_IN_A_CHILD, TINY, repo, str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )
    assert child.returncode == 0, child.stderr
    fetched = json.loads(child.stdout)
    assert fetched == {
        "path": str(tmp_path / f"{TINY}.safetensors"),
        "how": "fetched",
        "detail": f"CROSSVIT_WEIGHTS={repo}: fetched {repo} to {tmp_path / f'{TINY}.safetensors'}",
    }
    # a restart needs no network: the manifest says this file came from that repo
    again = _resolve(repo, tmp_path)
    assert (again.path, again.how) == (tmp_path / f"{TINY}.safetensors", "local")
    # another repo is not taken for it
    with pytest.raises(FetchError, match="hub repo someone/else"):
        _resolve("someone/else", tmp_path)
