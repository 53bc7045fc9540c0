"""bench/gpu/run.py, the script a lent GPU machine runs, dry-run here on the CPU with tiny sizes so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_script_runs_every_stage_on_the_cpu(tmp_path: Path) -> None:
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "run.py"), str(results), "--dry-run",
                           "--carry", str(tmp_path / "no-carry")], capture_output=True, text=True, timeout=400,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((results / "results.json").read_text())
    stages = data["stages"]
    assert list(stages) == ["setup", "tests", "model", "preprocess", "served-ours", "served-litserve"]
    assert all("result" in stage for stage in stages.values()), {k: v for k, v in stages.items() if "result" not in v}
    assert stages["tests"]["result"]["returncode"] in (0, 5), stages["tests"]  # gpu tests: skipped on the CPU
    rows = stages["model"]["result"]
    assert {(r["mode"], r["compiled"]) for r in rows} == {("fp32", False), ("bf16", False), ("fp32", True)}
    assert all(r["img_s"] > 0 and 0.99 < r["guard_cosine"] <= 1.0 + 1e-6 for r in rows)
    for system in ("ours", "litserve"):
        runs = stages[f"served-{system}"]["result"]["runs"]
        assert [r["c"] for r in runs] == [1, 2] and all(r["img_s"] > 0 and r["non_200"] == 0 for r in runs), runs
    assert "torch/fp32@cpu" in stages["served-ours"]["result"]["mode"]
    table = (results / "table.md").read_text()
    assert "| c | img/s |" in table and "served / model-only" in table and "not measured" not in table
