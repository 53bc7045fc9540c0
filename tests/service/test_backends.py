"""The inference backends against timm and PyTorch fp32: numerics, modes, the prepared models, selection.

OpenVINO models are prepared from our `CrossViT` through the real preparation and cache code.
"""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from model import CrossViT, create_model, list_variants
from service.settings import Settings
from service.worker.backends import Built, build_openvino, cache_key, resolve_backend
from service.worker.backends.openvino_prepare import prepare_openvino
from service.worker.backends.openvino_runtime import modes_for
from service.worker.backends.prepared import NOT_CACHED, PREPARED_FORMAT
from service.worker.backends.pytorch_runtime import build_torch, reference_probe
from weights.labels import imagenet_labels

VARIANT = "crossvit_tiny_240"


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def _timm_and_ours(variant: str) -> tuple[torch.nn.Module, CrossViT]:
    torch.manual_seed(0)
    oracle = timm.create_model(variant, pretrained=False).eval()
    ours = create_model(variant)
    ours.load_state_dict(oracle.state_dict())
    return oracle, ours


def _openvino(
    model: CrossViT, precision: str, cache_dir: Path | None = None, threads: tuple[int, ...] = (1,),
    variant: str = VARIANT,
) -> tuple[Built, dict[str, Any]]:
    folder, source = prepare_openvino(model, cache_dir, variant=variant, sha256="0" * 64, source="random",
                                      pretrained=False, labels=imagenet_labels())
    try:
        built, info = build_openvino(folder, precision=precision, threads=threads)
    finally:
        if source == NOT_CACHED:  # as a worker does: the temporary folder goes once the model is read
            shutil.rmtree(folder)
    return built, {**info, "model_source": source}


def _run(built: Built, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
    """The backend on a torch batch (backends take and give numpy), as a torch tensor for the comparisons."""
    return torch.from_numpy(built.backend(x.numpy(), threads).copy())


@pytest.mark.slow
@pytest.mark.parametrize("variant", list_variants())
def test_openvino_fp32_equals_timm(variant: str) -> None:
    oracle, ours = _timm_and_ours(variant)
    built, _ = _openvino(ours, "fp32", variant=variant)
    size = ours.config.img_size[0]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected_mean = oracle(x)
    logits = _run(built, x)  # (3, 2, 1000)
    assert built.backend.mode == "fp32" and built.backend.agreement.is_exact()
    assert _rel_err(logits.mean(1), expected_mean) <= 1e-4
    assert (logits.mean(1).topk(5).indices == expected_mean.topk(5).indices).all()


def test_bf16_is_guarded_and_its_logits_come_from_fp32_heads() -> None:
    _, ours = _timm_and_ours(VARIANT)
    built, info = _openvino(ours, "bf16")
    x = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(2))
    logits = _run(built, x)
    assert built.backend.mode == "bf16" and built.backend.agreement.cosine >= 0.9999
    assert not built.backend.agreement.is_exact()  # bf16 really ran: not fp32 in disguise
    representable = logits.to(torch.bfloat16).float() == logits
    assert representable.float().mean().item() < 0.05  # bf16 heads would round every logit
    assert info["openvino"]


def test_auto_takes_the_fastest_mode_that_passes() -> None:
    expected = "bf16" if "bf16" in modes_for("auto") else "fp32"
    _, ours = _timm_and_ours(VARIANT)
    built, _ = _openvino(ours, "auto")
    assert built.backend.mode == expected and built.requested == modes_for("auto")[0]


def test_fp32_torch_backend_is_pytorch_itself() -> None:
    oracle, ours = _timm_and_ours(VARIANT)
    probe = reference_probe(ours)
    built = build_torch(ours, "fp32", torch.device("cpu"), probe)
    assert built.backend.name == "torch" and built.backend.agreement.is_exact()
    x = torch.randn(2, 3, 240, 240)
    with torch.inference_mode():
        expected = oracle(x)
    torch.testing.assert_close(_run(built, x).mean(1), expected, rtol=1e-5, atol=1e-5)


def test_every_thread_count_computes_the_same() -> None:
    _, ours = _timm_and_ours(VARIANT)
    built, _ = _openvino(ours, "fp32", threads=(1, 2))
    x = torch.randn(3, 3, 240, 240)
    one = _run(built, x, 1)
    torch.testing.assert_close(_run(built, x, 2), one, rtol=1e-5, atol=1e-5)


def _convert_in_child(cache_dir: str, queue: multiprocessing.Queue[str]) -> None:
    torch.manual_seed(0)
    _, source = prepare_openvino(create_model(VARIANT), Path(cache_dir), variant=VARIANT, sha256="0" * 64,
                                 source="random", pretrained=False, labels=imagenet_labels())
    queue.put(source)


def test_the_cache_converts_once_even_for_workers_starting_together(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_convert_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    assert sorted(queue.get(timeout=5) for _ in workers) == ["cache", "prepared"]
    # one prepared folder, no scratch left behind
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [cache_key(VARIANT, "0" * 64)]


def test_a_cached_model_computes_what_a_fresh_conversion_does(tmp_path: Path) -> None:
    _, ours = _timm_and_ours(VARIANT)
    first, info_first = _openvino(ours, "fp32", cache_dir=tmp_path)
    second, info_second = _openvino(ours, "fp32", cache_dir=tmp_path)
    assert (info_first["model_source"], info_second["model_source"]) == ("prepared", "cache")
    x = torch.randn(2, 3, 240, 240)
    torch.testing.assert_close(_run(second, x), _run(first, x), rtol=0, atol=0)


def test_a_complete_entry_is_read_without_the_lock(tmp_path: Path) -> None:
    """A cache baked into a read-only image: no lock file can be made, the entry is still used."""
    _, ours = _timm_and_ours(VARIANT)
    first, _ = _openvino(ours, "fp32", cache_dir=tmp_path)
    for lock in tmp_path.glob("*.lock"):
        lock.unlink()
        lock.mkdir()  # opening it for writing fails, even for root
    again, info = _openvino(ours, "fp32", cache_dir=tmp_path)
    assert info["model_source"] == "cache"


def test_an_unwritable_cache_still_serves(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    _, ours = _timm_and_ours(VARIANT)
    built, info = _openvino(ours, "fp32", cache_dir=blocked / "cache")
    assert info["model_source"] == "prepared, not cached" and built.backend.agreement.is_exact()


def test_cache_key_names_what_determines_the_model() -> None:
    a, b = cache_key("crossvit_9_dagger_240", "a" * 64), cache_key("crossvit_9_dagger_240", "b" * 64)
    assert a != b and a.startswith("crossvit_9_dagger_240-aaaaaaaaaaaaaaaa-ov20")
    assert a.endswith(f"-p{PREPARED_FORMAT}")


@pytest.mark.parametrize(("setting", "device", "precision", "expected"), [
    ("auto", "cpu", "auto", "openvino"),
    ("auto", "cpu", "fp32", "openvino"),
    ("auto", "cpu", "fp16", "torch"),
    ("auto", "cuda:0", "auto", "torch"),
    ("torch", "cpu", "auto", "torch"),
    ("openvino", "cpu", "bf16", "openvino"),
])
def test_backend_resolution(setting: str, device: str, precision: str, expected: str) -> None:
    choice = resolve_backend(setting, device, precision)
    assert choice.name == expected and choice.reason
    assert choice.fallback == (setting == "auto" and expected == "openvino")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"backend": "openvino", "device": "cuda"}, "CPU workers only"),
    ({"backend": "openvino", "precision": "fp16"}, "fp16 needs the torch backend"),
])
def test_impossible_backend_settings_are_refused(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**overrides)
