"""Our CrossViT's forward pass against timm's on the same weights, alternating in one process.

    python bench/model_speed.py [--variants ...] [--batches 1 8 32] [--repeats 7] [--compile] [--no-openvino]

Both models get the same (B, 3, 240, 240) batch, so both include the 240 -> 224 branch resize.
Modes: timm fp32, ours fp32, our bf16 modes, and our model on the service's OpenVINO backend
(fp32 and bf16 hints, converted and compiled by the service's own code, the classifier heads in
PyTorch fp32 as served); the chosen PyTorch bf16 mode is the fastest whose logits keep a worst-case cosine
>= 0.9999 to fp32 on a fixed probe batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_line  # noqa: E402  (bench/, this script's folder)

from model import CrossViT, create_model  # noqa: E402
from model.runtime import Mode, logit_cosine, prepare  # noqa: E402
from service.worker.backends.openvino_prepare import convert, head_arrays  # noqa: E402
from service.worker.backends.openvino_runtime import OpenVINOBackend, available  # noqa: E402

COSINE_FLOOR = 0.9999
Forward = Callable[[Tensor], Tensor]


def _mean_logits(runner: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Forward:
    def forward(x: Tensor) -> Tensor:
        b0, b1 = runner(x)
        return (b0 + b1) / 2

    return forward


def build_modes(
    name: str, weights: Path, timm_model: torch.nn.Module, compile_: bool, openvino: bool
) -> dict[str, Forward]:
    modes: dict[str, Forward] = {"timm-fp32": timm_model}
    for mode in (Mode.FP32, Mode.BF16_AUTOCAST, Mode.BF16_WEIGHTS):
        modes[f"ours-{mode.value}"] = _mean_logits(prepare(create_model(name, weights=weights), mode))
    if openvino:
        modes.update(_openvino_modes(create_model(name, weights=weights)))
    if compile_:
        import torch._dynamo
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold weights into the graph (CPU inference)
        # One static graph per batch size and mode; past dynamo's recompile limit (8 in torch 2.x)
        # it would silently run the rest eagerly and the table would time eager code as compiled.
        torch._dynamo.reset()
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, 64)
        modes["ours-bf16-weights-compile"] = _compiled(create_model(name, weights=weights), autocast=False)
        modes["ours-bf16-autocast-compile"] = _compiled(create_model(name, weights=weights), autocast=True)
    return modes


def _openvino_modes(model: CrossViT) -> dict[str, Forward]:
    """The service's OpenVINO backend in fp32 and bf16 on this process's threads, one conversion."""
    import openvino

    converted = convert(model)
    heads = head_arrays(model)
    threads = torch.get_num_threads()
    modes: dict[str, Forward] = {}
    for mode in ("fp32", "bf16"):
        backend = OpenVINOBackend(openvino.Core(), converted, heads, mode, (threads,))
        modes[f"openvino-{mode}"] = lambda x, backend=backend: (  # type: ignore[misc]
            torch.from_numpy(backend(x.numpy(), threads)).mean(dim=1))
    return modes


def _compiled(model: torch.nn.Module, *, autocast: bool) -> Forward:
    """torch.compile (inductor, freezing) of bf16 weights, or of fp32 weights under bf16 autocast."""
    if not autocast:
        model = model.to(torch.bfloat16)
    compiled = torch.compile(model.branch_logits, dynamic=False)
    dtype = torch.float32 if autocast else torch.bfloat16

    def forward(x: Tensor) -> Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            b0, b1 = compiled([t.to(dtype) for t in model.branch_inputs(x)])
        return ((b0 + b1) / 2).float()

    return forward


def time_modes(modes: dict[str, Forward], x: Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call; the modes alternate within each repeat so drift hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in modes}
    with torch.inference_mode():
        for forward in modes.values():  # warm-up: allocation, kernel choice, compilation
            forward(x)
            forward(x)
        for _ in range(repeats):
            for key, forward in modes.items():
                start = time.perf_counter()
                forward(x)
                samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["crossvit_9_dagger_240", "crossvit_18_dagger_240"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="add torch.compile (bf16, freezing): slow start")
    parser.add_argument("--no-openvino", action="store_true", help="leave out the OpenVINO backend's modes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    print(f"# torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, {cpu_line()}")
    results = []
    for name in args.variants:
        torch.manual_seed(0)
        ref = timm.create_model(name, pretrained=False).eval()
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "model.safetensors"
            save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, weights)
            modes = build_modes(name, weights, ref, args.compile, available() and not args.no_openvino)

        probe = torch.randn(8, 3, 240, 240, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            fp32 = modes["ours-fp32"](probe)
            cosine = {k: logit_cosine(fp32, forward(probe)) for k, forward in modes.items()}
        print(f"\n## {name}: worst logit cosine to fp32 on 8 probe images: "
              + ", ".join(f"{k} {v:.6f}" for k, v in cosine.items()))
        header = ["batch"] + [f"{k} img/s" for k in modes] + ["PyTorch bf16 chosen"]
        if "openvino-fp32" in modes:
            header.append("openvino-fp32 / ours-fp32")
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for batch in args.batches:
            x = torch.randn(batch, 3, 240, 240, generator=torch.Generator().manual_seed(batch))
            seconds = time_modes(modes, x, args.repeats)
            base = seconds["timm-fp32"]
            eligible = [k for k in modes if "bf16" in k and cosine[k] >= COSINE_FLOOR and k.startswith("ours")]
            chosen = min(eligible, key=seconds.__getitem__) if eligible else None
            cells = [str(batch)] + [f"{batch / s:.1f} ({base / s:.2f}x)" for s in seconds.values()]
            cells.append(f"{chosen} ({base / seconds[chosen]:.2f}x)" if chosen else "none passes the guard")
            if "openvino-fp32" in seconds:
                cells.append(f"{seconds['ours-fp32'] / seconds['openvino-fp32']:.2f}x")
            print("| " + " | ".join(cells) + " |", flush=True)
            results.append({"variant": name, "batch": batch, "img_per_s": {k: batch / s for k, s in seconds.items()},
                            "cosine": cosine, "chosen_bf16": chosen})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
