"""The probe listener: /healthz, /readyz and /metrics on a port of their own, served from their own thread.

On the data plane's port, probes share the connection limit, the request-head deadlines and the event
loop with every client: a client holding a thousand idle sockets, or a slow head, made the liveness
probe fail and Kubernetes restart a healthy pod (Triton and KServe put their probes apart for the same
reason). This listener serves nothing else, so data-plane load never reaches it, and it runs its own
event loop in a thread, so it answers while the main loop is busy.

What it reports is still the main loop's: the app's lifespan beats a heartbeat on the main loop
every second (`Heartbeat`), and liveness fails when that heartbeat is older than
`STALL_AFTER_S` (a main loop that is blocked or deadlocked is not alive, whatever this thread says).
Readiness is the engine's, and not ready while the main loop stalls.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import NotReadyError, error_body
from ..metrics import Metrics

__all__ = ["STALL_AFTER_S", "Heartbeat", "ProbeServer", "create_probe_app"]

logger = logging.getLogger(__name__)

BEAT_S = 1.0
STALL_AFTER_S = 10.0  # the main loop silent this long is not alive (a Kubernetes liveness period or more)


class Heartbeat:
    """The main event loop's sign of life: `run()` on that loop stamps the time every BEAT_S."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    async def run(self) -> None:
        while True:
            self.last = time.monotonic()
            await asyncio.sleep(BEAT_S)

    def age_s(self) -> float:
        return time.monotonic() - self.last


def create_probe_app(app: FastAPI, metrics: Metrics) -> Starlette:
    """The probe routes over `app`'s state: its engine and heartbeat once its lifespan has started them."""

    def stalled() -> str | None:
        heartbeat: Heartbeat | None = getattr(app.state, "heartbeat", None)
        if heartbeat is not None and heartbeat.age_s() > STALL_AFTER_S:
            return f"the main event loop has not run for {heartbeat.age_s():.1f} s"
        return None

    async def healthz(request: Request) -> Response:
        if reason := stalled():
            return JSONResponse(error_body("event_loop_stalled", reason), status_code=503)
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        engine = getattr(app.state, "engine", None)
        try:
            if engine is None:
                raise NotReadyError("starting: the model is loading", headers={"Retry-After": "1"})
            reason = engine.require_ready()
            if late := stalled():
                raise NotReadyError(late, headers={"Retry-After": "1"})
        except NotReadyError as exc:  # no exception handlers on this small app: rendered here
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        return JSONResponse({"ready": True, "reason": reason})

    async def metrics_route(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz),
                             Route("/metrics", metrics_route)])


class ProbeServer:
    """uvicorn serving the probe app in a daemon thread: `start()` before the main server, `stop()` after."""

    def __init__(self, app: FastAPI, metrics: Metrics, host: str, port: int) -> None:
        config = uvicorn.Config(create_probe_app(app, metrics), host=host, port=port, log_config=None,
                                access_log=False, lifespan="off", limit_concurrency=64, timeout_keep_alive=5)
        self._server = uvicorn.Server(config)
        self._socket = socket.create_server((host, port), reuse_port=False)  # bound now: a taken port fails the start
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="probe-listener", daemon=True)
        self.port = int(self._socket.getsockname()[1])

    def start(self) -> None:
        self._thread.start()
        logger.info("probe listener started", extra={"port": self.port, "paths": "/healthz /readyz /metrics"})

    def stop(self, timeout_s: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()
