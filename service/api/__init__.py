"""The HTTP face: /v1 (v1.py), the Open Inference Protocol (v2/), what both share (deps.py), the
per-request context (middleware.py), the OpenAPI document (openapi.py), the page (page.py, static/),
the data plane's connection guards (connections.py) and the probe listener (probes.py)."""
