"""`{"images": ["<base64>", ...]}` read as it streams, counted as it arrives.

`json.loads` of a 32 MiB body of 11 M empty strings holds the event loop (and the GIL) for
seconds, and deep nesting makes it raise RecursionError. This scanner knows the one shape the
API accepts, so it never builds anything but the strings: each chunk costs a C-speed search over
its own bytes, nesting is never deeper than the array, the images are counted as their opening
quotes arrive (past the limit: refused before the rest is read), and each string is kept as raw
bytes until `strings()`, run in a thread, decodes them. Anything off the shape is 400 `invalid_json`.
"""

from __future__ import annotations

import json
import re
from enum import Enum, auto

from ..errors import BadRequestError, too_many_images
from .formparts import FIELD  # the one field name both body shapes use

__all__ = ["JsonImagesScanner"]

_SPACE = re.compile(rb"[ \t\n\r]*")
_MAX_KEY_BYTES = 64  # "images" spelt with \u escapes fits; a longer key is not it
_BOM = b"\xef\xbb\xbf"


class _State(Enum):
    START = auto()  # before '{'
    KEY_OR_END = auto()  # after '{': a key or '}'
    KEY = auto()  # after ',' in the object: a key
    KEY_TEXT = auto()  # inside a key's quotes
    COLON = auto()
    VALUE = auto()  # the value of "images": '['
    ITEM_OR_END = auto()  # after '[': a string or ']'
    ITEM = auto()  # after ',' in the array: a string
    ITEM_TEXT = auto()  # inside a string's quotes
    ITEM_NEXT = auto()  # after a string: ',' or ']'
    MEMBER_NEXT = auto()  # after the array: ',' or '}'
    DONE = auto()  # after '}': only whitespace


def _invalid(message: str) -> BadRequestError:
    return BadRequestError(message, code="invalid_json")


