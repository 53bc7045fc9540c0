"""The LitServe peer the serving bench compares against: the same model, weights, precision and
preprocessing, served the way LitServe's documentation shows, batching on.

    python bench/litserve_server.py --weights W --port 8002 [--variant V] [--precision fp32|bf16|fp16]
                                    [--workers 2] [--max-batch-size 8] [--batch-timeout-ms 20]
                                    [--accelerator cpu|cuda]

One LitServe inference worker per core (`workers_per_device`), each with one torch thread: the
layout that measured fastest for it here (bench/README.md). Decoding runs in LitServe's workers
(`decode_request`), as LitServe does it; the model runs in PyTorch, which is what a LitAPI holds.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation as a class.
import argparse
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import Request
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import create_model  # noqa: E402
from model.runtime import Mode, prepare  # noqa: E402
from model.variants import get_variant  # noqa: E402
from service.imaging.preprocess import InputSpec, preprocess  # noqa: E402

MODES = {"fp32": Mode.FP32, "bf16": Mode.BF16_AUTOCAST, "fp16": Mode.FP16_AUTOCAST}


class CrossViTAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, variant: str, weights: Path, precision: str, **batching: Any) -> None:
        super().__init__(api_path="/v1/classify", **batching)
        self.variant, self.weights, self.precision = variant, weights, precision

    def setup(self, device: str) -> None:
        if not device.startswith("cuda"):
            torch.set_num_threads(1)  # one core per worker process
        self.runner = prepare(create_model(self.variant, weights=self.weights), MODES[self.precision], device)
        self.spec = InputSpec.from_variant(get_variant(self.variant))

    def decode_request(self, request: Request) -> Tensor:  # LitServe passes the parsed multipart form
        form: Any = request
        return torch.from_numpy(preprocess(form["images"].file.read(), self.spec, max_pixels=40_000_000).pixels)

    def batch(self, inputs: list[Tensor]) -> Tensor:
        return torch.stack(inputs)

    def predict(self, x: Tensor) -> Tensor:
        b0, b1 = self.runner(x)
        return (b0 + b1) / 2

    def unbatch(self, output: Tensor) -> list[Tensor]:
        return list(output)

    def encode_response(self, logits: Tensor) -> dict[str, list[int]]:
        return {"top5": logits.topk(5).indices.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="crossvit_9_dagger_240")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--precision", choices=sorted(MODES), default="fp32")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=2, help="inference workers per device")
    parser.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=20.0)
    args = parser.parse_args()
    api = CrossViTAPI(args.variant, args.weights, args.precision, max_batch_size=args.max_batch_size,
                      batch_timeout=args.batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=args.workers,
                          healthcheck_path="/readyz")
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
