"""fetch against local servers: the official release over urllib in-process, the hub through the CLI.

Nothing leaves 127.0.0.1: the hub is `hubserver.serve_hub`, the release `hubserver.serve_files`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hubserver import serve_files, serve_hub, unreachable_url

from weights.fetch import FetchError, _reachable, fetch
from weights.store import MANIFEST_NAME, find_local, read_manifest

TINY = "crossvit_tiny_240"
TINY_REPO = "timm/crossvit_tiny_240.in1k"
OFFICIAL_FILE = "crossvit_tiny_224.pth"  # the IBM release names it by its small branch's resolution
RELEASE = "/IBM/CrossViT/releases/download/weights-0.1"
ROOT = Path(__file__).resolve().parents[2]
RunCli = Callable[..., subprocess.CompletedProcess[str]]  # the run_cli fixture


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_official_fetch_places_verifies_and_records(tmp_path: Path, tiny_official: bytes) -> None:
    with serve_files({f"{RELEASE}/{OFFICIAL_FILE}": tiny_official}) as url:
        path = fetch(TINY, tmp_path, source="official", official_base_url=url + RELEASE, progress=False)

    assert path == tmp_path / OFFICIAL_FILE
    assert path.read_bytes() == tiny_official
    entry = read_manifest(tmp_path)[TINY]
    assert entry.sha256 == hashlib.sha256(tiny_official).hexdigest()
    assert (entry.file, entry.source, entry.size) == (OFFICIAL_FILE, "official", len(tiny_official))
    assert entry.origin == f"{url}{RELEASE}/{OFFICIAL_FILE}"
    assert path.stat().st_mode & 0o777 == 0o644
    assert _files(tmp_path) == sorted([MANIFEST_NAME, OFFICIAL_FILE])  # no partial download left over
    assert find_local("crossvit_tiny", tmp_path) == path


def test_official_garbage_is_rejected_and_deleted(tmp_path: Path) -> None:
    with serve_files({f"{RELEASE}/{OFFICIAL_FILE}": b"<html>rate limited</html>" * 100}) as url:
        with pytest.raises(FetchError, match=f"{OFFICIAL_FILE} does not load as {TINY}.*not a readable checkpoint"):
            fetch(TINY, tmp_path, source="official", official_base_url=url + RELEASE, progress=False)
    assert _files(tmp_path) == []


def test_official_wrong_variant_is_rejected(tmp_path: Path, tiny_official: bytes) -> None:
    # crossvit_9_240's release file name, but tiny's tensors: loads as nothing that fits
    with serve_files({f"{RELEASE}/crossvit_9_224.pth": tiny_official}) as url:
        with pytest.raises(FetchError, match="does not fit this model"):
            fetch("crossvit_9_240", tmp_path, source="official", official_base_url=url + RELEASE, progress=False)
    assert _files(tmp_path) == []


def test_official_http_error_names_the_url(tmp_path: Path) -> None:
    with serve_files({}) as url:
        with pytest.raises(FetchError) as info:
            fetch(TINY, tmp_path, source="official", official_base_url=url + RELEASE, progress=False)
    message = str(info.value)
    assert f"GET {url}{RELEASE}/{OFFICIAL_FILE} answered HTTP 404" in message
    assert "CROSSVIT_WEIGHTS" in message  # the offline hint
    assert _files(tmp_path) == []


def test_unreachable_server_is_a_fetch_error_with_a_hint(tmp_path: Path) -> None:
    with unreachable_url() as url:
        with pytest.raises(FetchError) as info:
            fetch(TINY, tmp_path, source="official", official_base_url=url, progress=False)
    message = str(info.value)
    assert f"could not reach {url}/{OFFICIAL_FILE}" in message
    assert "refused" in message
    assert "mount a checkpoint" in message and "CROSSVIT_WEIGHTS" in message
    assert _files(tmp_path) == []


def test_unknown_source_and_variant(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'hub' or 'official'"):
        fetch(TINY, tmp_path, source="s3", progress=False)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="unknown CrossViT variant"):
        fetch("vit_tiny", tmp_path, progress=False)


def test_unwritable_destination(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(FetchError, match="cannot create the weights folder"):
        fetch(TINY, blocker / "weights", source="official", progress=False)


def test_hub_garbage_is_rejected_and_nothing_is_kept(tmp_path: Path, run_cli: RunCli) -> None:
    dest = tmp_path / "weights"
    with serve_hub({"model.safetensors": b"\x00" * 4096}, TINY_REPO) as url:
        result = run_cli(["fetch", TINY, "--dest", str(dest), "--no-progress"], {"HF_ENDPOINT": url})
    assert result.returncode == 1, result.stderr
    assert f"model.safetensors from the Hugging Face hub repo {TINY_REPO} at {url} does not load" in result.stderr
    assert "so it was deleted" in result.stderr
    assert not [f for f in _files(dest) if f.endswith((".safetensors", MANIFEST_NAME)) or "/blobs/" in f]


def test_hub_missing_repo_names_it(tmp_path: Path, run_cli: RunCli, tiny_safetensors: bytes) -> None:
    with serve_hub({"model.safetensors": tiny_safetensors}, TINY_REPO) as url:
        result = run_cli(
            ["fetch", TINY, "--repo", "someone/missing", "--dest", str(tmp_path), "--no-progress"],
            {"HF_ENDPOINT": url},
        )
    assert result.returncode == 1
    assert f"hub repo someone/missing at {url}" in result.stderr
    assert "RepositoryNotFoundError" in result.stderr
    assert "CROSSVIT_WEIGHTS" in result.stderr


def test_hub_offline_mode_is_honoured(tmp_path: Path, run_cli: RunCli) -> None:
    with unreachable_url() as url:  # never contacted: HF_HUB_OFFLINE stops huggingface_hub first
        result = run_cli(["fetch", TINY, "--dest", str(tmp_path)], {"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert f"could not download model.safetensors from the Hugging Face hub repo {TINY_REPO}" in result.stderr
    assert "offline mode is enabled" in result.stderr
    assert "mount a checkpoint into the weights folder" in result.stderr


def test_unwritable_manifest_is_a_fetch_error(tmp_path: Path, tiny_official: bytes) -> None:
    (tmp_path / MANIFEST_NAME).mkdir()  # the manifest cannot be written
    with serve_files({f"/{OFFICIAL_FILE}": tiny_official}) as url:
        with pytest.raises(FetchError, match=f"cannot write {TINY}'s checkpoint into {tmp_path}") as info:
            fetch(TINY, tmp_path, source="official", official_base_url=url, progress=False)
    assert isinstance(info.value, OSError)  # callers that catch OSError for bad weights catch this too


def test_unreachable_hub_fails_fast(tmp_path: Path, run_cli: RunCli) -> None:
    """Offline without HF_HUB_OFFLINE: one refused connection ends it, not huggingface_hub's retries."""
    with unreachable_url() as url:
        started = time.monotonic()
        result = run_cli(["fetch", TINY, "--dest", str(tmp_path), "--no-progress"], {"HF_ENDPOINT": url})
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert f"{url.removeprefix('http://')} is unreachable" in result.stderr
    assert "CROSSVIT_WEIGHTS" in result.stderr
    assert elapsed < 20, elapsed  # the process start and imports take a few seconds; retries took 25+


