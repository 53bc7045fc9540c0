"""Where the INT8 guard's bounds come from: sound and broken quantisations of the same model, judged alike.

    python bench/int8_guard.py [--variants crossvit_9_dagger_240 crossvit_18_dagger_240]

For each variant (seeded random init, prepared through the service's code into a scratch cache), three
quantisations by the service's own path (service/worker/backends/openvino_quantize.py), each judged by the
guard on the default set's held-out samples: calibrated on the default photos (sound), on blank images
(activation ranges far narrower than a photo's) and on noise images (ranges of the wrong shape). Prints the
guard's figures and verdict for each, and the quantisation's seconds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_line  # noqa: E402  (bench/, this script's folder)

from model import create_model  # noqa: E402
from model.variants import get_variant  # noqa: E402
from service.imaging.preprocess import InputSpec  # noqa: E402
from service.quantization import calibration_set  # noqa: E402
from service.worker.backends.openvino_prepare import prepare_openvino  # noqa: E402
from service.worker.backends.openvino_quantize import quantize_openvino, read_quantization  # noqa: E402
from weights.labels import imagenet_labels  # noqa: E402


def _folder(root: Path, name: str, images: list[Image.Image]) -> Path:
    folder = root / name
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["crossvit_9_dagger_240", "crossvit_18_dagger_240"])
    args = parser.parse_args()
    import torch

    print(f"# {cpu_line()}")
    print("| variant | calibrated on | median cosine | worst cosine | top-1 agreement | confident images | verdict | "
          "seconds |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30), (30, 30, 200), (30, 200, 30)]
        blank = _folder(root, "blank", [Image.new("RGB", (320, 240), c) for c in colours])
        noise = _folder(root, "noise", [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
                                        for _ in range(6)])
        for variant in args.variants:
            torch.manual_seed(0)
            model = create_model(variant)
            prepared, _ = prepare_openvino(model, root / "cache", variant=variant, sha256=f"{variant:0<64}"[:64],
                                           source="random", pretrained=False, labels=imagenet_labels())
            spec = InputSpec.from_variant(get_variant(variant))
            held_out = calibration_set(None).held_out
            for label, folder in (("default photos", None), ("blank images", blank), ("noise images", noise)):
                calibration = calibration_set(folder)
                if folder is not None:  # judged on the same held-out photos as the sound one
                    calibration = type(calibration)(calibration.source, calibration.calibration + calibration.held_out,
                                                    held_out)
                out, _ = quantize_openvino(prepared, calibration, spec, threads=2, cached=True)
                q = read_quantization(out)
                g = q.guard
                print(f"| {variant} | {label} | {g.median_cosine:.4f} | {g.worst_cosine:.4f} | {g.top1_agreement:.3f} "
                      f"| {g.confident_images} | {'admitted' if g.passed else 'refused'} | {q.seconds:.1f} |",
                      flush=True)
            shutil.rmtree(root / "cache")


if __name__ == "__main__":
    main()
