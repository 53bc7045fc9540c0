"""A local stand-in for the Hugging Face hub and for plain release downloads, for tests.

`hf_hub_download` first sends HEAD to `{HF_ENDPOINT}/{repo_id}/resolve/{revision}/{filename}` and
needs, on a 200: `X-Repo-Commit` (the commit the revision points at; without it huggingface_hub
decides the endpoint is not a hub), an `ETag` (or `X-Linked-Etag`; the blob's name in the cache,
the sha256 for LFS files) and `Content-Length` (or `X-Linked-Size`; checked against the bytes
the GET delivers). No `X-Xet-Hash`, so the plain HTTP GET path is taken. A 404 carries
`X-Error-Code: RepoNotFound` or `EntryNotFound`, which huggingface_hub turns into its error types.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__all__ = ["COMMIT", "hub_headers", "official_pth", "serve_files", "serve_hub", "timm_safetensors", "unreachable_url"]

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40 hex digits


def hub_headers(data: bytes, commit: str = COMMIT) -> dict[str, str]:
    """What the hub answers for an LFS file: the headers hf_hub_download relies on."""
    sha256 = hashlib.sha256(data).hexdigest()
    return {
        "X-Repo-Commit": commit,
        "ETag": f'"{sha256}"',
        "X-Linked-Etag": f'"{sha256}"',
        "X-Linked-Size": str(len(data)),
        "Content-Type": "application/octet-stream",
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins every handler thread: no socket outlives the block

    def __init__(self, routes: Mapping[str, tuple[bytes, Mapping[str, str]]], repos: frozenset[str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.repos = repos


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection, so handler threads end with their response

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, *, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        route = self.server.routes.get(path)
        if route is None:
            repo, found, _ = path.lstrip("/").partition("/resolve/")
            code = "EntryNotFound" if found and repo in self.server.repos else "RepoNotFound"
            body, headers = b"not found", {"X-Error-Code": code, "X-Error-Message": f"{path} not found"}
            self.send_response(404)
        else:
            body, headers = route
            self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _serve(routes: Mapping[str, tuple[bytes, Mapping[str, str]]], repos: frozenset[str] = frozenset()) -> Iterator[str]:
    server = _Server(routes, repos)  # bound and listening here, before any client can try
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def serve_hub(
    files: dict[str, bytes], repo_id: str, *, revision: str = "main", extra: Mapping[str, bytes] | None = None
) -> Iterator[str]:
    """Serve `files` as `repo_id` at `revision` in the hub's URL layout; yields the base URL for HF_ENDPOINT.

    `extra` maps plain URL paths to bodies (e.g. an official release's `.pth`) on the same server.
    """
    routes = {f"/{repo_id}/resolve/{revision}/{name}": (data, hub_headers(data)) for name, data in files.items()}
    routes |= _plain_routes(extra or {})
    with _serve(routes, frozenset({repo_id})) as url:
        yield url


@contextmanager
def serve_files(files: Mapping[str, bytes]) -> Iterator[str]:
    """Serve plain files by URL path (e.g. a release's `/download/v1/model.pth`); yields the base URL."""
    with _serve(_plain_routes(files)) as url:
        yield url


def _plain_routes(files: Mapping[str, bytes]) -> dict[str, tuple[bytes, Mapping[str, str]]]:
    headers = {"Content-Type": "application/octet-stream"}
    return {"/" + path.lstrip("/"): (data, headers) for path, data in files.items()}


@contextmanager
def unreachable_url() -> Iterator[str]:
    """A 127.0.0.1 URL whose port is bound but not listening: connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def timm_safetensors(name: str = "crossvit_tiny_240") -> bytes:
    """A timm-made checkpoint (random init) as safetensors bytes, the layout the hub's timm repos hold."""
    import timm
    from safetensors.torch import save

    model = timm.create_model(name, pretrained=False)
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def official_pth(state_bytes: bytes) -> bytes:
    """The same weights in the official IBM layout (`pos_embed.0`, `cls_token.0`), as a `.pth` file's bytes."""
    import torch
    from safetensors.torch import load

    state = load(state_bytes)
    official = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save(official, buffer)
    return buffer.getvalue()
