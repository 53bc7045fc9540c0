"""A prepared OpenVINO model: one folder the CPU server serves without torch.

`crossvit-serve --prepare-only` (or a worker that finds none, where torch is installed) converts the
checkpoint once and writes, into the model cache (`CROSSVIT_CACHE_DIR`), a folder named by what
determines its contents (variant, checkpoint sha256, OpenVINO version, this format):

    model.xml, model.bin   the graph from the branch-0 input to both branches' CLS features (fp32)
    heads.npz              both classifier heads (w0, b0, w1, b1), run in numpy fp32 after the graph
    probe.npz              the probe batch and PyTorch fp32's logits for it (base.Probe): the yardstick
                           every mode is checked against, so a worker without torch still guards bf16
    golden.npz             PyTorch fp32's answers for the golden images through the real preprocessing,
                           with the class names of the label list used (service/golden): the self-test's record
    prepared.json          variant, checkpoint sha256, where the weights came from, parameter count

The heads stay outside the graph: a bf16 compile hint would round every logit to 8 significant bits.
A folder appears complete or not at all (written aside, then renamed), so a reader needs no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...golden import GoldenRecord
from .base import Probe

__all__ = [
    "NOT_CACHED",
    "PREPARED_FORMAT",
    "QUANTIZED_NOT_CACHED",
    "NotPreparedError",
    "PreparedMeta",
    "cache_key",
    "find_prepared",
    "is_complete",
    "load_golden",
    "load_heads",
    "locked",
    "load_probe",
    "openvino_version",
    "publish",
    "read_meta",
    "temporary",
    "write_arrays",
]

logger = logging.getLogger(__name__)

PREPARED_FORMAT = 4  # bump when what preparation writes changes
NOT_CACHED = "prepared, not cached"  # a temporary folder (no usable cache): its reader removes it
QUANTIZED_NOT_CACHED = "quantized, not cached"  # likewise, an INT8 folder (openvino_quantize.py)
FILES = ("model.xml", "model.bin", "heads.npz", "probe.npz", "golden.npz", "prepared.json")
PREPARE_HINT = (
    "run `crossvit-serve --prepare-only` with the same CROSSVIT_MODEL, weights and CROSSVIT_CACHE_DIR where "
    "torch is installed (pip install 'crossvit-serve[torch]', or the image's cpu-full target), then start again"
)


class NotPreparedError(RuntimeError):
    """No prepared model for these weights, and no torch here to prepare one."""


@dataclass(frozen=True)
class PreparedMeta:
    variant: str
    sha256: str  # of the checkpoint it was converted from
    source: str  # where those weights came from: configured, local, fetched, random
    pretrained: bool
    parameters: int
    openvino: str
    format: int = PREPARED_FORMAT


def openvino_version() -> str:
    """The installed OpenVINO's release ("2026.4.1"), read without importing it (a second of start-up)."""
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(variant: str, sha256: str) -> str:
    version = re.sub(r"[^\w.-]", "_", openvino_version())
    return f"{variant}-{sha256[:16]}-ov{version}-p{PREPARED_FORMAT}"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes, on the file `path` (made if missing)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def publish(target: Path, complete: Callable[[Path], bool], write: Callable[[Path], None]) -> bool:
    """Make the folder `target` with `write`, once between processes: under its lock, unless `complete(target)`
    already (another process made it while this one waited: False). What a killed writer left (its scratch
    folder, a partial target) is nobody's under the lock and goes first; the folder appears by an atomic
    rename, so a reader sees all of it or nothing."""
    with locked(target.parent / f"{target.name}.lock"):
        if complete(target):
            return False
        for stale in [*target.parent.glob(f".{target.name}-*"), target]:
            shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            write(scratch)
            scratch.chmod(0o755)  # mkdtemp's 0700 would hide a folder written by root from the server's user
            os.replace(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return True


def temporary(prefix: str, write: Callable[[Path], None]) -> Path:
    """A temporary folder made with `write`, where no cache can be used: its reader removes it."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        write(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def read_meta(folder: Path) -> PreparedMeta:
    return PreparedMeta(**json.loads((folder / "prepared.json").read_text()))


def find_prepared(cache_dir: Path, variant: str, *, allow_random: bool) -> tuple[Path, PreparedMeta] | None:
    """The prepared model of `variant` to serve when no checkpoint is at hand: a pretrained one
    (the most recently prepared, should there be several), else a random-init one if allowed."""
    candidates: list[tuple[bool, float, Path, PreparedMeta]] = []
    try:
        folders = [f for f in cache_dir.iterdir() if f.is_dir() and not f.name.startswith(".")]
    except OSError:
        return None
    for folder in folders:
        if not is_complete(folder):
            continue
        try:
            meta = read_meta(folder)
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("ignoring an unreadable prepared model", extra={"folder": folder.name, "error": str(exc)})
            continue
        if meta.variant != variant or folder.name != cache_key(variant, meta.sha256):
            continue  # another variant, OpenVINO release or format
        if meta.pretrained or allow_random:
            candidates.append((meta.pretrained, (folder / "prepared.json").stat().st_mtime, folder, meta))
    if not candidates:
        return None
    _, _, folder, meta = max(candidates, key=lambda c: (c[0], c[1]))
    return folder, meta


def load_heads(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W0, b0), (W1, b1)]: logits = features @ W.T + b, per branch."""
    with np.load(folder / "heads.npz") as arrays:
        return [(arrays[f"w{i}"].astype(np.float32), arrays[f"b{i}"].astype(np.float32)) for i in range(2)]


def load_golden(folder: Path) -> GoldenRecord:
    return GoldenRecord.load(folder / "golden.npz")


def load_probe(folder: Path) -> Probe:
    with np.load(folder / "probe.npz") as arrays:
        return Probe(arrays["x"].astype(np.float32), arrays["reference"].astype(np.float32))


def write_arrays(
    folder: Path, heads: list[tuple[np.ndarray, np.ndarray]], probe: Probe, golden: GoldenRecord, meta: PreparedMeta
) -> None:
    """Everything but the graph, which OpenVINO itself saves beside it."""
    (w0, b0), (w1, b1) = heads
    np.savez(folder / "heads.npz", w0=w0, b0=b0, w1=w1, b1=b1)
    np.savez(folder / "probe.npz", x=probe.x, reference=probe.reference)
    golden.save(folder / "golden.npz")
    (folder / "prepared.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")
