"""Download a published checkpoint into the weights folder, check that it loads, and record it."""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import struct
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import urlsplit

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm import tqdm

from model.checkpoint import CheckpointError, load_checkpoint
from model.variants import OFFICIAL_RELEASE, Variant, create_model, get_variant

from .store import FetchError, record

__all__ = ["CACHE_DIRNAME", "HUB_FILENAME", "OFFLINE_HINT", "FetchError", "fetch", "verify_checkpoint"]

logger = logging.getLogger(__name__)

HUB_FILENAME = "model.safetensors"  # what timm publishes in each timm/<variant>.in1k repo
CACHE_DIRNAME = ".cache"  # huggingface_hub's cache, inside the weights folder so the placed file can hardlink it
OFFLINE_HINT = (
    "to run without network access, mount a checkpoint into the weights folder (CROSSVIT_WEIGHTS_DIR) "
    "or set CROSSVIT_WEIGHTS to a checkpoint file"
)
_CHUNK_BYTES = 1 << 20


def fetch(
    variant: str,
    dest: Path,
    *,
    source: Literal["hub", "official"] = "hub",
    progress: bool = True,
    repo_id: str | None = None,
    official_base_url: str = OFFICIAL_RELEASE,
    timeout_s: float = 60.0,
) -> Path:
    """Download the variant's published checkpoint into `dest`, check that it loads, record it in the manifest.

    Args:
        source: "hub" (timm's safetensors, `dest/<variant>.safetensors`) or "official" (the IBM
            release's `.pth`, `dest/<official_name>.pth`).
        repo_id: another hub repo holding a `model.safetensors` for this variant (default: timm's).
        official_base_url: where the official files live (default: the IBM GitHub release).
        timeout_s: socket timeout of the official download (the hub's are huggingface_hub's own).
    """
    v = get_variant(variant)
    if source not in ("hub", "official"):
        raise ValueError(f"source must be 'hub' or 'official', not {source!r}")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the weights folder {dest}: {exc}") from exc
    try:
        if source == "hub":
            origin = repo_id or v.hub_id
            path, sha256 = _fetch_hub(v, origin, dest, progress=progress)
        else:
            origin = f"{official_base_url.rstrip('/')}/{v.official_name}.pth"
            path, sha256 = _fetch_official(v, origin, dest, progress=progress, timeout_s=timeout_s)
        record(dest, v.name, path, source=source, origin=origin, sha256=sha256)
    except FetchError:
        raise
    except OSError as exc:  # read-only or full weights folder
        raise FetchError(f"cannot write {v.name}'s checkpoint into {dest}: {exc}") from exc
    logger.info("fetched %s from %s to %s (sha256 %s)", v.name, origin, path, sha256)
    return path


