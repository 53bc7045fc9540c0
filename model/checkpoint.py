"""Strict, code-free checkpoint loading for timm (safetensors / .bin) and official IBM (.pth) files."""

from __future__ import annotations

import pickle
import re
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .digest import file_sha256

__all__ = ["CheckpointError", "check_checkpoint", "file_sha256", "load_checkpoint", "read_state_dict"]

# Official release: ParameterList tokens `pos_embed.0`; timm: attributes `pos_embed_0` (timm's
# pretrained_filter_fn does the same `.` -> `_` mapping).
_OFFICIAL_TOKEN_KEY = re.compile(r"^(pos_embed|cls_token)\.(\d+)$")
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, or does not fit the model; the message says which."""




def _is_safetensors(path: Path) -> bool:
    # 8-byte little-endian header length, then a JSON object
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_raw(path: Path) -> Any:
    if _is_safetensors(path):
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: unreadable safetensors file ({exc})") from exc
    try:
        with warnings.catch_warnings():
            # legacy (non-zip) files warn about their pickle protocol; they load the same
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # weights_only: tensors and plain containers only; a pickle that names any other
            # callable is refused before anything runs.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(str(exc))
        if "Unsupported global" in reason:
            raise CheckpointError(
                f"{path.name}: refused, its pickle would construct or call objects other than tensors "
                f"({reason}); only plain tensor checkpoints are loaded"
            ) from exc
        raise CheckpointError(f"{path.name}: not a readable checkpoint ({reason})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path.name}: not a readable checkpoint ({exc})") from exc


def _unpickler_reason(message: str) -> str:
    """torch's own text advises weights_only=False; keep only the unpickler's verdict."""
    _, found, rest = message.partition("WeightsUnpickler error:")
    reason = rest.strip().split(". Please use", 1)[0] if found else message
    return " ".join(reason.split())[:300]


def _unwrap(raw: Any, name: str) -> dict[str, Tensor]:
    """Peel training-checkpoint wrappers ({"model": ...}, {"state_dict": ...}) and DDP's `module.`."""
    state = raw
    while isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{name}: holds no state_dict (found {type(raw).__name__})")
    if not_tensors := sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor)):
        raise CheckpointError(f"{name}: entries that are not tensors: {not_tensors}")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k).removeprefix("module."): v for k, v in state.items()}
    return {_OFFICIAL_TOKEN_KEY.sub(r"\1_\2", str(k)): v for k, v in state.items()}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file into timm's key layout, on CPU, without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    return _unwrap(_read_raw(path), path.name)


def _check_fit(model: nn.Module, state: Mapping[str, Tensor], name: str) -> None:
    expected = model.state_dict()
    problems = sorted(
        [f"missing {k}" for k in expected.keys() - state.keys()]
        + [f"unexpected {k}" for k in state.keys() - expected.keys()]
        + [
            f"{k}: shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            for k, v in state.items()
            if k in expected and v.shape != expected[k].shape
        ]
    )
    if problems:
        raise CheckpointError(f"{name} does not fit this model: " + "; ".join(problems))
    if bad := sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()):
        raise CheckpointError(f"{name}: non-finite values in {bad}")


def load_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Load a checkpoint strictly into `model` and return the file's sha256.

    Accepts safetensors and `.pth`/`.bin` (through `torch.load(weights_only=True)` only), in
    timm's or the official layout. Every missing, unexpected or mis-shaped key is reported in
    one `CheckpointError`, and the model is left untouched.
    """
    path = Path(path)
    state = read_state_dict(path)
    _check_fit(model, state, path.name)
    model.load_state_dict(state, strict=True)
    return file_sha256(path)


def check_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Everything `load_checkpoint` checks, without loading: `model` may live on the meta device.

    Lets a process that never runs the model (the service's front end) refuse a bad file early.
    """
    path = Path(path)
    _check_fit(model, read_state_dict(path), path.name)
    return file_sha256(path)
