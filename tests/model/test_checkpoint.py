"""load_checkpoint: formats, wrappers, strict key checks reported at once, and no pickled code."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from model import CrossViT, CrossViTConfig, load_checkpoint
from model.checkpoint import CheckpointError

TINY = CrossViTConfig(
    img_size=(48, 32), patch_size=(12, 16), embed_dim=(16, 32), depth=((1, 2, 0),) * 2, num_heads=(2, 2),
    mlp_ratio=(2.0, 2.0, 1.0), qkv_bias=True, num_classes=10, layer_norm_eps=1e-6,
)


def _state(seed: int = 0) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in CrossViT(TINY).state_dict().items()}


def _assert_loaded(model: CrossViT, state: dict[str, Tensor]) -> None:
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_safetensors_loads_and_returns_sha256(tmp_path: Path) -> None:
    state = _state(1)
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    model = CrossViT(TINY)
    assert load_checkpoint(model, path) == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_loaded(model, state)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"model": s, "epoch": 3},
        lambda s: {"state_dict": s, "optimizer": {"lr": 1.0}},
        lambda s: {"module." + k: v for k, v in s.items()},
        lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}},
    ],
    ids=["raw", "model", "state_dict", "module-prefix", "state_dict+module"],
)
def test_pth_wrappers_are_unwrapped(tmp_path: Path, wrap: object) -> None:
    state = _state(2)
    path = tmp_path / "w.pth"
    torch.save(wrap(state), path)  # type: ignore[operator]
    model = CrossViT(TINY)
    load_checkpoint(model, path)
    _assert_loaded(model, state)


def test_official_token_layout_is_mapped(tmp_path: Path) -> None:
    state = _state(3)
    official = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
                for k, v in state.items()}
    assert "pos_embed.1" in official
    path = tmp_path / "official.pth"
    torch.save(official, path)
    model = CrossViT(TINY)
    load_checkpoint(model, path)
    _assert_loaded(model, state)


def test_missing_key_is_named(tmp_path: Path) -> None:
    state = _state()
    del state["blocks.1.fusion.0.attn.wk.weight"]
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"missing blocks\.1\.fusion\.0\.attn\.wk\.weight"):
        load_checkpoint(CrossViT(TINY), path)


def test_all_problems_reported_at_once_and_model_untouched(tmp_path: Path) -> None:
    state = _state()
    del state["head.0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["norm.1.weight"] = torch.zeros(7)
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    model = CrossViT(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, path)
    message = str(err.value)
    assert "missing head.0.bias" in message
    assert "unexpected extra.weight" in message
    assert "norm.1.weight: shape (7,), expected (32,)" in message
    _assert_loaded(model, before)


def test_non_finite_values_are_refused(tmp_path: Path) -> None:
    state = _state()
    state["head.1.weight"][0, 0] = float("nan")
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"non-finite values in \['head.1.weight'\]"):
        load_checkpoint(CrossViT(TINY), path)


class _Payload:
    """Unpickling this would call the marker writer: the attack weights_only must stop."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.write_text, (self.marker, "pwned"))  # type: ignore[return-value]


@pytest.mark.parametrize("layout", ["zip", "legacy", "bare-pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path: Path, layout: str) -> None:
    marker = tmp_path / "marker.txt"
    payload = {"model": _state(), "hook": _Payload(marker)}
    path = tmp_path / "evil.pth"
    if layout == "bare-pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=layout == "zip")
    # Unpickling the file normally would run the payload (proves the test can fail):
    with open(tmp_path / "probe.pkl", "wb") as f:
        pickle.dump(_Payload(tmp_path / "probe.txt"), f)
    pickle.loads((tmp_path / "probe.pkl").read_bytes())
    assert (tmp_path / "probe.txt").exists()

    # a bare pickle is not even a torch file; either way nothing in it runs
    with pytest.raises(CheckpointError, match="not a readable" if layout == "bare-pickle" else "refused"):
        load_checkpoint(CrossViT(TINY), path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "not a readable checkpoint"), (b"\x00garbage" * 10, "not a readable checkpoint"),
     (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "unreadable safetensors")],
    ids=["empty", "garbage", "broken-safetensors"],
)
def test_unreadable_files_raise_checkpoint_error(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=fragment):
        load_checkpoint(CrossViT(TINY), path)


def test_missing_file_and_non_tensor_entries(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(CrossViT(TINY), tmp_path / "nope.safetensors")
    state: dict[str, object] = dict(_state())
    state["note"] = "hello"
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"not tensors: \['note'\]"):
        load_checkpoint(CrossViT(TINY), tmp_path / "w.pth")
