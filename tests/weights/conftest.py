"""Checkpoints made by timm (random init) for the fake hub, and a runner for the `crossvit-weights` script."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from hubserver import official_pth, timm_safetensors

TINY = "crossvit_tiny_240"  # the smallest published variant: a 28 MB checkpoint
TINY_REPO = "timm/crossvit_tiny_240.in1k"
TINY_OFFICIAL = "crossvit_tiny_224.pth"

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def tiny_safetensors() -> bytes:
    return timm_safetensors(TINY)


@pytest.fixture(scope="session")
def tiny_official(tiny_safetensors: bytes) -> bytes:
    return official_pth(tiny_safetensors)


def _command() -> list[str]:
    script = Path(sys.executable).with_name("crossvit-weights")  # the installed console script
    return [str(script)] if script.is_file() else [sys.executable, "-m", "weights.cli"]


@pytest.fixture
def run_cli(tmp_path: Path) -> RunCli:
    """Run `crossvit-weights ARGS` in a subprocess with a clean HF/CROSSVIT environment plus `env`.

    huggingface_hub reads HF_ENDPOINT at import, so pointing it at the fake hub needs a new process.
    """

    def run(args: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CROSSVIT_"))}
        clean |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
        return subprocess.run(
            [*_command(), *args], env=clean, capture_output=True, text=True, timeout=120, check=False
        )

    return run
