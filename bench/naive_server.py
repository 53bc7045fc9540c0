"""The naive baseline the serving bench compares against: one forward per request.

A plain FastAPI app, inference off the event loop in the threadpool, the same model, weights,
precision and preprocessing as the service, one process using every core. No batching.

    python bench/naive_server.py --weights W --port 8001 [--variant V] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import create_model  # noqa: E402
from model.runtime import Mode, prepare  # noqa: E402
from model.variants import get_variant  # noqa: E402
from service.imaging.preprocess import InputSpec, preprocess  # noqa: E402

MODES = {"fp32": Mode.FP32, "bf16": Mode.BF16_AUTOCAST}


def build(variant: str, weights: Path, precision: str) -> FastAPI:
    runner = prepare(create_model(variant, weights=weights), MODES[precision])
    spec = InputSpec.from_variant(get_variant(variant))
    app = FastAPI()

    def infer(data: bytes) -> list[int]:
        x = torch.from_numpy(preprocess(data, spec, max_pixels=40_000_000).pixels)
        b0, b1 = runner(x[None])
        return ((b0 + b1) / 2).topk(5).indices[0].tolist()

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, list[int]]:
        form = await request.form()
        upload = form["images"]
        data = await upload.read()  # type: ignore[union-attr]
        return {"top5": await run_in_threadpool(infer, data)}

    @app.get("/readyz")
    async def readyz() -> dict[str, bool]:
        return {"ready": True}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="crossvit_9_dagger_240")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--precision", choices=sorted(MODES), default="fp32")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())  # all cores, as torch's default
    uvicorn.run(build(args.variant, args.weights, args.precision), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
