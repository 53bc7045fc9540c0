"""`Client` and `AsyncClient`: classify images over HTTP with typed results.

Both read the server's limits from /v1/models once, split the images into requests that fit,
retry 503 and lost connections (never a 4xx), and map every index back to the caller's list.
The request plans are generators shared by both clients, so sync and async behave the same.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from .batching import Limits, plan_batches
from .errors import APIError, ClientError, ImageReadError, UnreachableError
from .retry import RetryEvent, RetryPolicy
from .wire import ClassifyResponse, ImageResultModel, ModelCard

__all__ = ["AsyncClient", "Client", "ImageInput", "Outcome"]

ImageInput = str | os.PathLike[str] | bytes  # a path, or the encoded image itself
Outcome = ImageResultModel | ClientError  # per image, from classify_each
PER_IMAGE_STATUSES = frozenset({413, 415, 422})  # a refusal that one image can cause
DEFAULT_URL = "http://127.0.0.1:8000"

T = TypeVar("T")
Reply = ClassifyResponse | ClientError
Plan = Generator[list["_Part"], Reply, T]


@dataclass(frozen=True)
class _Part:
    index: int  # in the caller's list
    filename: str
    source: Path | bytes

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size

    def read(self, position: int) -> bytes:
        if isinstance(self.source, bytes):
            return self.source
        try:
            return self.source.read_bytes()
        except OSError as exc:
            raise ImageReadError(f"cannot read {self.source}: {exc.strerror or exc}", index=position) from None


def _parts(images: Sequence[ImageInput]) -> list[_Part]:
    if isinstance(images, (str, bytes, os.PathLike)):
        raise TypeError("pass a list of images, e.g. classify([path])")
    return [
        _Part(i, "image", image) if isinstance(image, bytes) else _Part(i, Path(image).name, Path(image))
        for i, image in enumerate(images)
    ]


def _sizes(parts: list[_Part]) -> list[tuple[str, int]]:
    sizes = []
    for part in parts:
        try:
            sizes.append((part.filename, part.size))
        except OSError:
            sizes.append((part.filename, 0))  # reading it fails later, as that image's own error
    return sizes


def _adopt(part: _Part, result: ImageResultModel) -> ImageResultModel:
    """A result with the caller's index (and no invented filename for bytes)."""
    filename = None if isinstance(part.source, bytes) else result.filename
    return result.model_copy(update={"index": part.index, "filename": filename})


def _blame(batch: list[_Part], error: ClientError) -> _Part | None:
    """The image of `batch` the error names, re-indexed to the caller's list; None if no one image."""
    if error.index is None or not 0 <= error.index < len(batch):
        return None
    part = batch[error.index]
    error.index = part.index
    return part


def _plan_all(parts: list[_Part], limits: Limits) -> Plan[list[ImageResultModel]]:
    """Every image's result, or the first error (with the caller's index)."""
    results: list[ImageResultModel] = []
    for indices in plan_batches(_sizes(parts), limits):
        batch = [parts[i] for i in indices]
        reply = yield batch
        if isinstance(reply, ClientError):
            _blame(batch, reply)
            raise reply
        results.extend(_adopt(p, r) for p, r in zip(batch, reply.results, strict=True))
    return results


def _plan_each(parts: list[_Part], limits: Limits) -> Plan[list[Outcome]]:
    """Every image's result or its own error: a refused image is taken out and the rest resent.

    The server fails a request as a whole and names the image at fault; a refusal that names no
    image (413 for the whole body) splits the request in two until it does or the image is alone.
    """
    outcomes: dict[int, Outcome] = {}
    pending = deque([parts[i] for i in indices] for indices in plan_batches(_sizes(parts), limits))
    while pending:
        batch = pending.popleft()
        reply = yield batch
        if isinstance(reply, ClassifyResponse):
            outcomes.update((p.index, _adopt(p, r)) for p, r in zip(batch, reply.results, strict=True))
            continue
        if isinstance(reply, APIError) and reply.status not in PER_IMAGE_STATUSES:
            raise reply  # not about one image (401, 404, 503 after retries, ...): the same for all
        if (culprit := _blame(batch, reply)) is not None:
            outcomes[culprit.index] = reply
            rest = [p for p in batch if p is not culprit]
            if rest:
                pending.appendleft(rest)
        elif len(batch) == 1:
            reply.index = batch[0].index
            outcomes[batch[0].index] = reply
        else:
            half = len(batch) // 2
            pending.extendleft([batch[half:], batch[:half]])  # extendleft reverses: first half first
    return [outcomes[p.index] for p in parts]


