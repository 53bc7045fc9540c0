"""The local weights folder: which checkpoint belongs to which variant, recorded in `manifest.json`."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal, get_args

try:
    import fcntl
except ImportError:  # not POSIX: recording is then only safe from one process at a time
    fcntl = None  # type: ignore[assignment]

from model.digest import file_sha256
from model.variants import get_variant

__all__ = [
    "MANIFEST_NAME",
    "FetchError",
    "ManifestEntry",
    "ManifestError",
    "Source",
    "WeightsNotFoundError",
    "candidate_names",
    "find_local",
    "read_manifest",
    "record",
    "recorded_sha256",
    "resolve_path",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
Source = Literal["hub", "official", "local"]


class FetchError(OSError):
    """A checkpoint could not be downloaded, written or loaded; the message says what was tried and why."""



class ManifestError(ValueError):
    """`manifest.json` is unreadable or an entry lacks a field; the message names the file and entry."""


class WeightsNotFoundError(FileNotFoundError):
    """No checkpoint where one was configured or looked for; the message lists what was tried."""


@dataclass(frozen=True)
class ManifestEntry:
    """Where one variant's checkpoint came from and what it must hash to."""

    file: str  # relative to the weights folder
    source: Source
    sha256: str
    size: int  # bytes
    fetched_at: str  # ISO-8601, UTC
    origin: str  # hub repo id, release URL, or the file a local checkpoint was recorded from

    @classmethod
    def from_dict(cls, data: object, where: str) -> ManifestEntry:
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: expected an object, found {type(data).__name__}")
        fields = {"file": str, "source": str, "sha256": str, "size": int, "fetched_at": str, "origin": str}
        if problems := [f"{k} must be a {t.__name__}" for k, t in fields.items() if not isinstance(data.get(k), t)]:
            raise ManifestError(f"{where}: " + "; ".join(problems))
        if data["source"] not in get_args(Source):
            raise ManifestError(f"{where}: source {data['source']!r} is not one of {', '.join(get_args(Source))}")
        if not _inside(data["file"]):
            raise ManifestError(f"{where}: file {data['file']!r} must be a relative path inside the weights folder")
        return cls(**{k: data[k] for k in fields})

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _inside(file: str) -> bool:
    """A manifest `file` names a file in the folder: relative, no `..`, no drive, no backslash tricks."""
    path = PurePosixPath(file)
    return (bool(file) and "\\" not in file and not path.is_absolute() and ".." not in path.parts
            and not PureWindowsPath(file).drive and path != PurePosixPath("."))


def _manifest_path(weights_dir: Path) -> Path:
    return weights_dir / MANIFEST_NAME


def read_manifest(weights_dir: Path) -> dict[str, ManifestEntry]:
    """Entries by canonical variant name; an absent manifest is an empty one."""
    path = _manifest_path(weights_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); fix it or delete it and fetch again") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected an object mapping variant names to entries")
    return {str(name): ManifestEntry.from_dict(entry, f"{path} [{name!r}]") for name, entry in data.items()}


def candidate_names(variant: str) -> tuple[str, ...]:
    """File names a variant's checkpoint goes by when the manifest does not name it."""
    v = get_variant(variant)
    return (f"{v.name}.safetensors", f"{v.name}.pth", f"{v.official_name}.pth")


def find_local(variant: str, weights_dir: Path) -> Path | None:
    """The variant's checkpoint in `weights_dir`: the manifest's file first, then the conventional names."""
    name = get_variant(variant).name  # aliases resolve; unknown names raise with the known list
    entry = read_manifest(weights_dir).get(name)
    if entry is not None:
        path = weights_dir / entry.file
        if path.is_file():
            return path
        logger.warning("manifest entry for %s names %s, which is missing; looking for other files", name, path)
    return next((p for p in (weights_dir / n for n in candidate_names(name)) if p.is_file()), None)


def recorded_sha256(weights_dir: Path, path: Path) -> str | None:
    """The sha256 the manifest of `weights_dir` records for `path`, or None when no entry names that file.

    The server checks a file against it at start-up: a manifest entry is a promise about the bytes.
    """
    target = path.resolve()
    for entry in read_manifest(weights_dir).values():
        if (weights_dir / entry.file).resolve() == target:
            return entry.sha256
    return None


def resolve_path(path: Path, variant: str) -> Path:
    """A checkpoint file as is, or the variant's checkpoint inside a directory."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise WeightsNotFoundError(f"weights path {str(path)!r} is neither a file nor a directory")
    found = find_local(variant, path)
    if found is None:
        looked_for = [MANIFEST_NAME + " entry", *candidate_names(variant)]
        raise WeightsNotFoundError(
            f"no checkpoint for {get_variant(variant).name} in {path}: looked for {', '.join(looked_for)}"
        )
    return found


def record(
    weights_dir: Path,
    variant: str,
    path: Path,
    *,
    source: Source,
    origin: str,
    sha256: str | None = None,
    fetched_at: datetime | None = None,
) -> ManifestEntry:
    """Add or replace the variant's entry; the manifest is replaced atomically (temp file + os.replace)."""
    name = get_variant(variant).name
    try:
        relative = path.resolve().relative_to(weights_dir.resolve())
    except ValueError:
        raise ValueError(f"{path} is not inside the weights folder {weights_dir}") from None
    entry = ManifestEntry(
        file=relative.as_posix(),
        source=source,
        sha256=sha256 or file_sha256(path),
        size=path.stat().st_size,
        fetched_at=(fetched_at or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="seconds"),
        origin=origin,
    )
    with _exclusive(weights_dir):  # read-modify-write: two fetches into one folder must not lose an entry
        entries = read_manifest(weights_dir)
        entries[name] = entry
        text = json.dumps({k: e.to_dict() for k, e in sorted(entries.items())}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=weights_dir, prefix=f".{MANIFEST_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide it from a server running as another user
                f.write(text)
            os.replace(tmp, _manifest_path(weights_dir))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return entry


@contextmanager
def _exclusive(weights_dir: Path) -> Iterator[None]:
    """An advisory lock on the weights folder, across processes (pods sharing a volume) and threads."""
    fd = None
    try:
        if fcntl is not None:
            fd = os.open(weights_dir, os.O_RDONLY)  # the folder itself: no lock file left behind
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:  # e.g. NFS, which emulates flock with byte-range locks a directory cannot take
        logger.warning("cannot lock the weights folder; recording without a lock", extra={"reason": str(exc)})
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
