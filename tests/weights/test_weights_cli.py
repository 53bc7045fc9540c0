"""`crossvit-weights` end to end: fetch from a local fake hub and release, verify, list."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hubserver import serve_files, serve_hub

from weights.cli import main
from weights.store import MANIFEST_NAME

TINY = "crossvit_tiny_240"
TINY_REPO = "timm/crossvit_tiny_240.in1k"
RunCli = Callable[..., subprocess.CompletedProcess[str]]  # the run_cli fixture


def test_fetch_from_the_hub_then_verify(
    tmp_path: Path, run_cli: RunCli, tiny_safetensors: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "weights"
    sha256 = hashlib.sha256(tiny_safetensors).hexdigest()
    with serve_hub({"model.safetensors": tiny_safetensors}, TINY_REPO) as url:
        fetched = run_cli(["fetch", "crossvit_tiny", "--dest", str(dest), "--no-progress"], {"HF_ENDPOINT": url})
    assert fetched.returncode == 0, fetched.stderr

    placed = dest / f"{TINY}.safetensors"
    assert placed.read_bytes() == tiny_safetensors
    assert not placed.is_symlink()  # a real file, not a link into the cache
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    assert manifest[TINY]["sha256"] == sha256
    assert manifest[TINY] | {"fetched_at": None} == {
        "file": f"{TINY}.safetensors",
        "source": "hub",
        "sha256": sha256,
        "size": len(tiny_safetensors),
        "fetched_at": None,
        "origin": TINY_REPO,
    }
    assert fetched.stdout == f"{TINY}: {placed} (sha256 {sha256}, {len(tiny_safetensors)} bytes)\n"

    assert main(["verify", str(dest)]) == 0  # no server needed any more
    assert capsys.readouterr().out == f"ok     {TINY}: {placed} (sha256 {sha256[:12]})\n"


def test_fetch_official_from_the_same_server_then_verify(
    tmp_path: Path, tiny_safetensors: bytes, tiny_official: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    release = "/IBM/CrossViT/releases/download/weights-0.1"
    hub = {"model.safetensors": tiny_safetensors}
    with serve_hub(hub, TINY_REPO, extra={f"{release}/crossvit_tiny_224.pth": tiny_official}) as url:
        args = ["fetch", TINY, "--source", "official", "--official-base-url", url + release, "--dest", str(tmp_path)]
        assert main([*args, "--no-progress"]) == 0
    placed = tmp_path / "crossvit_tiny_224.pth"
    assert placed.read_bytes() == tiny_official
    entry = json.loads((tmp_path / MANIFEST_NAME).read_text())[TINY]
    assert (entry["file"], entry["source"]) == ("crossvit_tiny_224.pth", "official")
    assert entry["origin"] == f"{url}{release}/crossvit_tiny_224.pth"
    assert entry["sha256"] == hashlib.sha256(tiny_official).hexdigest()
    assert main(["verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"ok     {TINY}: {placed}")


def _fetched_folder(tmp_path: Path, tiny_official: bytes) -> Path:
    """A weights folder as `fetch --source official` leaves it, made in-process (no subprocess)."""
    from weights.fetch import fetch

    with serve_files({"/crossvit_tiny_224.pth": tiny_official}) as url:
        fetch(TINY, tmp_path, source="official", official_base_url=url, progress=False)
    return tmp_path


def test_verify_names_a_tampered_file(
    tmp_path: Path, tiny_official: bytes, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    folder = _fetched_folder(tmp_path, tiny_official)
    with (folder / "crossvit_tiny_224.pth").open("r+b") as f:
        f.seek(-1, 2)
        f.write(b"\xff")
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAILED {TINY}: {folder / 'crossvit_tiny_224.pth'} has sha256 ")
    assert "1 of 1 checkpoints failed verification: crossvit_tiny_240" in caplog.text


def test_verify_names_a_missing_file_and_a_file_that_does_not_load(
    tmp_path: Path, tiny_official: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _fetched_folder(tmp_path, tiny_official)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    junk = folder / "junk.pth"
    junk.write_bytes(b"junk")
    manifest["crossvit_9_240"] = manifest[TINY] | {"file": "junk.pth", "sha256": hashlib.sha256(b"junk").hexdigest()}
    manifest["crossvit_base_240"] = manifest[TINY] | {"file": "gone.safetensors"}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))

    assert main(["verify", str(folder)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"ok     {TINY}")
    assert lines[1].startswith("FAILED crossvit_9_240: ") and "does not load" in lines[1]
    assert lines[2] == f"FAILED crossvit_base_240: {folder / 'gone.safetensors'} is missing"


def test_verify_without_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path)]) == 0
    assert "nothing to verify" in capsys.readouterr().out


def test_list_shows_the_table_and_what_is_present(
    tmp_path: Path, tiny_official: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _fetched_folder(tmp_path, tiny_official)
    (folder / "crossvit_9_240.pth").write_bytes(b"unrecorded")
    assert main(["list", "--dir", str(folder), TINY, "crossvit_9", "crossvit_18_dagger_240"]) == 0
    header, tiny, nine, eighteen = capsys.readouterr().out.splitlines()
    assert header.split() == ["variant", "params", "fp32", "MB", "paper", "top-1", "local"]
    sha256 = hashlib.sha256(tiny_official).hexdigest()
    assert tiny.split() == [TINY, "7.0M", "28", "73.4", "crossvit_tiny_224.pth", f"sha256:{sha256[:12]}"]
    unrecorded = hashlib.sha256(b"unrecorded").hexdigest()[:12]
    assert nine.split() == ["crossvit_9_240", "8.6M", "34", "73.9", "crossvit_9_240.pth", f"sha256:{unrecorded}",
                            "(not", "in", "manifest)"]
    assert eighteen.split() == ["crossvit_18_dagger_240", "44.3M", "177", "82.8", "-"]


def test_unknown_variant_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fetch", "vit_base_patch16_224"])
    assert info.value.code == 2
    assert "unknown CrossViT variant 'vit_base_patch16_224'" in capsys.readouterr().err


def test_default_folder_follows_crossvit_weights_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import weights
    from weights.cli import default_weights_dir

    monkeypatch.delenv("CROSSVIT_WEIGHTS_DIR", raising=False)
    assert default_weights_dir() == Path(weights.__file__).resolve().parent  # beside the label files
    monkeypatch.setenv("CROSSVIT_WEIGHTS_DIR", str(tmp_path))
    assert default_weights_dir() == tmp_path