class _Base:
    def __init__(self, url: str = DEFAULT_URL, *, api_key: str | None = None, timeout_s: float = 60.0,
                 retry: RetryPolicy | None = None, on_retry: Callable[[RetryEvent], None] | None = None) -> None:
        """`on_retry` is called before each wait (a progress bar can say the server is busy)."""
        self.url = url.rstrip("/")
        self._retry = retry or RetryPolicy()
        self._on_retry = on_retry
        self._limits: Limits | None = None
        self._connect(timeout_s, {"Authorization": f"Bearer {api_key}"} if api_key else {})

    def _connect(self, timeout_s: float, headers: dict[str, str]) -> None:
        raise NotImplementedError

    def _delay_after_response(self, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before trying again after a 503, or None to keep this response."""
        if response.status_code != 503 or attempt > self._retry.retries:
            return None
        error = APIError.from_response(response)
        return self._announce(attempt, self._retry.delay(attempt, response.headers.get("retry-after")),
                              f"503 {error.code}: {error.message}")

    def _delay_after_error(self, attempt: int, exc: httpx.TransportError) -> float:
        """Seconds to wait before trying again after a lost connection; raises when out of retries."""
        reason = f"{type(exc).__name__}: {exc}"
        if attempt > self._retry.retries:
            raise UnreachableError(f"{self.url} did not answer after {attempt} attempts ({reason})") from exc
        return self._announce(attempt, self._retry.delay(attempt), reason)

    def _announce(self, attempt: int, delay: float, reason: str) -> float:
        if self._on_retry is not None:
            self._on_retry(RetryEvent(attempt, delay, reason))
        return delay

    @staticmethod
    def _files(batch: list[_Part]) -> list[tuple[str, tuple[str, bytes, str]]]:
        files = []
        for position, part in enumerate(batch):
            media_type = mimetypes.guess_type(part.filename)[0] or "application/octet-stream"
            files.append(("images", (part.filename, part.read(position), media_type)))
        return files

    @staticmethod
    def _params(top_k: int, branches: bool) -> dict[str, Any]:
        return {"top_k": top_k, "branches": "true" if branches else "false"}

    @staticmethod
    def _reply(response: httpx.Response) -> Reply:
        if response.status_code == 200:
            return ClassifyResponse.model_validate_json(response.content)
        return APIError.from_response(response)

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        if response.status_code != 200:
            raise APIError.from_response(response)
        return response.json()


class Client(_Base):
    """Synchronous client. `with Client(url, api_key=...) as c: c.classify(["cat.jpg"])`."""

    def _connect(self, timeout_s: float, headers: dict[str, str]) -> None:
        self._http = httpx.Client(timeout=timeout_s, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(method, self.url + path, **kwargs)
            except httpx.TransportError as exc:
                delay = self._delay_after_error(attempt, exc)
            else:
                if (retry_in := self._delay_after_response(attempt, response)) is None:
                    return response
                delay = retry_in
            time.sleep(delay)

    def models(self) -> ModelCard:
        """The server's /v1/models: model, weights, workers, batching and request limits."""
        return ModelCard.model_validate(self._json(self._request("GET", "/v1/models")))

    def limits(self) -> Limits:
        if self._limits is None:
            self._limits = Limits.from_model_card(self.models().limits)
        return self._limits

    def classify(self, images: Sequence[ImageInput], *, top_k: int = 5, branches: bool = False
                 ) -> list[ImageResultModel]:
        """One result per image, in order; raises the first error (`.index` names the image)."""
        return self._drive(_plan_all(_parts(images), self.limits()), top_k, branches)

    def classify_each(self, images: Sequence[ImageInput], *, top_k: int = 5, branches: bool = False
                      ) -> list[Outcome]:
        """Per image its result or its own `ClientError`; raises only errors that concern every image."""
        return self._drive(_plan_each(_parts(images), self.limits()), top_k, branches)

    def _drive(self, plan: Plan[T], top_k: int, branches: bool) -> T:
        try:
            batch = next(plan)
            while True:
                batch = plan.send(self._send(batch, top_k, branches))
        except StopIteration as done:
            return done.value

    def _send(self, batch: list[_Part], top_k: int, branches: bool) -> Reply:
        try:
            files = self._files(batch)
        except ImageReadError as exc:
            return exc
        return self._reply(self._request("POST", "/v1/classify", files=files, params=self._params(top_k, branches)))


class AsyncClient(_Base):
    """Asynchronous client. `async with AsyncClient(url) as c: await c.classify(["cat.jpg"])`."""

    def _connect(self, timeout_s: float, headers: dict[str, str]) -> None:
        self._http = httpx.AsyncClient(timeout=timeout_s, headers=headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(method, self.url + path, **kwargs)
            except httpx.TransportError as exc:
                delay = self._delay_after_error(attempt, exc)
            else:
                if (retry_in := self._delay_after_response(attempt, response)) is None:
                    return response
                delay = retry_in
            await asyncio.sleep(delay)

    async def models(self) -> ModelCard:
        return ModelCard.model_validate(self._json(await self._request("GET", "/v1/models")))

    async def limits(self) -> Limits:
        if self._limits is None:
            self._limits = Limits.from_model_card((await self.models()).limits)
        return self._limits

    async def classify(self, images: Sequence[ImageInput], *, top_k: int = 5, branches: bool = False
                       ) -> list[ImageResultModel]:
        return await self._drive(_plan_all(_parts(images), await self.limits()), top_k, branches)

    async def classify_each(self, images: Sequence[ImageInput], *, top_k: int = 5, branches: bool = False
                            ) -> list[Outcome]:
        return await self._drive(_plan_each(_parts(images), await self.limits()), top_k, branches)

    async def _drive(self, plan: Plan[T], top_k: int, branches: bool) -> T:
        try:
            batch = next(plan)
            while True:
                batch = plan.send(await self._send(batch, top_k, branches))
        except StopIteration as done:
            return done.value

    async def _send(self, batch: list[_Part], top_k: int, branches: bool) -> Reply:
        try:
            files = await asyncio.to_thread(self._files, batch)
        except ImageReadError as exc:
            return exc
        response = await self._request("POST", "/v1/classify", files=files, params=self._params(top_k, branches))
        return self._reply(response)
