"""`crossvit-serve`: flags -> Settings -> logging (once) -> uvicorn, with a draining SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import sys
import time
from types import FrameType
from typing import NoReturn

import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from .api.connections import ConnectionLimits, guarded_protocol
from .api.probes import ProbeServer
from .app import WORKER_STOP_TIMEOUT_S, create_app
from .inference.assembly import prepare
from .inference.engine import Engine
from .logs import configure_logging
from .settings import ENV_PREFIX, Settings, describe_validation_error

__all__ = ["main", "uvicorn_config"]

logger = logging.getLogger(__name__)

# Flags for the main settings; every setting is also a CROSSVIT_* environment variable.
_FLAGS: dict[str, dict[str, object]] = {
    "model": {"help": "variant, e.g. crossvit_18_dagger_240"},
    "weights": {"help": "checkpoint file or directory"},
    "device": {"help": "auto, cpu, cuda or cuda:N"},
    "precision": {"help": "auto, fp32, bf16 or fp16"},
    "workers": {"help": "worker processes per device, or auto"},
    "max_batch_size": {"type": int},
    "max_batch_delay_ms": {"type": float},
    "max_queue": {"type": int},
    "host": {},
    "port": {"type": int},
    "log_level": {},
    "log_format": {"help": "json or text"},
}


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: readiness flips to 503 and new work is refused while the listener stays
    open, accepted requests finish, then uvicorn shuts down. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._shutdown_timeout_s = shutdown_timeout_s
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        engine: Engine | None = getattr(self._app.state, "engine", None)
        if self._drain_task is not None:
            self._exit_now(sig)
        if engine is None:
            super().handle_exit(sig, frame)
            return
        logger.info("shutdown signal: draining", extra={"signal": sig, "timeout_s": self._shutdown_timeout_s})
        engine.begin_drain()
        loop = asyncio.get_running_loop()  # signal handlers run on the loop's (main) thread
        self._drain_task = loop.create_task(self._drain(engine))
        loop.call_soon_threadsafe(lambda: None)  # wake the loop's select for the new task

    @staticmethod
    def _exit_now(sig: int) -> NoReturn:
        """The second signal: the operator wants out now, not after the drain or uvicorn's graceful wait."""
        logger.warning("second shutdown signal: exiting now; requests in flight are abandoned", extra={"signal": sig})
        for child in multiprocessing.active_children():  # the workers: a stopped or busy one must not linger
            child.kill()
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(128 + sig)

    async def _drain(self, engine: Engine) -> None:
        started = time.monotonic()
        # leave time for uvicorn to close connections and for the workers to stop
        budget = max(0.5, self._shutdown_timeout_s - WORKER_STOP_TIMEOUT_S - 1.0)
        finished = await engine.wait_idle(budget)
        logger.info("drained" if finished else "drain timed out; stopping anyway",
                    extra={"drain_s": round(time.monotonic() - started, 3)})
        self.should_exit = True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossvit-serve",
        description=f"Serve CrossViT over HTTP. Every setting is also an environment variable {ENV_PREFIX}<NAME>.",
    )
    for name, options in _FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **options)  # type: ignore[arg-type]
    parser.add_argument("--allow-random-weights", action="store_true", default=None)
    parser.add_argument("--prepare-only", action="store_true",
                        help="resolve the weights and fill the converted-model cache (CACHE_DIR), then exit: "
                             "for image builds and init containers")
    parser.add_argument("--self-test", action="store_true",
                        help="ask the server running with these settings (HOST, PORT, API_KEYS) to run its self-test "
                             "on the golden images now; prints the report; exit 0 passed, 1 failed, 2 not run "
                             "(no answer, or refused: a wrong key, no worker ready)")
    return parser


def self_test(settings: Settings) -> int:
    """POST /v1/admin/self-test to the local server: what an operator runs in a pod (kubectl exec)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}/v1/admin/self-test"
    headers = {"Authorization": f"Bearer {settings.api_keys[0].get_secret_value()}"} if settings.api_keys else {}
    try:
        response = httpx.post(url, headers=headers, timeout=600)  # up to 30 s per busy worker
    except httpx.HTTPError as exc:
        sys.stderr.write(f"no answer from {url}: {exc}\n")
        return 2
    try:
        report = response.json()
    except ValueError:
        report = {"status": response.status_code, "body": response.text[:500]}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0 if response.status_code == 200 and report.get("passed") else 1 if response.status_code == 200 else 2


def _warn_unknown_env(settings_fields: set[str]) -> None:
    # Not fatal: Kubernetes injects <SERVICE>_PORT-style variables that may share the prefix.
    unknown = sorted(
        k for k in os.environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() not in settings_fields
    )
    if unknown:
        logger.warning("ignoring environment variables that are not settings", extra={"names": unknown})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prepare_only, check = args.prepare_only, args.self_test
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("prepare_only", "self_test")}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        sys.stderr.write(describe_validation_error(exc) + "\n")
        return 2
    configure_logging(settings.log_level, settings.log_format)
    _warn_unknown_env(set(Settings.model_fields))
    if prepare_only:
        return prepare(settings)
    if check:
        return self_test(settings)
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app, settings.shutdown_timeout_s)
    probes = ProbeServer(app, app.state.metrics, settings.host, settings.probe_port) if settings.probe_port else None
    if probes is not None:
        probes.start()  # liveness answers from the first second, while the model loads
    try:
        server.run()
    finally:
        if probes is not None:
            probes.stop()
    if not server.started:
        logger.error("the service did not start; see the errors above")
        return 3
    return 0


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """How uvicorn serves the app: our logging, our access lines, and deliberate limits."""
    limits = ConnectionLimits(settings.limit_concurrency, settings.head_timeout_s, settings.max_head_bytes)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # logging is ours (configure_logging)
        access_log=False,  # the app writes one access line per request
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s)),
        # connections capped, request heads timed and bounded (service/api/connections.py): uvicorn's own
        # limit_concurrency would answer the probes 503 too
        http=guarded_protocol(limits),
        limit_concurrency=None,
        timeout_keep_alive=settings.keep_alive_timeout_s,
    )


if __name__ == "__main__":
    sys.exit(main())
