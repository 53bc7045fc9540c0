"""Prometheus collectors in a per-app registry (no global state, so apps and tests stay apart)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Metrics:
    """Every metric the service exports; the names are part of the contract (HPA, dashboards)."""

    max_batch_size: int
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "crossvit_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "crossvit_request_duration_seconds", "HTTP request latency by route", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.images = Counter("crossvit_images", "images classified", registry=r)
        self.rejected = Counter(
            "crossvit_rejected_requests", "requests refused by the engine, by reason", ["reason"], registry=r
        )
        self.queue_depth = Gauge("crossvit_queue_depth_images", "images waiting for a worker", registry=r)
        self.in_flight = Gauge("crossvit_in_flight_requests", "classify requests being served", registry=r)
        self.batch_size = Histogram(
            "crossvit_batch_size", "images per batch sent to a worker",
            buckets=tuple(float(b) for b in range(1, self.max_batch_size + 1)), registry=r,
        )
        self.queue_wait = Histogram(
            "crossvit_queue_wait_seconds", "time from enqueue to dispatch, per image",
            buckets=_STAGE_BUCKETS, registry=r,
        )
        self.preprocess = Histogram(
            "crossvit_preprocess_seconds", "decode and preprocessing time, per image",
            buckets=_STAGE_BUCKETS, registry=r,
        )
        self.inference = Histogram(
            "crossvit_inference_seconds", "worker forward time, per batch", buckets=_STAGE_BUCKETS, registry=r
        )
        self.worker_restarts = Counter("crossvit_worker_restarts", "worker processes restarted", registry=r)
        self.workers_ready = Gauge("crossvit_workers_ready", "workers that can take work", registry=r)
        self.self_tests = Counter(
            "crossvit_self_tests", "end-to-end self-tests on the golden images (each worker start, and on demand), "
            "by outcome", ["outcome"], registry=r,
        )
