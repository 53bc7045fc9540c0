"""What INT8 costs in accuracy on your own images: the quantised model against fp32, image by image.

    CROSSVIT_PRECISION=int8 CROSSVIT_WEIGHTS=ckpt CROSSVIT_CALIBRATION_DIR=calib/ crossvit-serve --prepare-only
    python bench/int8_accuracy.py --weights ckpt --calibration calib/ --images val/ [--labels val/labels.csv]
                                  [--variant crossvit_18_dagger_240] [--cache-dir DIR]

Reads the prepared fp32 model and its INT8 quantisation for that calibration folder from the model cache
(as `--prepare-only` left them; nothing is quantised here), runs every image of --images through the served
preprocessing and both models, and prints the top-1 and top-5 agreement of INT8 with fp32, the logit
cosines, and, given a CSV of `file,class_id` lines, both modes' top-1 accuracy. Images must not be
calibration images, or the figures flatter INT8.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_line  # noqa: E402  (bench/, this script's folder)

from model.digest import file_sha256  # noqa: E402
from model.variants import get_variant  # noqa: E402
from service.imaging.preprocess import InputSpec, preprocess  # noqa: E402
from service.quantization import calibration_set, judge  # noqa: E402
from service.quantization.samples import SUFFIXES  # noqa: E402
from service.worker.backends.openvino_quantize import batched_logits, quantized_folder, read_quantization  # noqa: E402,E501
from service.worker.backends.openvino_runtime import openvino  # noqa: E402
from service.worker.backends.prepared import cache_key, load_heads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="the checkpoint --prepare-only prepared")
    parser.add_argument("--variant", default="crossvit_18_dagger_240")
    parser.add_argument("--calibration", type=Path, help="CROSSVIT_CALIBRATION_DIR of the quantisation (default set)")
    parser.add_argument("--images", type=Path, required=True, help="labelled or not; never calibration images")
    parser.add_argument("--labels", type=Path, help="CSV lines `file,class_id` for --images")
    parser.add_argument("--cache-dir", type=Path, help="CROSSVIT_CACHE_DIR (default: <weights dir>/.cache/models)")
    args = parser.parse_args()

    variant = get_variant(args.variant)
    cache = args.cache_dir or args.weights.parent / ".cache" / "models"
    prepared = cache / cache_key(variant.name, file_sha256(args.weights))
    int8 = quantized_folder(prepared, calibration_set(args.calibration))
    if not (int8 / "quantization.json").is_file():
        sys.exit(f"no INT8 quantisation at {int8}: run --prepare-only with CROSSVIT_PRECISION=int8 first")
    print(f"# {variant.name}; {cpu_line()}")
    print(f"# quantisation: {read_quantization(int8).summary()}")
    spec = InputSpec.from_variant(variant)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in SUFFIXES)
    x = np.stack([preprocess(p.read_bytes(), spec, max_pixels=40_000_000).pixels for p in paths])
    core, heads = openvino().Core(), load_heads(prepared)
    logits = {mode: batched_logits(core, core.read_model(folder / "model.xml"), heads, mode, x, 2)
              for mode, folder in (("fp32", prepared), ("int8", int8))}
    fp32, q = logits["fp32"].mean(axis=1), logits["int8"].mean(axis=1)
    verdict = judge(logits["fp32"], logits["int8"])
    top5 = np.argsort(-q, axis=-1)[:, :5]
    in_top5 = np.mean([fp32[i].argmax() in top5[i] for i in range(len(paths))])
    print(f"{len(paths)} images: top-1 agreement {verdict.top1_agreement:.4f}, fp32's top-1 in int8's top-5 "
          f"{in_top5:.4f}; logit cosine median {verdict.median_cosine:.5f}, worst {verdict.worst_cosine:.5f}; "
          f"confident images {verdict.confident_images}, agreement on them {verdict.confident_agreement}; "
          f"the guard would {'admit' if verdict.passed else 'refuse'} it")
    if args.labels is not None:
        with open(args.labels) as handle:
            truth = {row[0]: int(row[1]) for row in csv.reader(handle) if row}
        known = [i for i, p in enumerate(paths) if p.name in truth]
        if known:
            answer = np.array([truth[paths[i].name] for i in known])
            for mode, values in (("fp32", fp32), ("int8", q)):
                print(f"{mode} top-1 accuracy on {len(known)} labelled images: "
                      f"{float((values[known].argmax(axis=-1) == answer).mean()):.4f}")


if __name__ == "__main__":
    main()