def test_a_proxy_skips_the_reachability_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a proxy the direct connection may be blocked while the proxy works: leave it to the download."""
    for name in [n for n in os.environ if n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    with unreachable_url() as url:
        with pytest.raises(FetchError, match="is unreachable"):
            _reachable(url, "the checkpoint")
        for proxy in ("http_proxy", "all_proxy"):
            monkeypatch.setenv(proxy, "http://proxy.invalid:3128")
            _reachable(url, "the checkpoint")  # no error: the proxy is the way out
            monkeypatch.delenv(proxy)


def test_hub_replace_from_the_cache_works_offline(
    tmp_path: Path, run_cli: RunCli, tiny_safetensors: bytes
) -> None:
    """A file already in the fetch cache is placed again without the hub: no reachability pre-flight."""
    dest = tmp_path / "weights"
    with serve_hub({"model.safetensors": tiny_safetensors}, TINY_REPO) as url:
        first = run_cli(["fetch", TINY, "--dest", str(dest), "--no-progress"], {"HF_ENDPOINT": url})
    assert first.returncode == 0, first.stderr
    placed = dest / f"{TINY}.safetensors"
    placed.unlink()
    (dest / MANIFEST_NAME).unlink()
    with unreachable_url() as url:  # the same endpoint the cache was filled from would be gone too
        started = time.monotonic()
        again = run_cli(["fetch", TINY, "--dest", str(dest), "--no-progress"], {"HF_ENDPOINT": url})
        elapsed = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert "from the fetch cache" in again.stderr and "is unreachable" not in again.stderr
    assert placed.read_bytes() == tiny_safetensors
    assert read_manifest(dest)[TINY].sha256 == hashlib.sha256(tiny_safetensors).hexdigest()
    assert elapsed < 20, elapsed  # and no hub round trip: huggingface_hub's own retries would add seconds


_CONCURRENT_FETCHES = """
import json, os, sys, threading
from pathlib import Path
from weights.fetch import fetch

dest = Path(sys.argv[1])
dest.mkdir(parents=True)
# Another pod's placement in progress: its init container is pid 1 too, so a pid-named temp file is this one.
other = dest / f".crossvit_tiny_240.safetensors.{os.getpid()}.tmp"
other.write_bytes(b"another pod's file, being placed")
errors = []

def run():
    try:
        fetch("crossvit_tiny_240", dest, source="hub", progress=False)
    except Exception as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=run) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(errors))
"""


def test_concurrent_fetches_into_one_folder_use_unique_temp_names(tmp_path: Path, tiny_safetensors: bytes) -> None:
    """Two fetches at once (one process: one pid, as two pods' init containers) neither collide nor
    touch a temp file of another placement with the same pid; the target appears whole."""
    dest = tmp_path / "weights"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CROSSVIT_"))}
    with serve_hub({"model.safetensors": tiny_safetensors}, TINY_REPO) as url:
        env |= {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        result = subprocess.run([sys.executable, "-c", _CONCURRENT_FETCHES, str(dest)], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [], result.stdout
    others = [p for p in dest.iterdir() if p.name.endswith(".tmp")]
    assert len(others) == 1 and others[0].read_bytes() == b"another pod's file, being placed"
    assert (dest / f"{TINY}.safetensors").read_bytes() == tiny_safetensors
    assert read_manifest(dest)[TINY].sha256 == hashlib.sha256(tiny_safetensors).hexdigest()
