"""The binary tensor data extension: a JSON header followed by raw tensors, in both directions.

Layout as tritonclient writes and reads it (Triton's docs/protocol/extension_binary_data.md): the
body is the JSON object (`Inference-Header-Content-Length` bytes) followed by the binary tensors,
in the order of the inputs (outputs) whose parameters carry `binary_data_size`; little-endian,
row-major, no padding; a BYTES element is a 4-byte little-endian length, then its bytes.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import BadRequestError

__all__ = [
    "HEADER_LENGTH", "OutputTensor", "decode_bytes", "encode_bytes", "encode_response", "malformed", "split_body",
    "split_tensors",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
_DIGITS = re.compile(r"[0-9]{1,19}")
_LENGTH = struct.Struct("<I")


def malformed(message: str) -> BadRequestError:
    return BadRequestError(message, code="invalid_binary_data")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary part); without the header the whole body is JSON."""
    if header_length is None:
        return body, b""
    if not _DIGITS.fullmatch(header_length.strip()):
        raise malformed(f"{HEADER_LENGTH} must be the JSON header's length in bytes, got {header_length!r}")
    length = int(header_length)
    if length == 0:
        raise malformed(f"{HEADER_LENGTH}: 0 (a raw binary body) is not supported; send the JSON header first")
    if length > len(body):
        raise malformed(f"{HEADER_LENGTH} is {length} but the body has only {len(body)} bytes")
    return body[:length], body[length:]


def split_tensors(binary: bytes, sizes: Sequence[int | None]) -> list[bytes | None]:
    """Each input's binary data, in order (None where it came as JSON); the sizes must cover the part exactly."""
    total = sum(size for size in sizes if size is not None)
    if total != len(binary):
        raise malformed(
            f"the inputs' binary_data_size add up to {total} bytes but {len(binary)} bytes follow the JSON header"
        )
    parts: list[bytes | None] = []
    offset = 0
    for size in sizes:
        if size is None:
            parts.append(None)
        else:
            parts.append(binary[offset:offset + size])
            offset += size
    return parts


def decode_bytes(data: bytes, count: int, name: str) -> list[bytes]:
    """The `count` elements of a binary BYTES tensor; lengths that run past the data are refused."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(data):
        if len(elements) == count:
            raise malformed(f"input '{name}' holds more than the {count} element(s) its shape gives")
        if offset + _LENGTH.size > len(data):
            raise malformed(f"input '{name}': element {len(elements)} has a truncated 4-byte length")
        (size,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if size > len(data) - offset:
            raise malformed(
                f"input '{name}': element {len(elements)} declares {size} bytes but {len(data) - offset} remain"
            )
        elements.append(data[offset:offset + size])
        offset += size
    if len(elements) != count:
        raise malformed(f"input '{name}' holds {len(elements)} element(s); its shape gives {count}")
    return elements


def encode_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


@dataclass(frozen=True)
class OutputTensor:
    """One response output: FP32 values (an array) or BYTES elements, sent as JSON or as binary."""

    name: str
    datatype: str  # "FP32" or "BYTES"
    shape: list[int]
    values: np.ndarray[Any, np.dtype[np.float32]] | list[bytes]
    binary: bool

    def raw(self) -> bytes:
        if isinstance(self.values, np.ndarray):
            return self.values.astype("<f4", copy=False).tobytes()
        return encode_bytes(self.values)

    def data(self) -> list[Any]:
        """Row-major and flat, as the protocol allows."""
        if isinstance(self.values, np.ndarray):
            return self.values.reshape(-1).tolist()
        return [v.decode() for v in self.values]


def encode_response(header: dict[str, Any], outputs: Sequence[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.binary:
            chunks.append(out.raw())
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = out.data()
        described.append(entry)
    text = json.dumps({**header, "outputs": described}, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)