class JsonImagesScanner:
    """Feed it the body's chunks, then call `strings()` (CPU work: run it off the event loop)."""

    def __init__(self, max_images: int) -> None:
        self._max_images = max_images
        self._buf = bytearray()
        self._pos = 0  # next unread byte of _buf
        self._seen = 0  # bytes consumed and dropped before _buf
        self._state = _State.START
        self._text_from = 0  # where the open string's text starts, and how far its closing quote was sought
        self._search_from = 0
        self._raw: list[bytes] = []  # each image string, still JSON-escaped
        self._have_images = False
        self._started = False

    def _at(self) -> str:
        return f"at byte {self._seen + self._pos}"

    def feed(self, chunk: bytes) -> None:
        """Consume what `chunk` completes; raises as soon as the body is off the shape or over the count."""
        if not self._started:
            self._buf += chunk
            if len(self._buf) < len(_BOM) and _BOM.startswith(bytes(self._buf)):
                return  # too short to tell whether a byte-order mark begins it
            self._started = True
            if self._buf.startswith(_BOM):
                del self._buf[: len(_BOM)]
                self._seen = len(_BOM)
        else:
            self._buf += chunk
        self._advance()
        if self._pos:  # drop what was consumed (bytearray deletes from the front cheaply)
            del self._buf[: self._pos]
            self._seen += self._pos
            self._text_from -= self._pos
            self._search_from -= self._pos
            self._pos = 0

    def _next_byte(self) -> int | None:
        """The next byte after whitespace (not consumed), or None when the buffer ends first."""
        self._pos = _SPACE.match(self._buf, self._pos).end()  # type: ignore[union-attr]
        return self._buf[self._pos] if self._pos < len(self._buf) else None

    def _closing_quote(self) -> int | None:
        """Index of the open string's closing quote, or None until it arrives; each byte is searched once.

        An escaped quote is refused: neither base64 nor the one key holds one, and stepping over
        millions of them (a body of `\\"\\"...`) one Python iteration each would hold the event loop.
        """
        quote = self._buf.find(b'"', self._search_from)
        if quote == -1:
            self._search_from = len(self._buf)
            return None
        backslashes = 0
        while self._buf[quote - 1 - backslashes] == 0x5C:  # a quote after an odd run of '\' is escaped
            backslashes += 1
        if backslashes % 2:
            where = f"{FIELD}.{len(self._raw)}" if self._state is _State.ITEM_TEXT else "a key"
            raise _invalid(f"{where}: an escaped quote ({self._at()}); images are base64 strings, which have none")
        return quote

    def _open_string(self, state: _State) -> None:
        # _pos stays on the opening quote until the string closes, so that it is never dropped
        self._text_from = self._search_from = self._pos + 1
        self._state = state

    def _expect(self, byte: int | None, allowed: str) -> None:
        if byte is None:
            return
        shown = chr(byte) if 32 <= byte < 127 else f"byte 0x{byte:02x}"
        raise _invalid(f"the body is not a JSON object {{\"{FIELD}\": [\"<base64>\", ...]}}: "
                       f"expected {allowed} {self._at()}, found {shown!r}")

    def _advance(self) -> None:  # noqa: C901 - one branch per state of a small grammar
        while True:
            state = self._state
            if state in (_State.KEY_TEXT, _State.ITEM_TEXT):
                quote = self._closing_quote()
                if quote is None:
                    return
                raw = bytes(self._buf[self._text_from - 1 : quote + 1])
                self._pos = quote + 1
                if state is _State.KEY_TEXT:
                    self._key(raw)
                    self._state = _State.COLON
                else:
                    self._raw.append(raw)
                    self._state = _State.ITEM_NEXT
                continue
            byte = self._next_byte()
            if byte is None:
                return
            if state is _State.START:
                if byte != ord("{"):
                    self._expect(byte, "'{'")
                self._pos += 1
                self._state = _State.KEY_OR_END
            elif state in (_State.KEY_OR_END, _State.KEY):
                if byte == ord("}") and state is _State.KEY_OR_END:
                    self._pos += 1
                    self._state = _State.DONE
                elif byte == ord('"'):
                    self._open_string(_State.KEY_TEXT)
                else:
                    self._expect(byte, "a key" if state is _State.KEY else "a key or '}'")
            elif state is _State.COLON:
                if byte != ord(":"):
                    self._expect(byte, "':'")
                self._pos += 1
                self._state = _State.VALUE
            elif state is _State.VALUE:
                if byte != ord("["):
                    raise _invalid(f"{FIELD}: Input should be a valid list ({self._at()})")
                self._pos += 1
                self._state = _State.ITEM_OR_END
            elif state in (_State.ITEM_OR_END, _State.ITEM):
                if byte == ord("]") and state is _State.ITEM_OR_END:
                    self._pos += 1
                    self._state = _State.MEMBER_NEXT
                elif byte == ord('"'):
                    if len(self._raw) >= self._max_images:
                        raise too_many_images(self._max_images)
                    self._open_string(_State.ITEM_TEXT)
                else:
                    raise _invalid(f"{FIELD}.{len(self._raw)}: Input should be a valid string ({self._at()})")
            elif state is _State.ITEM_NEXT:
                if byte not in (ord(","), ord("]")):
                    self._expect(byte, "',' or ']'")
                self._pos += 1
                self._state = _State.ITEM if byte == ord(",") else _State.MEMBER_NEXT
            elif state is _State.MEMBER_NEXT:
                if byte not in (ord(","), ord("}")):
                    self._expect(byte, "',' or '}'")
                self._pos += 1
                self._state = _State.KEY if byte == ord(",") else _State.DONE
            else:  # DONE
                self._expect(byte, "the end of the body")

    def _key(self, raw: bytes) -> None:
        key = _decode(raw, "a key") if len(raw) <= _MAX_KEY_BYTES else None
        if key != FIELD:
            shown = key if key is not None else raw[:20].decode("utf-8", "replace") + "..."
            raise _invalid(f"{shown}: Extra inputs are not permitted (the body is {{\"{FIELD}\": [...]}})")
        if self._have_images:
            raise _invalid(f"the key '{FIELD}' appears twice")
        self._have_images = True

    def strings(self) -> list[str]:
        """The image strings, once the whole body has been fed; raises if it ended early or lacked images."""
        if not self._started and self._buf:
            self._started = True  # a body shorter than a byte-order mark
            self._advance()
        if self._state is not _State.DONE:
            if self._state is _State.START and not self._buf:
                raise _invalid("the body is not valid JSON: it is empty")
            raise _invalid(f"the body is not valid JSON: it ends early ({self._at()})")
        if not self._have_images:
            raise _invalid(f'expected {{"{FIELD}": ["<base64>", ...]}}: {FIELD}: Field required')
        return [_decode(raw, f"{FIELD}[{i}]") for i, raw in enumerate(self._raw)]


def _decode(raw: bytes, what: str) -> str:
    """One JSON string literal (quotes included) as text."""
    try:
        source = raw.decode("utf-8")
        text, end = json.decoder.scanstring(source, 1, True)  # type: ignore[attr-defined]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(f"the body is not valid JSON: {what} is not a valid string ({exc})") from None
    assert end == len(source)  # the closing quote was found by the scanner
    return str(text)
