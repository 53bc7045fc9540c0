"""The Open Inference Protocol (KServe v2) over REST, beside /v1: same app, engine, limits and auth."""

from __future__ import annotations

from .routes import router

__all__ = ["router"]
