"""`Settings`: every knob of the service, read from `CROSSVIT_*` environment variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# the rules live where the worker, which has no settings, reads them
from .worker.backends.base import int8_conflict, openvino_conflict

__all__ = ["ENV_PREFIX", "Settings", "describe_validation_error", "env_name", "openvino_conflict"]

ENV_PREFIX = "CROSSVIT_"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_MODE = re.compile(r"^(openvino|torch)/[a-z0-9-]+$")


class Settings(BaseSettings):
    """One frozen set of settings, made at the edge (CLI or test) and passed to `create_app`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # model and weights
    model: str = Field("crossvit_18_dagger_240", description="variant name (timm, Lucid or official alias)")
    weights: str | None = Field(None, description="checkpoint file, or a directory holding the variant's checkpoint")
    weights_dir: Path = Field(DEFAULT_WEIGHTS_DIR, description="where checkpoints are looked for and fetched to")
    fetch_weights: bool = Field(True, description="download the published checkpoint when none is present")
    weights_source: Literal["hub", "official"] = "hub"
    allow_random_weights: bool = Field(False, description="serve a randomly initialised model when no weights exist")
    labels_file: Path | None = Field(
        None, description="class names, one per line in class order (default: ImageNet-1k's); the model's self-test "
                          "record names classes with the file it was prepared with",
    )

    # devices and workers
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    backend: Literal["auto", "torch", "openvino"] = Field(
        "auto", description="auto: OpenVINO for CPU workers where installed, PyTorch for CUDA"
    )
    cache_dir: Path | None = Field(None, description="converted models; default: <weights_dir>/.cache/models")
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="auto: the fastest guarded mode (bf16 where the CPU has it, else fp32); int8 only when "
                            "asked for: quantised with NNCF on CALIBRATION_DIR and admitted by its guard",
    )
    calibration_dir: Path | None = Field(
        None, description="images INT8 is calibrated on (every third, by name, held out for its guard); default: "
                          "the package's seven photos, a smoke-test set",
    )
    workers: int | Literal["auto"] = Field("auto", description="worker processes per device")
    threads_per_worker: int | Literal["auto"] = Field("auto", description="torch threads in each CPU worker")
    preprocess_threads: int | Literal["auto"] = Field("auto", description="threads decoding images")

    # batching, queueing, deadlines
    max_batch_size: int = Field(8, ge=1, le=256)
    max_batch_delay_ms: float = Field(5.0, ge=0, le=10_000)
    max_queue: int = Field(64, ge=1, description="images waiting for a worker before 503")
    calibrate_p99_ms: float | None = Field(
        None, gt=0, description="p99 latency target: once the workers are ready, time every batch size up to "
                                "MAX_BATCH_SIZE on this hardware and take the largest batch (and its delay) that keeps "
                                "it; unset: MAX_BATCH_SIZE and MAX_BATCH_DELAY_MS as set",
    )
    request_timeout_s: float = Field(30.0, gt=0)
    shutdown_timeout_s: float = Field(25.0, gt=0, description="drain budget after SIGTERM")
    watchdog_floor_s: float = Field(
        5.0, gt=0, description="a batch, or an idle worker's ping, may always run this long before its worker is killed"
    )
    worker_start_timeout_s: float = Field(
        120.0, gt=0, description="a worker start (load, convert, compile, guard, warm-up) running longer is killed "
                                 "and restarted with backoff; cold starts measured 3-15 s (README). A conversion or "
                                 "an INT8 quantisation the worker announces starts the count again (quantising: 30 "
                                 "min)",
    )
    watchdog_multiplier: float = Field(
        10.0, ge=2, description="a batch may run this many times its expected (p99 measured) time"
    )

    self_test: bool = Field(
        True, description="a started worker takes work only once the golden images, through the served path, "
                          "reproduce the answers recorded for its weights within its mode's tolerance",
    )

    # request limits
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # at most Pillow's own bomb threshold, above which it would warn before our check runs
    max_image_pixels: int = Field(40_000_000, ge=1, le=89_478_485)
    max_images_per_request: int = Field(16, ge=1)
    upload_budget_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="body bytes read or held at once, over all requests; past it 503"
    )
    body_timeout_s: float = Field(30.0, gt=0, description="time a request body may take to arrive; past it 408")
    body_first_byte_timeout_s: float = Field(
        5.0, gt=0, description="time from the request head to the body's first byte; past it 408 (declaring a "
                               "length reserves no upload budget until a byte comes)",
    )
    body_idle_timeout_s: float = Field(
        10.0, gt=0, description="longest pause between two chunks of a body; past it 408"
    )
    limit_concurrency: int = Field(
        1024, ge=1, description="open data-plane connections; a connection past it is answered 503 and closed"
    )
    head_timeout_s: float = Field(
        10.0, gt=0, description="a request head must arrive within this of its connection opening (or of its first "
                                "byte on a kept-alive connection); past it 408 and the connection closes",
    )
    max_head_bytes: int = Field(32 * 1024, ge=4096, description="a request head over this is answered 431")
    keep_alive_timeout_s: int = Field(5, ge=1, description="an idle kept-alive connection is closed after this (s)")

    # access and operation
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="comma-separated")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    probe_port: int = Field(
        8081, ge=0, le=65535,
        description="a second listener for /healthz, /readyz and /metrics alone, which no data-plane load "
                    "reaches (Kubernetes probes and Prometheus point here); 0: none",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] = "text"

    # fault injection, for tests only
    test_abort_modes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="test only, comma-separated: a worker calls os.abort() when it starts one of these modes "
                    "(e.g. openvino/bf16), to prove that start-up survives a mode that crashes",
    )

    test_preprocess_fault: Literal["none", "bgr"] = Field(
        "none", description="test only: 'bgr' swaps the colour channels after preprocessing, on the served path, "
                            "to prove that the self-test keeps such a server unready",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("workers", "threads_per_worker", "preprocess_threads")
    @classmethod
    def _positive_or_auto(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive integer or 'auto'")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # Set but holding no key ("", ",", " ") must not quietly mean "no auth": unset it for that.
        if isinstance(value, str):
            keys = [key.strip() for key in value.split(",") if key.strip()]
            if not keys:
                raise ValueError("is set but holds no key; unset it to run without authentication")
            return keys
        return value

    @field_validator("test_abort_modes", mode="before")
    @classmethod
    def _split_modes(cls, value: object) -> object:
        if isinstance(value, str):
            return [mode.strip() for mode in value.split(",") if mode.strip()]
        return value

    @field_validator("test_abort_modes")
    @classmethod
    def _mode_names(cls, value: list[str]) -> list[str]:
        for mode in value:
            if not _MODE.match(mode):
                raise ValueError(f"{mode!r} is not a mode name like openvino/bf16 or torch/fp32")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from model.variants import resolve_name

        try:
            return resolve_name(value)
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.backend == "openvino" and (problem := openvino_conflict(self.device, self.precision)):
            raise ValueError(problem)
        if self.precision == "int8" and (problem := int8_conflict(self.backend, self.device)):
            raise ValueError(problem)
        if self.max_images_per_request > self.max_queue:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) must not exceed max_queue "
                f"({self.max_queue}), or such a request could never be admitted"
            )
        if self.upload_budget_bytes < self.max_upload_bytes:
            raise ValueError(
                f"upload_budget_bytes ({self.upload_budget_bytes}) must be at least max_upload_bytes "
                f"({self.max_upload_bytes}), or a body at the limit could never be read"
            )
        return self


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the environment variable to fix."""
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err.get("loc") else None
        name = env_name(field) if field else "settings"
        lines.append(f"invalid setting {name}: {err['msg']}")
    return "\n".join(lines)