def verify_checkpoint(variant: str, path: Path) -> str:
    """Load `path` strictly into a fresh model of the variant; the file's sha256, or CheckpointError."""
    model = create_model(variant)
    try:
        return load_checkpoint(model, path)
    except CheckpointError:
        raise
    except (struct.error, RuntimeError, EOFError, LookupError, TypeError) as exc:  # torch lets a few through
        raise CheckpointError(f"{path.name}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


def _fetch_hub(v: Variant, repo_id: str, dest: Path, *, progress: bool) -> tuple[Path, str]:
    cache = dest / CACHE_DIRNAME
    where = f"{HUB_FILENAME} from the Hugging Face hub repo {repo_id} at {hf_constants.ENDPOINT}"
    # Already fetched once: place it again from the cache, offline too; no pre-flight, no hub round trip.
    cached = try_to_load_from_cache(repo_id, HUB_FILENAME, cache_dir=cache)
    in_cache = isinstance(cached, str)
    logger.info("placing %s from the fetch cache" if in_cache else "downloading %s", where)
    if not in_cache and not hf_constants.HF_HUB_OFFLINE:
        _reachable(hf_constants.ENDPOINT, where)
    try:
        with _hub_progress(progress):
            blob = Path(hf_hub_download(repo_id=repo_id, filename=HUB_FILENAME, cache_dir=cache,
                                        local_files_only=in_cache)).resolve()
    except Exception as exc:  # huggingface_hub raises its own, httpx's and OSError hierarchies
        raise FetchError(f"could not download {where}: {_reason(exc)}; {OFFLINE_HINT}") from exc
    try:
        sha256 = verify_checkpoint(v.name, blob)
    except CheckpointError as exc:
        shutil.rmtree(cache / repo_folder_name(repo_id=repo_id, repo_type="model"), ignore_errors=True)
        raise FetchError(f"{where} does not load as {v.name}, so it was deleted: {exc}") from exc
    target = dest / f"{v.name}.safetensors"
    _place(blob, target)
    return target, sha256


def _reachable(endpoint: str, where: str, timeout_s: float = 5.0) -> None:
    """Fail at once when the endpoint's host does not resolve or accept connections.

    huggingface_hub retries such errors with backoff for about 25 s; offline, that only delays
    the server's fallback. A reachable host is left to huggingface_hub's own handling, and so is
    every host reached through a proxy (HTTPS_PROXY and friends), which may be the only way out.
    """
    url = urlsplit(endpoint)
    proxies = urllib.request.getproxies().keys() & {url.scheme, "all"}  # ALL_PROXY counts too
    if proxies and not urllib.request.proxy_bypass(url.hostname or ""):
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise FetchError(f"could not download {where}: {url.hostname}:{port} is unreachable ({exc}); "
                         f"{OFFLINE_HINT}") from exc


def _place(src: Path, target: Path) -> None:
    """Put a cached file at `target`: a hardlink (no extra space), else a copy; never a symlink into the cache."""
    # A unique name, not the pid: pods sharing a volume all run their init container as pid 1.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, target)  # atomic: a reader sees the old file or the new one, never a part
    finally:
        tmp.unlink(missing_ok=True)


def _fetch_official(v: Variant, url: str, dest: Path, *, progress: bool, timeout_s: float) -> tuple[Path, str]:
    target = dest / f"{v.official_name}.pth"
    logger.info("downloading %s", url)
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)  # mkstemp's 0600 would hide it from a server running as another user
            _download(url, out, progress=progress, timeout_s=timeout_s, desc=target.name)
        try:
            sha256 = verify_checkpoint(v.name, tmp)
        except CheckpointError as exc:
            raise FetchError(f"{url} does not load as {v.name}, so it was deleted: {exc}") from exc
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, sha256


def _download(url: str, out: BinaryIO, *, progress: bool, timeout_s: float, desc: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "crossvit-weights"})
    received, total = 0, None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress)
            with bar:
                while chunk := response.read(_CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        exc.close()  # an HTTPError holds the open response
        raise FetchError(f"GET {url} answered HTTP {exc.code} {exc.reason}; {OFFLINE_HINT}") from exc
    except urllib.error.URLError as exc:
        raise FetchError(f"could not reach {url}: {exc.reason}; {OFFLINE_HINT}") from exc
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets and short reads mid-body, disk full
        raise FetchError(f"download of {url} failed after {received} bytes: {_reason(exc)}; {OFFLINE_HINT}") from exc
    if total is not None and received != total:
        raise FetchError(f"download of {url} ended after {received} of {total} bytes; {OFFLINE_HINT}")


@contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    """huggingface_hub's bars are switched off process-wide; switch them back on afterwards."""
    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _reason(exc: BaseException) -> str:
    """The exception and its causes, one clause each, e.g. 'LocalEntryNotFoundError: ... <- ConnectError: ...'."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        text = " ".join(str(current).split())
        part = f"{type(current).__name__}: {text[:300]}" if text else type(current).__name__
        if part not in parts:
            parts.append(part)
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)
