"""The service under load beside its peers and its own ceiling, in one run.

    python bench/serve_load.py [--variant crossvit_9_dagger_240] [--concurrency 1 8 32] [--duration 15]
                               [--systems ours litserve naive] [--precisions fp32 auto int8] [--baseline CHECKOUT]

Needs `wrk` (Debian: apt-get install wrk) and, for the LitServe peer, `litserve` (pip). Loopback
only; every load run is bounded by --duration. Steps, for the same random-init weights and the
same 640x480 JPEG throughout:
(1) references: preprocessing ms per image (one thread, this process), and model-only img/s of the
    model as the service runs it (its backend and mode; bench/openvino_layout.py's processes): at
    batch 1 on every core, at batch 8 one 1-thread process per core at once;
(2) the service (`crossvit-serve`, defaults apart from model, weights and precision) with
    CROSSVIT_PRECISION=fp32 (exact), =auto (the default: the fastest guarded mode) and =int8 (quantised on
    the default calibration set; its guard's figures are printed), each worker's backend and mode reported;
(3) LitServe (bench/litserve_server.py) and the naive server (bench/naive_server.py), PyTorch fp32
    and bf16 autocast, the modes a user of either would run;
each under wrk at every concurrency after a discarded warm-up; model-only is sampled again
between the servers (the median stands), because shared cores drift over a run.
--baseline runs the service of another checkout (a `git worktree` of an older commit) the same way,
right after ours, in this interpreter: before/after figures from one run. Every service start is
preceded by its `--prepare-only`, so that what is measured is serving, not a first conversion.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_line  # noqa: E402  (bench/, this script's folder)
from servers import ready_workers, wait_ready  # noqa: E402

from model import create_model  # noqa: E402
from model.runtime import Mode, prepare  # noqa: E402
from model.variants import get_variant  # noqa: E402
from service.imaging.preprocess import InputSpec, preprocess  # noqa: E402
from service.worker.backends.openvino_quantize import read_quantization  # noqa: E402
from tests.photos import encode, photo, resized  # noqa: E402

MAX_BATCH = 8  # the service's default max_batch_size
MODES = {"fp32": Mode.FP32, "bf16": Mode.BF16_AUTOCAST}


@dataclass
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    non_200: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, image: Path, connections: int, duration_s: int) -> LoadResult:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "60s", "--latency",
         "-s", str(ROOT / "bench" / "classify.lua"), f"{url}/v1/classify"],
        env={**os.environ, "IMAGE": str(image)}, capture_output=True, text=True, check=True,
    ).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))  # wrk pads some values
    try:
        result = LoadResult(
            rps=float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)),  # type: ignore[union-attr]
            p50_ms=_ms(latency["50"]), p99_ms=_ms(latency["99"]),
            non_200=int(re.search(r"NON200 (\d+)", out).group(1)),  # type: ignore[union-attr]
        )
    except (KeyError, AttributeError) as exc:
        raise RuntimeError(f"unexpected wrk output:\n{out}") from exc
    print(f"  {url} c={connections}: {result}", file=sys.stderr, flush=True)
    return result


@dataclass
class Served:
    label: str
    mode: str  # what the server said it runs (the service), or the mode it was started in
    runs: dict[int, LoadResult]


def measure_server(label: str, command: list[str], env: dict[str, str], image: Path, args: argparse.Namespace,
                   port: int, cwd: Path | None = None, on_ready: Callable[[str], None] | None = None) -> Served:
    url = f"http://127.0.0.1:{port}"
    # A process group of its own: stopping a server stops every process it started (LitServe's
    # inference workers outlive a SIGTERM to its main process and keep polling their queue at ~15 %
    # of a core). Not a session of its own: that would also be a scheduler autogroup of its own, out
    # of the priority a benchmark run may be given (setsid + /proc/self/autogroup).
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               preexec_fn=os.setpgrp, cwd=cwd)
    try:
        wait_ready(url, process)
        mode = env.get("CROSSVIT_PRECISION", "")
        if label.startswith(("ours", "baseline")):  # every worker warmed up, then what the service chose
            workers = ready_workers(url)
            mode = "+".join(sorted({f"{w.get('backend')}-{w.get('mode')}" for w in workers}))
        if on_ready is not None:
            on_ready(url)
        run_wrk(url, image, 8, 3)  # warm-up, discarded
        return Served(label, mode, {c: run_wrk(url, image, c, args.duration) for c in args.concurrency})
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever it left behind


def _timed(forward: Callable[[], object], batch: int, repeats: int, min_seconds: float) -> float:
    """batch / median seconds of at least `repeats` calls (and of as many as `min_seconds` holds),
    after two warm-up calls."""
    forward()
    forward()
    times = []
    end = time.monotonic() + min_seconds
    while len(times) < repeats or time.monotonic() < end:
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def model_only(
    variant: str, weights: Path | None, mode: Mode, batch: int, repeats: int = 15, min_seconds: float = 0.0
) -> float:
    """img/s of the bare PyTorch model at this process's torch threads. No weights: random init."""
    runner = prepare(create_model(variant, weights=weights), mode)
    x = torch.randn(batch, 3, *(runner.model.config.img_size[0],) * 2)
    return _timed(lambda: runner(x), batch, repeats, min_seconds)


