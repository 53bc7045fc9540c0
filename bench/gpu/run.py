"""The GPU path, tested and measured in one command, for the few minutes an accelerator is lent.

    python bench/gpu/run.py RESULTS [--carry bench/gpu/carry] [--budget-s 450]
    python bench/gpu/run.py RESULTS --dry-run        # the same steps on the CPU, tiny (make test runs it)

On a bare machine with torch, timm, httpx and pillow (what the lent machines hold), after
`bench/gpu/fetch.py` has put the service's other wheels and the test photos in bench/gpu/carry:

1. setup: installs the carried wheels into RESULTS/site (no index) and puts it on the path;
2. tests: the `gpu`-marked tests (pytest -m gpu);
3. model: model-only img/s of crossvit_18_dagger_240 and crossvit_9_dagger_240 at batch 1/32/128,
   fp32, bf16 and fp16 autocast (each with its guard cosine against fp32), and torch.compile'd bf16;
4. preprocess: CPU preprocessing img/s on every core (processes), the ceiling decode puts on the GPU;
5. served: the service on cuda (PyTorch, bf16) under load at c=1/64/256, then LitServe on the same GPU
   with the same model, mode and batch limit, each against model-only at the same batch size.

Every stage writes its part of RESULTS/results.json as soon as it ends, and RESULTS/table.md at the
end; a stage that fails records its error and the next one runs; stages are skipped, and say so, once
the time budget is spent. Loopback only; every load run is bounded by its duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_line  # noqa: E402
from servers import free_port, ready_workers, wait_ready  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """What a run measures: the real sizes on a GPU, tiny ones on the CPU for the dry run."""

    device: str
    variants: tuple[str, ...]
    batches: tuple[int, ...]
    modes: tuple[str, ...]
    compile_backend: str  # torch.compile's backend ("eager" in the dry run: the path, without codegen)
    compile_batches: tuple[int, ...]
    min_seconds: float  # per timed point
    served_variant: str
    served_mode: str
    concurrency: tuple[int, ...]
    load_seconds: float
    max_batch_size: int

    @classmethod
    def for_run(cls, dry_run: bool) -> Plan:
        if dry_run:
            return cls("cpu", ("crossvit_tiny_240",), (1, 2, 4), ("fp32", "bf16"), "eager", (2,), 0.2,
                       "crossvit_tiny_240", "fp32", (1, 2), 2.0, 4)
        return cls("cuda", ("crossvit_18_dagger_240", "crossvit_9_dagger_240"), (1, 32, 64, 128),
                   ("fp32", "bf16", "fp16"), "inductor", (32, 128), 2.0, "crossvit_18_dagger_240", "bf16",
                   (1, 64, 256), 12.0, 64)


class Results:
    """results.json, rewritten after every stage so that a run cut short keeps what it measured."""

    def __init__(self, folder: Path, budget_s: float) -> None:
        self.folder = folder
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": {}}
        self._ends = time.monotonic() + budget_s
        folder.mkdir(parents=True, exist_ok=True)

    def left_s(self) -> float:
        return self._ends - time.monotonic()

    def stage(self, name: str, run: Callable[[], Any], needs_s: float) -> Any:
        if self.left_s() < needs_s:
            self.data["stages"][name] = {"skipped": f"{self.left_s():.0f} s of the budget left, needs ~{needs_s:.0f} s"}
            self.save()
            return None
        begun = time.monotonic()
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            value = run()
            entry = {"result": value}
        except Exception as exc:  # one failing stage must not lose the others' figures
            value, entry = None, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        entry["seconds"] = round(time.monotonic() - begun, 1)
        self.data["stages"][name] = entry
        self.save()
        return value

    def save(self) -> None:
        (self.folder / "results.json").write_text(json.dumps(self.data, indent=1, default=str))


# ------------------------------------------------------------------------------------------------ stages


def setup(carry: Path | None, results: Path) -> dict[str, Any]:
    """The carried wheels into RESULTS/site (no index), on this process's path and its children's."""
    installed: list[str] = []
    site = results / "site"
    if carry is not None and (carry / "wheels").is_dir():
        wheels = sorted(str(w) for w in (carry / "wheels").glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--disable-pip-version-check", "--target", str(site), *wheels], check=True)
        installed = [Path(w).name for w in wheels]
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")]))
    else:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if carry is not None and (carry / "photos").is_dir():
        os.environ["CROSSVIT_TEST_PHOTOS"] = str(carry / "photos")  # tests/photos.py: no scikit-image here
    sys.path.insert(0, str(ROOT))
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "cpu": cpu_line(),
                            "installed": installed}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False)
        info["driver"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def gpu_tests() -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           "-o", "addopts=", "tests"], cwd=ROOT, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "", "tail": "\n".join(lines[-30:])}


def _timed(forward: Callable[[], object], sync: Callable[[], None], batch: int, min_seconds: float) -> float:
    """img/s: batch / the median of the calls that fit in `min_seconds` (at least 5), after 3 warm-up calls."""
    for _ in range(3):
        forward()
    sync()
    times: list[float] = []
    ends = time.monotonic() + min_seconds
    while len(times) < 5 or time.monotonic() < ends:
        begun = time.perf_counter()
        forward()
        sync()
        times.append(time.perf_counter() - begun)
    return batch / statistics.median(times)


def model_only(plan: Plan) -> list[dict[str, Any]]:
    import torch

    from model import create_model
    from model.runtime import Mode, logit_cosine, prepare

    modes = {"fp32": Mode.FP32, "bf16": Mode.BF16_AUTOCAST, "fp16": Mode.FP16_AUTOCAST}
    device = torch.device(plan.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows: list[dict[str, Any]] = []
    for variant in plan.variants:
        torch.manual_seed(0)
        runner = prepare(create_model(variant), Mode.FP32, device)
        side = runner.model.config.img_size[0]
        probe = torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(0))
        reference = sum(runner(probe)) / 2
        for name in plan.modes:
            runner.mode = modes[name]
            cosine = logit_cosine(reference, sum(runner(probe)) / 2)
            for batch in plan.batches:
                x = torch.randn(batch, 3, side, side).to(device)
                rows.append({"variant": variant, "mode": name, "batch": batch, "compiled": False,
                             "img_s": round(_timed(lambda: runner(x), sync, batch, plan.min_seconds), 1),  # noqa: B023
                             "guard_cosine": round(cosine, 6)})
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
        runner.mode = modes[plan.served_mode]
        compiled = torch.compile(runner.model.forward_features, backend=plan.compile_backend, dynamic=False)
        eager = runner.model.forward_features
        runner.model.forward_features = compiled  # type: ignore[method-assign]
        try:
            cosine = logit_cosine(reference, sum(runner(probe)) / 2)
            for batch in plan.compile_batches:
                x = torch.randn(batch, 3, side, side).to(device)
                begun = time.monotonic()
                runner(x)  # the compilation, timed apart
                compile_s = time.monotonic() - begun
                rows.append({"variant": variant, "mode": plan.served_mode, "batch": batch, "compiled": True,
                             "img_s": round(_timed(lambda: runner(x), sync, batch, plan.min_seconds), 1),  # noqa: B023
                             "guard_cosine": round(cosine, 6), "compile_s": round(compile_s, 1)})
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
        finally:
            runner.model.forward_features = eager  # type: ignore[method-assign]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _preprocess_worker(args: tuple[str, bytes, float]) -> int:
    variant, data, seconds = args
    import torch

    from model.variants import get_variant
    from service.imaging.preprocess import InputSpec, preprocess

    torch.set_num_threads(1)
    spec = InputSpec.from_variant(get_variant(variant))
    done, ends = 0, time.monotonic() + seconds
    while time.monotonic() < ends:
        preprocess(data, spec, max_pixels=40_000_000)
        done += 1
    return done


def jpeg_640x480() -> bytes:
    sys.path.insert(0, str(ROOT))
    from tests.photos import encode, photo, resized

    return encode(resized(photo("chelsea"), 640, 480), "JPEG", quality=90)


def preprocess_rate(plan: Plan, data: bytes) -> dict[str, Any]:
    """640x480 JPEG -> model input, one process per core at once: the most images/s decoding can feed."""
    cores = len(os.sched_getaffinity(0))
    seconds = max(1.0, plan.min_seconds * 2)
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        counts = list(pool.map(_preprocess_worker, [(plan.served_variant, data, seconds)] * cores))
    return {"cores": cores, "img_s": round(sum(counts) / seconds, 1), "per_core_img_s": round(counts[0] / seconds, 1)}


# ------------------------------------------------------------------------------------------------ load


def _load_process(args: tuple[str, bytes, int, float]) -> list[tuple[float, int]]:
    """`connections` clients posting the image back to back for `seconds`: (latency s, status) each."""
    url, data, connections, seconds = args
    import httpx

    async def client(http: httpx.AsyncClient, ends: float, out: list[tuple[float, int]]) -> None:
        while time.monotonic() < ends:
            begun = time.perf_counter()
            try:
                status = (await http.post(url, files={"images": ("i.jpg", data, "image/jpeg")})).status_code
            except httpx.HTTPError:
                status = 0
            out.append((time.perf_counter() - begun, status))

    async def run() -> list[tuple[float, int]]:
        out: list[tuple[float, int]] = []
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            ends = time.monotonic() + seconds
            await asyncio.gather(*(client(http, ends, out) for _ in range(connections)))
        return out

    return asyncio.run(run())


def load(url: str, data: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    """img/s, p50/p99 and non-200s of `concurrency` clients spread over up to 8 processes."""
    processes = max(1, min(8, concurrency // 16))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        samples = [s for part in pool.map(_load_process, [(url, data, n, seconds) for n in shares]) for s in part]
    ok = sorted(latency for latency, status in samples if status == 200)
    if not ok:
        return {"c": concurrency, "img_s": 0.0, "non_200": len(samples)}
    return {"c": concurrency, "img_s": round(len(ok) / seconds, 1), "p50_ms": round(1000 * ok[len(ok) // 2], 1),
            "p99_ms": round(1000 * ok[min(len(ok) - 1, int(0.99 * len(ok)))], 1),
            "non_200": len(samples) - len(ok)}


def served(system: str, plan: Plan, weights: Path, data: bytes, results: Path) -> dict[str, Any]:
    """One server (ours or LitServe) on the plan's device: every concurrency, after a discarded warm-up."""

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(results / f"{system}.log", "w")  # noqa: SIM115 - open for the server's life
    if system == "ours":
        env = {"CROSSVIT_MODEL": plan.served_variant, "CROSSVIT_WEIGHTS": str(weights), "CROSSVIT_DEVICE": plan.device,
               "CROSSVIT_BACKEND": "torch", "CROSSVIT_PRECISION": plan.served_mode, "CROSSVIT_PORT": str(port),
               "CROSSVIT_PROBE_PORT": str(free_port()), "CROSSVIT_MAX_BATCH_SIZE": str(plan.max_batch_size),
               "CROSSVIT_MAX_QUEUE": str(max(64, 2 * max(plan.concurrency))), "CROSSVIT_LOG_LEVEL": "warning"}
        command = [sys.executable, "-m", "service.cli"]
    else:
        env = {}
        command = [sys.executable, str(ROOT / "bench" / "litserve_server.py"), "--variant", plan.served_variant,
                   "--weights", str(weights), "--precision", plan.served_mode, "--port", str(port),
                   "--accelerator", plan.device, "--workers", "1", "--max-batch-size", str(plan.max_batch_size),
                   "--batch-timeout-ms", "5"]
    process = subprocess.Popen(command, env={**os.environ, **env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=os.setpgrp)  # its own group: stopping it stops what it started
    try:
        wait_ready(url, process)
        mode = plan.served_mode
        if system == "ours":  # every worker warmed up, then what each chose
            workers = ready_workers(url)
            mode = ",".join(sorted({f"{w.get('backend')}/{w.get('mode')}@{w.get('device')}" for w in workers}))
        classify = f"{url}/v1/classify"
        load(classify, data, min(8, max(plan.concurrency)), 2.0)  # warm-up, discarded
        return {"system": system, "mode": mode,
                "runs": [load(classify, data, c, plan.load_seconds) for c in plan.concurrency]}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


def random_weights(plan: Plan, folder: Path) -> Path:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = folder / f"{plan.served_variant}.safetensors"
    model = timm.create_model(plan.served_variant, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


# ------------------------------------------------------------------------------------------------ report


def table(data: dict[str, Any]) -> str:
    stages = data["stages"]
    lines = [f"# GPU run {data['started']}", ""]
    info = stages.get("setup", {}).get("result") or {}
    lines.append(f"device: {info.get('gpu', 'cpu (dry run)')}, driver {info.get('driver', '-')}, "
                 f"torch {info.get('torch')}, CUDA {info.get('cuda')}, {info.get('cpus')} CPUs")
    tests = stages.get("tests", {}).get("result") or {}
    lines += ["", f"gpu tests: {tests.get('summary', stages.get('tests'))}", ""]
    model_rows = stages.get("model", {}).get("result") or []
    if model_rows:
        lines += ["| variant | mode | compiled | batch | img/s | guard cosine |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['mode']} | {'yes' if r['compiled'] else ''} | {r['batch']} | "
                  f"{r['img_s']} | {r['guard_cosine']} |" for r in model_rows]
    pre = stages.get("preprocess", {}).get("result")
    if pre:
        lines += ["", f"CPU preprocessing (640x480 JPEG): {pre['img_s']} img/s on {pre['cores']} cores "
                      f"({pre['per_core_img_s']} per core)"]
    plan = data.get("plan", {})
    ceiling = next((r["img_s"] for r in model_rows if r["variant"] == plan.get("served_variant")
                    and r["mode"] == plan.get("served_mode") and r["batch"] == plan.get("max_batch_size")
                    and not r["compiled"]), None)
    runs = {system: {r["c"]: r for r in (stages.get(f"served-{system}", {}).get("result") or {}).get("runs", [])}
            for system in ("ours", "litserve")}
    for system in ("ours", "litserve"):
        result = stages.get(f"served-{system}", {}).get("result")
        if not result:
            continue
        batch = plan.get("max_batch_size")
        lines += ["", f"{system} ({result['mode']}; model-only at batch {batch}: {ceiling} img/s):",
                  "", "| c | img/s | p50 ms | p99 ms | non-200 | served / model-only | ours / LitServe |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["runs"]:
            peer = runs["litserve"].get(r["c"], {}).get("img_s")
            ratio = f"{r['img_s'] / ceiling:.2f}" if ceiling else "-"
            versus = f"{runs['ours'][r['c']]['img_s'] / peer:.2f}" if peer and r["c"] in runs["ours"] else "-"
            lines.append(f"| {r['c']} | {r['img_s']} | {r.get('p50_ms', '-')} | {r.get('p99_ms', '-')} | "
                         f"{r['non_200']} | {ratio} | {versus} |")
    failed = {name: s.get("error") or s.get("skipped") for name, s in stages.items() if "result" not in s}
    if failed:
        lines += ["", "not measured: " + "; ".join(f"{k}: {v}" for k, v in failed.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("results", type=Path)
    parser.add_argument("--carry", type=Path, default=ROOT / "bench" / "gpu" / "carry")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny")
    parser.add_argument("--budget-s", type=float, default=450.0)
    args = parser.parse_args(argv)
    plan = Plan.for_run(args.dry_run)
    results = Results(args.results, args.budget_s)
    results.data["plan"] = asdict(plan)
    info = results.stage("setup", lambda: setup(args.carry if args.carry.is_dir() else None, args.results), 0)
    if info is None:
        print(table(results.data))
        return 1
    results.stage("tests", gpu_tests, 60)
    results.stage("model", lambda: model_only(plan), 120)
    data = jpeg_640x480()
    results.stage("preprocess", lambda: preprocess_rate(plan, data), 10)
    weights = random_weights(plan, args.results)
    for system in ("ours", "litserve"):
        needs = len(plan.concurrency) * plan.load_seconds + 45
        results.stage(f"served-{system}", lambda s=system: served(s, plan, weights, data, args.results), needs)
    text = table(results.data)
    (args.results / "table.md").write_text(text)
    print(text)
    return 0 if all("result" in s for s in results.data["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
