"""The weights folder: manifest round trip, atomic updates, and where a variant's checkpoint is looked for."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest

from model import list_variants
from weights.store import (
    MANIFEST_NAME,
    ManifestError,
    WeightsNotFoundError,
    candidate_names,
    find_local,
    read_manifest,
    record,
    recorded_sha256,
    resolve_path,
)


def _touch(path: Path, data: bytes = b"weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_absent_manifest_is_empty(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) == {}
    assert read_manifest(tmp_path / "missing") == {}


def test_record_writes_the_entry(tmp_path: Path) -> None:
    path = _touch(tmp_path / "crossvit_tiny_240.safetensors", b"abc")
    when = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    entry = record(tmp_path, "crossvit_tiny", path, source="hub", origin="timm/crossvit_tiny_240.in1k", fetched_at=when)

    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert data == {
        "crossvit_tiny_240": {  # the Lucid alias is stored under timm's name
            "file": "crossvit_tiny_240.safetensors",
            "source": "hub",
            "sha256": hashlib.sha256(b"abc").hexdigest(),
            "size": 3,
            "fetched_at": "2024-05-01T12:00:00+00:00",
            "origin": "timm/crossvit_tiny_240.in1k",
        }
    }
    assert read_manifest(tmp_path) == {"crossvit_tiny_240": entry}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crossvit_tiny_240.safetensors", MANIFEST_NAME]  # no temp


def test_record_stamps_utc_now_and_keeps_other_entries(tmp_path: Path) -> None:
    record(tmp_path, "crossvit_9_240", _touch(tmp_path / "a.pth"), source="local", origin="a.pth")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    record(tmp_path, "crossvit_tiny_240", _touch(tmp_path / "b.pth"), source="official", origin="https://x/b.pth")
    record(tmp_path, "crossvit_tiny_240", _touch(tmp_path / "sub" / "c.pth"), source="local", origin="c.pth")

    entries = read_manifest(tmp_path)
    assert sorted(entries) == ["crossvit_9_240", "crossvit_tiny_240"]
    assert entries["crossvit_tiny_240"].file == "sub/c.pth"  # replaced, relative to the folder
    stamped = datetime.fromisoformat(entries["crossvit_tiny_240"].fetched_at)
    assert stamped.utcoffset() is not None and stamped.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert stamped >= before


def test_record_refuses_a_file_outside_the_folder(tmp_path: Path) -> None:
    outside = _touch(tmp_path / "elsewhere" / "w.pth")
    with pytest.raises(ValueError, match="not inside the weights folder"):
        record(tmp_path / "weights", "crossvit_tiny_240", outside, source="local", origin="w.pth")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "is not valid JSON"),
        ("[]", "expected an object"),
        ('{"crossvit_tiny_240": {"file": "x.pth"}}', r"\['crossvit_tiny_240'\]: source must be a str"),
        (
            '{"crossvit_tiny_240": {"file": "x", "source": "s3", "sha256": "0", "size": 1, "fetched_at": "t",'
            ' "origin": "o"}}',
            "source 's3' is not one of hub, official, local",
        ),
    ],
    ids=["syntax", "not-an-object", "missing-fields", "bad-source"],
)
def test_broken_manifest_is_named(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError, match=match) as info:
        find_local("crossvit_tiny_240", tmp_path)
    assert MANIFEST_NAME in str(info.value)


def test_candidate_names() -> None:
    assert candidate_names("crossvit_18_dagger") == (
        "crossvit_18_dagger_240.safetensors",
        "crossvit_18_dagger_240.pth",
        "crossvit_18_dagger_224.pth",  # the IBM release's name
    )


def test_find_local_prefers_the_manifest_entry(tmp_path: Path) -> None:
    _touch(tmp_path / "crossvit_tiny_240.safetensors")
    recorded = _touch(tmp_path / "custom" / "tiny.pth")
    record(tmp_path, "crossvit_tiny_240", recorded, source="local", origin="tiny.pth")
    assert find_local("crossvit_tiny_240", tmp_path) == recorded


@pytest.mark.parametrize("present", ["crossvit_tiny_240.safetensors", "crossvit_tiny_240.pth", "crossvit_tiny_224.pth"])
@pytest.mark.parametrize(
    "asked",
    ["crossvit_tiny_240", "crossvit_tiny", "crossvit_tiny_224", "timm/crossvit_tiny_240.in1k"],
    ids=["timm", "lucid", "official", "hub-id"],
)
def test_find_local_conventional_names_and_aliases(tmp_path: Path, present: str, asked: str) -> None:
    _touch(tmp_path / present)
    assert find_local(asked, tmp_path) == tmp_path / present


def test_find_local_order_and_absence(tmp_path: Path) -> None:
    assert find_local("crossvit_tiny_240", tmp_path) is None
    _touch(tmp_path / "crossvit_tiny_224.pth")
    _touch(tmp_path / "crossvit_tiny_240.safetensors")
    _touch(tmp_path / "crossvit_9_240.safetensors")  # another variant's file is never taken
    assert find_local("crossvit_tiny_240", tmp_path) == tmp_path / "crossvit_tiny_240.safetensors"
    assert find_local("crossvit_base_240", tmp_path) is None


def test_find_local_falls_back_when_the_recorded_file_is_gone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    recorded = _touch(tmp_path / "gone.pth")
    record(tmp_path, "crossvit_tiny_240", recorded, source="local", origin="gone.pth")
    recorded.unlink()
    assert find_local("crossvit_tiny_240", tmp_path) is None
    conventional = _touch(tmp_path / "crossvit_tiny_224.pth")
    with caplog.at_level(logging.WARNING, logger="weights.store"):
        assert find_local("crossvit_tiny_240", tmp_path) == conventional
    assert "gone.pth" in caplog.text


def test_find_local_unknown_variant_lists_the_known(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="crossvit_18_dagger_240"):
        find_local("vit_base", tmp_path)


def test_resolve_path(tmp_path: Path) -> None:
    file = _touch(tmp_path / "any-name.bin")
    assert resolve_path(file, "crossvit_tiny_240") == file  # a file is taken as is, whatever its name
    folder = tmp_path / "folder"
    conventional = _touch(folder / "crossvit_tiny_240.pth")
    assert resolve_path(folder, "crossvit_tiny") == conventional


def test_resolve_path_says_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_path(tmp_path, "crossvit_tiny_240")
    message = str(info.value)
    for name in (MANIFEST_NAME, "crossvit_tiny_240.safetensors", "crossvit_tiny_240.pth", "crossvit_tiny_224.pth"):
        assert name in message
    assert str(tmp_path) in message
    with pytest.raises(WeightsNotFoundError, match="neither a file nor a directory"):
        resolve_path(tmp_path / "missing", "crossvit_tiny_240")


def test_concurrent_records_keep_every_entry(tmp_path: Path) -> None:
    """Eleven fetches finishing at once into one folder (pods sharing a volume): none is lost."""
    names = list_variants()
    files = [_touch(tmp_path / f"{name}.pth", name.encode()) for name in names]
    start = threading.Barrier(len(names))

    def one(i: int) -> None:
        start.wait()
        record(tmp_path, names[i], files[i], source="local", origin=files[i].name)

    for _ in range(3):
        with ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(one, range(len(names))))
        assert sorted(read_manifest(tmp_path)) == sorted(names)
        (tmp_path / MANIFEST_NAME).unlink()


@pytest.mark.parametrize("file", ["../outside.safetensors", "sub/../../x.pth", "/etc/passwd", "", ".", "C:/x.pth",
                                  "..\\x.pth"])
def test_manifest_file_must_stay_inside_the_folder(tmp_path: Path, file: str) -> None:
    """A manifest entry naming ../x or /x would make the server load a file from outside the folder."""
    folder = tmp_path / "weights"
    folder.mkdir()
    _touch(tmp_path / "outside.safetensors")  # exists: a check for existence alone would not catch it
    entry = {"file": file, "source": "local", "sha256": "0" * 64, "size": 1, "fetched_at": "t", "origin": "o"}
    (folder / MANIFEST_NAME).write_text(json.dumps({"crossvit_tiny_240": entry}))
    with pytest.raises(ManifestError, match="must be a relative path inside the weights folder"):
        find_local("crossvit_tiny_240", folder)


def test_a_file_in_a_subfolder_is_allowed(tmp_path: Path) -> None:
    path = _touch(tmp_path / "sub" / "crossvit_tiny_240.safetensors", b"abc")
    record(tmp_path, "crossvit_tiny_240", path, source="local", origin="x")
    assert find_local("crossvit_tiny_240", tmp_path) == path
    assert recorded_sha256(tmp_path, path) == hashlib.sha256(b"abc").hexdigest()