def model_only_served(variant: str, mode: str, seconds: float = 6.0, model_xml: Path | None = None) -> dict[int, float]:
    """The model as the service runs it (OpenVINO, `mode`; `model_xml`: the graph the service prepared, as for
    INT8): at batch 1 one process on every core (a lone request borrows the idle workers' cores), at MAX_BATCH
    one 1-thread process per core at once (the busy service), summed."""
    from openvino_layout import results, spawn  # bench/ is on sys.path (this script's folder)

    cores = len(os.sched_getaffinity(0))
    (lone,) = results([spawn(variant, mode, threads=cores, batch=1, seconds=seconds, model_xml=model_xml)])
    busy = results([spawn(variant, mode, threads=1, batch=MAX_BATCH, seconds=seconds, model_xml=model_xml)
                    for _ in range(cores)])
    return {1: lone, MAX_BATCH: sum(busy)}


def int8_folder(weights: Path, label: str = "ours") -> Path | None:
    """The INT8 folder `_ours` had the service quantise into its cache and its guard admitted, if any."""
    folders = sorted(p for p in (weights.parent / f"model-cache-{label}").glob("*.int8-*") if p.is_dir())
    admitted = [f for f in folders if read_quantization(f).guard.passed]
    return admitted[0] if admitted else None


def preprocess_ms(variant: str, data: bytes, repeats: int = 50) -> float:
    spec = InputSpec.from_variant(get_variant(variant))
    torch.set_num_threads(1)
    try:
        preprocess(data, spec, max_pixels=40_000_000)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            preprocess(data, spec, max_pixels=40_000_000)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    return statistics.median(times) * 1000


def _ours(precision: str, weights: Path, args: argparse.Namespace, image: Path, checkout: Path = ROOT,
          label: str = "ours") -> Served:
    """The service of `checkout` (this one, or --baseline's), prepared first, then under load."""
    env = {"CROSSVIT_MODEL": args.variant, "CROSSVIT_WEIGHTS": str(weights), "CROSSVIT_PRECISION": precision,
           "CROSSVIT_PORT": str(args.port), "CROSSVIT_LOG_LEVEL": "warning",
           "CROSSVIT_CACHE_DIR": str(weights.parent / f"model-cache-{label}")}
    subprocess.run([sys.executable, "-m", "service.cli", "--prepare-only"], env={**os.environ, **env}, cwd=checkout,
                   check=True, stdout=subprocess.DEVNULL)
    return measure_server(f"{label} {precision}", [sys.executable, "-m", "service.cli"], env, image, args, args.port,
                          cwd=checkout)


def _peer(name: str, precision: str, weights: Path, args: argparse.Namespace, image: Path) -> Served:
    port = args.port + (1 if name == "naive" else 2)
    script = ROOT / "bench" / ("naive_server.py" if name == "naive" else "litserve_server.py")
    command = [sys.executable, str(script), "--variant", args.variant, "--weights", str(weights),
               "--precision", precision, "--port", str(port)]
    return measure_server(f"{name} {precision}", command, {}, image, args, port)


