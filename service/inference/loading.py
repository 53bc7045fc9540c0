"""Which weights the service serves: configured, local or fetched, else (if allowed) random.

Runs once at start-up in the front-end process, which never runs the model: it resolves the
file, checks that it fits the variant (on the meta device, no real allocation) and hashes it.
Workers then load that same file, or the OpenVINO model prepared from it.

Without torch (the lean CPU install) nothing is loaded or checked here: a checkpoint is only
hashed, to find the model prepared from it, and with no checkpoint at hand the variant's prepared
model in the cache is served as it is (`--prepare-only` checked its weights when it made it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from model.digest import file_sha256
from model.variants import get_variant
from weights.resolve import resolve_weights
from weights.store import MANIFEST_NAME

from ..settings import Settings, env_name
from ..worker.backends import cache_key, is_complete, torch_available
from ..worker.backends.prepared import PREPARE_HINT, find_prepared, read_meta

__all__ = ["LoadedWeights", "WeightsError", "load_weights", "model_cache_dir"]

logger = logging.getLogger(__name__)

RANDOM_SEED = 0  # every replica must compute the same function, so random weights are seeded
RANDOM_WARNING = "NO PRETRAINED WEIGHTS: serving a RANDOMLY INITIALISED model; its predictions are meaningless"


class WeightsError(RuntimeError):
    """No usable weights and random ones are not allowed, or the configured file is unusable."""


@dataclass(frozen=True)
class LoadedWeights:
    path: Path | None  # None: no checkpoint at hand, the prepared OpenVINO model is served
    sha256: str
    source: str  # configured, local, fetched or random
    pretrained: bool
    parameters: int
    file: str  # what /v1/models names: the checkpoint's file name, or the prepared model's folder

    @classmethod
    def prepared(cls, folder: Path) -> LoadedWeights:
        meta = read_meta(folder)
        return cls(None, meta.sha256, meta.source, meta.pretrained, meta.parameters, folder.name)


def model_cache_dir(settings: Settings) -> Path:
    """Prepared models: CROSSVIT_CACHE_DIR, else a hidden folder beside the weights."""
    return settings.cache_dir if settings.cache_dir is not None else settings.weights_dir / ".cache" / "models"


def _random_checkpoint(variant: str, scratch: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from model import create_model

    torch.manual_seed(RANDOM_SEED)
    model = create_model(variant)
    path = scratch / f"{variant}-random-seed{RANDOM_SEED}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def load_weights(settings: Settings, scratch: Path) -> LoadedWeights:
    """Resolve and verify the weights to serve; `scratch` holds a random checkpoint if one is made."""
    variant = get_variant(settings.model)
    try:
        resolved = resolve_weights(
            variant.name, weights=settings.weights, weights_dir=settings.weights_dir,
            fetch=settings.fetch_weights, source=settings.weights_source,
        )
    except (OSError, ValueError) as exc:  # a configured path that does not exist, say
        raise WeightsError(f"{env_name('weights')}={settings.weights!r}: {exc}") from exc
    logger.info("weights resolved", extra={"how": resolved.how, "path": str(resolved.path), "detail": resolved.detail})
    if not torch_available():
        return _lean(settings, variant.name, resolved.path, resolved.recorded_sha256, resolved.detail)
    if resolved.path is None:
        if not settings.allow_random_weights:
            raise WeightsError(
                f"no weights for {variant.name} ({resolved.detail}). Set {env_name('weights')} to a checkpoint "
                f"file or directory, run `crossvit-weights fetch {variant.name}`, or set "
                f"{env_name('allow_random_weights')}=true to serve a randomly initialised model"
            )
        path = _random_checkpoint(variant.name, scratch)
        logger.warning(RANDOM_WARNING, extra={"variant": variant.name, "seed": RANDOM_SEED, "reason": resolved.detail})
        source, pretrained = "random", False
    else:
        path, source, pretrained = resolved.path, resolved.how, True
    import torch

    from model import CrossViT
    from model.checkpoint import CheckpointError, check_checkpoint

    with torch.device("meta"):
        skeleton = CrossViT(variant.config)
    try:
        sha256 = check_checkpoint(skeleton, path)
    except CheckpointError as exc:
        raise WeightsError(f"the weights for {variant.name} at {path} are unusable: {exc}") from exc
    _check_recorded(variant.name, Path(path), sha256, resolved.recorded_sha256)
    parameters = sum(p.numel() for p in skeleton.parameters())
    return LoadedWeights(Path(path), sha256, source, pretrained, parameters, Path(path).name)


def _check_recorded(variant: str, path: Path, sha256: str, recorded: str | None) -> None:
    if recorded is not None and sha256 != recorded:
        raise WeightsError(
            f"the weights for {variant} at {path} hash to sha256 {sha256}, but the manifest records "
            f"{recorded}: the file was replaced or damaged. Fetch it again "
            f"(`crossvit-weights fetch {variant}`), or delete its entry in {MANIFEST_NAME} to serve it as it is"
        )


def _lean(settings: Settings, variant: str, path: Path | None, recorded: str | None, detail: str) -> LoadedWeights:
    """No torch here: serve the OpenVINO model prepared from the checkpoint, or the variant's prepared model."""
    cache_dir = model_cache_dir(settings)
    if path is not None:
        sha256 = file_sha256(path)
        _check_recorded(variant, path, sha256, recorded)
        folder = cache_dir / cache_key(variant, sha256)
        if not is_complete(folder):
            raise WeightsError(f"no prepared OpenVINO model for {path.name} (sha256 {sha256[:16]}...) in {cache_dir}, "
                               f"and torch, which prepares one, is not installed: {PREPARE_HINT}")
        meta = read_meta(folder)
        return LoadedWeights(path, sha256, meta.source, meta.pretrained, meta.parameters, path.name)
    found = find_prepared(cache_dir, variant, allow_random=settings.allow_random_weights)
    if found is None:
        allow = env_name("allow_random_weights")
        random = "" if settings.allow_random_weights else f" (a random-init one only with {allow}=true)"
        raise WeightsError(f"no weights for {variant} ({detail}) and no prepared OpenVINO model of it in {cache_dir}"
                           f"{random}: {PREPARE_HINT}")
    folder, meta = found
    logger.info("serving a prepared model; no checkpoint at hand", extra={"prepared": folder.name,
                                                                          "source": meta.source})
    if not meta.pretrained:
        logger.warning(RANDOM_WARNING, extra={"variant": variant, "prepared": folder.name})
    return LoadedWeights.prepared(folder)
