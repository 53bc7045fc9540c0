"""Branch agreement on real photos vs. uniform noise, for the weights you have.

    python bench/agreement.py [--model crossvit_tiny_240] [--weights checkpoint.safetensors] [--noise 12]

Without --weights the model is timm's random init under torch.manual_seed(0), the checkpoint the
tests serve. The photos are scikit-image's bundled ones (no network); preprocessing is the
service's own, and the numbers are what /v1 reports as `agreement`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import create_model  # noqa: E402
from model.variants import get_variant  # noqa: E402
from service.imaging.preprocess import InputSpec, preprocess  # noqa: E402
from service.inference.agreement import Agreement, branch_agreement  # noqa: E402
from tests.photos import encode, photo  # noqa: E402

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "motorcycle_left", "retina", "hubble_deep_field", "camera",
          "moon", "page", "text", "coins", "brick", "grass", "gravel", "color", "horse")


def _agreements(model: torch.nn.Module, spec: InputSpec, images: list[bytes]) -> list[Agreement]:
    prepared = [preprocess(data, spec, max_pixels=10**9, index=i) for i, data in enumerate(images)]
    x = torch.stack([torch.from_numpy(p.pixels) for p in prepared])  # branch 0; the model resizes branch 1
    with torch.inference_mode():
        logits = torch.stack(model.branch_logits(x), dim=1)  # (n, 2, C)
    return branch_agreement(logits.numpy())


def _summary(name: str, found: list[Agreement]) -> str:
    js = [a.js_divergence for a in found]
    return (f"{name:6s} n={len(found):3d}  top-1 agree {sum(a.top1_agree for a in found):3d}  "
            f"JS min {min(js):.4f}  median {statistics.median(js):.4f}  max {max(js):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="crossvit_tiny_240")
    parser.add_argument("--weights", help="checkpoint file; default: timm's random init, seed 0")
    parser.add_argument("--noise", type=int, default=12, help="uniform-noise images (default: %(default)s)")
    args = parser.parse_args()
    if args.weights:
        model = create_model(args.model, weights=args.weights)
    else:
        import timm

        torch.manual_seed(0)  # as tests/conftest.py's reference checkpoint
        state = timm.create_model(args.model, pretrained=False).state_dict()
        model = create_model(args.model)
        model.load_state_dict(state)
    spec = InputSpec.from_variant(get_variant(args.model))
    rng = np.random.default_rng(0)
    noise = [encode(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), "PNG")
             for _ in range(args.noise)]
    photos = _agreements(model.eval(), spec, [encode(photo(name), "PNG") for name in PHOTOS])
    print(f"{args.model}, weights: {args.weights or 'timm random init (seed 0)'}")
    for name, found in zip(PHOTOS, photos, strict=True):
        print(f"  {name:18s} top-1 agree {str(found.top1_agree):5s}  JS {found.js_divergence:.4f}")
    print(_summary("photos", photos))
    print(_summary("noise", _agreements(model, spec, noise)))


if __name__ == "__main__":
    main()