def load_inputs(folder: Path, variant: str) -> tuple[Path, Path]:
    """The request image (a 640x480 JPEG of chelsea) and seeded random-init weights, written into `folder`."""
    image = folder / "photo-640x480.jpg"
    image.write_bytes(encode(resized(photo("chelsea"), 640, 480), "JPEG", quality=90))
    weights = folder / f"{variant}.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in create_model(variant).state_dict().items()}, weights)
    return image, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="crossvit_9_dagger_240")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--duration", type=int, default=15, help="seconds per load run")
    parser.add_argument("--systems", nargs="+", choices=["ours", "litserve", "naive"],
                        default=["ours", "litserve", "naive"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "auto", "int8"], default=["fp32", "auto", "int8"],
                        help="the service's modes to run")
    parser.add_argument("--port", type=int, default=8390)
    parser.add_argument("--baseline", type=Path, help="another checkout whose service runs after ours")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("this benchmark needs wrk: apt-get install wrk")

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        image, weights = load_inputs(Path(tmp), args.variant)
        pre_ms = preprocess_ms(args.variant, image.read_bytes())
        print(f"# {args.variant}, torch {torch.__version__}, {threads} threads; wrk -t1, {args.duration} s per run")
        print(f"# {cpu_line()}")
        print(f"preprocessing one 640x480 JPEG: {pre_ms:.2f} ms (median, one thread)\n")
        served: list[Served] = []
        only: dict[str, dict[int, list[float]]] = {}  # served mode -> batch -> samples

        def sample(modes: list[str]) -> None:
            for mode in modes:
                mode_name = mode.split("-", 1)[1]
                xml = None
                if mode_name == "int8":
                    folder = int8_folder(weights)
                    if folder is None:
                        continue
                    xml = folder / "model.xml"
                for batch, value in model_only_served(args.variant, mode_name, model_xml=xml).items():
                    only.setdefault(mode, {}).setdefault(batch, []).append(value)

        if "ours" in args.systems:
            for precision in args.precisions:
                served.append(_ours(precision, weights, args, image))
            if (folder := int8_folder(weights)) is not None:
                print(f"int8 guard (held-out samples against fp32): {read_quantization(folder).summary()['guard']}")
            if args.baseline is not None:
                for precision in ("fp32", "auto"):
                    served.append(_ours(precision, weights, args, image, args.baseline.resolve(), "baseline"))
            ours_modes = sorted({s.mode for s in served})
            sample(ours_modes)
        for name in ("litserve", "naive"):
            if name in args.systems:
                for precision in ("fp32", "bf16"):
                    served.append(_peer(name, precision, weights, args, image))
                if "ours" in args.systems:
                    sample(ours_modes)
        print(f"  model-only img/s samples: {only}", file=sys.stderr, flush=True)
        _report(served, {m: {b: statistics.median(v) for b, v in bs.items()} for m, bs in only.items()}, pre_ms, args)


def _report(served: list[Served], only: dict[str, dict[int, float]], pre_ms: float, args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    print("| system | mode | c | img/s | p50 ms | p99 ms | non-200 |")
    print("|---|---|---|---|---|---|---|")
    for s in served:
        for c, r in s.runs.items():
            print(f"| {s.label} | {s.mode} | {c} | {r.rps:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.non_200} |")
    print()
    by_label = {s.label: s for s in served}
    top = max(args.concurrency)
    for mode, rates in only.items():
        # what the cores could do if they only ran the model and decoded: per image, model time
        # on every core plus preprocessing time spread over the cores
        ceiling = 1 / (1 / rates[MAX_BATCH] + pre_ms / 1000 / cores)
        print(f"model-only {mode}: {rates[1]:.1f} img/s at batch 1, {rates[MAX_BATCH]:.1f} at batch {MAX_BATCH}; "
              f"with preprocessing on {cores} cores: {ceiling:.1f} img/s")
        for s in served:
            if s.label.startswith("ours") and s.mode == mode and top in s.runs:
                print(f"  {s.label}: served / (model-only + preprocessing) at c={top}: "
                      f"{s.runs[top].rps / ceiling:.3f} (goal >= 0.92)")
    goals = [("ours fp32", "litserve fp32", 1.2), ("ours auto", "litserve bf16", 1.5),
             ("ours int8", "litserve bf16", None), ("ours fp32", "naive fp32", None), ("ours auto", "naive bf16", None)]
    for ours, peer, goal in goals:
        if ours in by_label and peer in by_label and top in by_label[ours].runs:
            ratio = by_label[ours].runs[top].rps / by_label[peer].runs[top].rps
            print(f"{ours} / {peer} at c={top}: {ratio:.2f}x" + (f" (goal >= {goal})" if goal else ""))
    for precision in ("fp32", "auto"):
        new, old = by_label.get(f"ours {precision}"), by_label.get(f"baseline {precision}")
        if new is not None and old is not None and top in new.runs and 1 in new.runs:
            print(f"ours {precision} / baseline at c={top}: {new.runs[top].rps / old.runs[top].rps:.2f}x img/s; "
                  f"p50 at c=1 {new.runs[1].p50_ms:.1f} ms against {old.runs[1].p50_ms:.1f} ms")
    for label in ("ours auto", "ours fp32", "ours int8"):
        if label in by_label and 1 in by_label[label].runs:
            print(f"{label} p50 at c=1: {by_label[label].runs[1].p50_ms:.1f} ms"
                  + (" (goal <= 15 ms)" if label == "ours auto" else ""))
    print(f"non-200 responses, all runs: {sum(r.non_200 for s in served for r in s.runs.values())}")


if __name__ == "__main__":
    main()
