"""Which weights the service serves: configured, local or fetched, else (if allowed) random.

Runs once at start-up in the front-end process, which never runs the model: it resolves the
file, checks that it fits the variant (on the meta device, no real allocation) and hashes it.
Workers then load that same file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import CrossViT, create_model
from model.checkpoint import CheckpointError, check_checkpoint
from model.variants import get_variant
from weights.resolve import resolve_weights
from weights.store import MANIFEST_NAME

from ..settings import Settings, env_name

__all__ = ["LoadedWeights", "WeightsError", "load_weights"]

logger = logging.getLogger(__name__)

RANDOM_SEED = 0  # every replica must compute the same function, so random weights are seeded


class WeightsError(RuntimeError):
    """No usable weights and random ones are not allowed, or the configured file is unusable."""


@dataclass(frozen=True)
class LoadedWeights:
    path: Path
    sha256: str
    source: str  # configured, local, fetched or random
    pretrained: bool
    parameters: int


def _random_checkpoint(variant: str, scratch: Path) -> Path:
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
    if resolved.path is None:
        if not settings.allow_random_weights:
            raise WeightsError(
                f"no weights for {variant.name} ({resolved.detail}). Set {env_name('weights')} to a checkpoint "
                f"file or directory, run `crossvit-weights fetch {variant.name}`, or set "
                f"{env_name('allow_random_weights')}=true to serve a randomly initialised model"
            )
        path = _random_checkpoint(variant.name, scratch)
        logger.warning(
            "NO PRETRAINED WEIGHTS: serving a RANDOMLY INITIALISED model; its predictions are meaningless",
            extra={"variant": variant.name, "seed": RANDOM_SEED, "reason": resolved.detail},
        )
        source, pretrained = "random", False
    else:
        path, source, pretrained = resolved.path, resolved.how, True
    with torch.device("meta"):
        skeleton = CrossViT(variant.config)
    try:
        sha256 = check_checkpoint(skeleton, path)
    except CheckpointError as exc:
        raise WeightsError(f"the weights for {variant.name} at {path} are unusable: {exc}") from exc
    if resolved.recorded_sha256 is not None and sha256 != resolved.recorded_sha256:
        raise WeightsError(
            f"the weights for {variant.name} at {path} hash to sha256 {sha256}, but the manifest records "
            f"{resolved.recorded_sha256}: the file was replaced or damaged. Fetch it again "
            f"(`crossvit-weights fetch {variant.name}`), or delete its entry in {MANIFEST_NAME} to serve it as it is"
        )
    parameters = sum(p.numel() for p in skeleton.parameters())
    return LoadedWeights(path=Path(path), sha256=sha256, source=source, pretrained=pretrained, parameters=parameters)
