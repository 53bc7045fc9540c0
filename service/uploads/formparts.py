"""multipart/form-data read as it streams: file parts named `images` kept in memory, counted as they begin.

Starlette's form parser buffers nothing up front but spools every part to temporary files and
counts only files of any name; this collector keeps exactly the bytes of the image parts (one copy
of the body, never more), refuses the part past the image limit as soon as its headers arrive, and
tells a complete body (ending with the closing boundary) from a cut-off one.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from ..errors import BadRequestError, too_many_images

__all__ = ["FIELD", "FormImages", "Part"]

FIELD = "images"
MAX_HEADER_BYTES = 16 * 1024  # per part: names and filenames, not data


MAX_OTHER_PARTS = 64  # parts besides the images a body may carry (Starlette's own parser stops at 1000)


def _invalid(message: str) -> BadRequestError:
    return BadRequestError(f"malformed multipart body: {message}", code="invalid_multipart")


class Part:
    __slots__ = ("data", "filename")

    def __init__(self, filename: str | None) -> None:
        self.filename = filename
        self.data = bytearray()


class FormImages:
    """Feed it the body's chunks, then `finish()`; raises as soon as the body goes wrong."""

    def __init__(self, content_type: str, max_images: int) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise _invalid("no boundary in the Content-Type")
        self._max_images = max_images
        self.images: list[Part] = []
        self.fields: set[str] = set()  # every part's name, for the error that finds no images
        self._parts = 0
        # other fields are skipped, but each costs parser callbacks on the event loop (and a name here)
        self._max_parts = max_images + MAX_OTHER_PARTS
        self._current: Part | None = None  # the image part being read; None for a part that is skipped
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._header_bytes = 0
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        })

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._max_parts:
            raise _invalid(f"more than {self._max_parts} parts; only '{FIELD}' file parts are read")
        self._current = None
        self._disposition = b""
        self._header_bytes = 0

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]
        self._grow_headers(end - start)

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._grow_headers(end - start)

    def _grow_headers(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _invalid(f"a part's headers are over {MAX_HEADER_BYTES} bytes")

    def _on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise _invalid('the Content-Disposition header field "name" must be provided')
        name = options[b"name"].decode("utf-8", "replace")
        self.fields.add(name)
        if name != FIELD:
            return  # another field: its data is skipped, never stored
        if b"filename" not in options:
            raise _invalid(f"multipart field '{FIELD}' must be a file part, got a text field")
        if len(self.images) >= self._max_images:
            raise too_many_images(self._max_images)
        self._current = Part(options[b"filename"].decode("utf-8", "replace"))
        self.images.append(self._current)

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.data += data[start:end]

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise _invalid(str(exc)) from None

    def finish(self) -> list[Part]:
        """The image parts, once the body has ended; a body without its closing boundary is refused."""
        if self._parser.state is not MultipartState.END:
            raise _invalid("no closing boundary")
        if not self.images:
            raise BadRequestError(
                f"no file parts named '{FIELD}' in the multipart body (fields seen: {sorted(self.fields)})",
                code="no_images",
            )
        return self.images
