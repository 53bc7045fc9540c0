"""Which checkpoint the server starts with: configured, found locally, fetched, or none."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from model.variants import get_variant

from .store import (
    MANIFEST_NAME,
    FetchError,
    ManifestError,
    WeightsNotFoundError,
    find_local,
    read_manifest,
    recorded_sha256,
    resolve_path,
)

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_SUFFIXES", "Resolved", "hub_repo_id", "resolve_weights"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# owner/name, optionally timm's "hf-hub:" prefix; a leading "/", "./" or "~" makes it a path
_HUB_ID = re.compile(r"^(?:hf-hub:)?([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)$")


@dataclass(frozen=True)
class Resolved:
    """The outcome of start-up weight resolution; `detail` is one sentence for the log."""

    path: Path | None
    how: Literal["configured", "local", "fetched", "none"]
    detail: str
    recorded_sha256: str | None = None  # what the folder's manifest records for `path`: it must still hash to it


def hub_repo_id(weights: str) -> str | None:
    """The hub repo a CROSSVIT_WEIGHTS value names ("timm/crossvit_9_dagger_240.in1k"), or None for a path."""
    match = _HUB_ID.match(weights)
    if match is None or weights.lower().endswith(CHECKPOINT_SUFFIXES):
        return None
    return match.group(1)


def resolve_weights(
    variant: str,
    *,
    weights: str | None,
    weights_dir: Path,
    fetch: bool,
    source: str,
) -> Resolved:
    """Find the checkpoint to serve.

    `weights` set: an existing file or directory is used; a hub id is fetched into `weights_dir`
    (or taken from there when an earlier fetch recorded it); anything else raises
    `WeightsNotFoundError`, and a configured hub repo that cannot be fetched raises `FetchError`:
    configured weights never silently fall back. Not set: the variant's checkpoint in
    `weights_dir`, else a fetch when allowed; a failed fetch gives how="none" with the reason.
    """
    name = get_variant(variant).name
    if source not in ("hub", "official"):
        raise ValueError(f"weights source must be 'hub' or 'official', not {source!r}")
    checked: Literal["hub", "official"] = "hub" if source == "hub" else "official"
    if weights is not None:
        return _configured(name, weights, weights_dir, fetch=fetch)
    if (local := find_local(name, weights_dir)) is not None:
        return Resolved(local, "local", f"found {local} for {name} in {weights_dir}",
                        recorded_sha256(weights_dir, local))
    if not fetch:
        return Resolved(None, "none", f"no checkpoint for {name} in {weights_dir} and fetching is disabled")
    try:
        path = fetch_checkpoint(name, weights_dir, source=checked, progress=False)
    except FetchError as exc:
        return Resolved(None, "none", f"no checkpoint for {name} in {weights_dir}; fetch failed: {exc}")
    return Resolved(path, "fetched", f"fetched {name} from the {source} source to {path}",
                    recorded_sha256(weights_dir, path))


def _configured(name: str, weights: str, weights_dir: Path, *, fetch: bool) -> Resolved:
    path = Path(weights).expanduser()
    if path.exists():
        found = resolve_path(path, name)
        folder = path if path.is_dir() else found.parent  # a file is checked against a manifest beside it
        return Resolved(found, "configured", f"CROSSVIT_WEIGHTS={weights} gives {found}",
                        _recorded_beside(folder, found))
    repo_id = hub_repo_id(weights)
    if repo_id is None:
        raise WeightsNotFoundError(
            f"weights {weights!r} do not exist; CROSSVIT_WEIGHTS takes a checkpoint file, a directory "
            f"holding one, or a hub repo id such as {get_variant(name).hub_id}"
        )
    entry = read_manifest(weights_dir).get(name)
    if entry is not None and entry.source == "hub" and entry.origin == repo_id and (weights_dir / entry.file).is_file():
        local = weights_dir / entry.file
        return Resolved(local, "local", f"CROSSVIT_WEIGHTS={weights}: using {local}, fetched earlier from {repo_id}",
                        entry.sha256)
    if not fetch:
        raise FetchError(
            f"weights {weights!r} name hub repo {repo_id}, which is not in {weights_dir}, "
            "and fetching is disabled (CROSSVIT_FETCH_WEIGHTS=false)"
        )
    path = fetch_checkpoint(name, weights_dir, source="hub", repo_id=repo_id, progress=False)
    return Resolved(path, "fetched", f"CROSSVIT_WEIGHTS={weights}: fetched {repo_id} to {path}",
                    recorded_sha256(weights_dir, path))


def fetch_checkpoint(name: str, weights_dir: Path, **options: Any) -> Path:
    """`weights.fetch.fetch`, imported here: fetching verifies with torch, which the lean server lacks."""
    try:
        from .fetch import fetch
    except ImportError as exc:
        raise FetchError(f"fetching weights needs the torch extra (pip install 'crossvit-serve[torch]'): {exc}") \
            from exc
    return fetch(name, weights_dir, **options)


def _recorded_beside(folder: Path, path: Path) -> str | None:
    """The sha256 a manifest.json beside a configured file records; one that is not ours (unreadable
    as a manifest: another tool's file of the same name) records nothing, with a warning."""
    try:
        return recorded_sha256(folder, path)
    except ManifestError as exc:
        logger.warning("manifest beside the configured weights not read; their sha256 is not checked against it",
                       extra={"manifest": str(folder / MANIFEST_NAME), "reason": str(exc)})
        return None
