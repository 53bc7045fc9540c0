"""From a v2 request to what the engine takes, and from its result to the response's outputs.

Everything here is plain CPU work on bytes the route has already read; the route runs `decode`
in a thread, so a large body never blocks the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from ...errors import BadRequestError, InvalidParameterError, PayloadTooLargeError, too_many_images
from ...inference.engine import Classification, Prediction
from ...uploads.inputs import decode_base64_image
from . import codec
from .schemas import BRANCH_LOGITS, IMAGE, LOGITS, PIXELS, InferenceRequest, RequestInput

__all__ = ["MAX_ABS_PIXEL", "Decoded", "Limits", "Requested", "build_outputs", "decode"]

# A [0, 1] image normalised with ImageNet's mean and std lies within about +-2.7; far beyond it,
# float32 statistics inside the model overflow and the logits stop being numbers.
MAX_ABS_PIXEL = 100.0


@dataclass(frozen=True)
class Limits:
    max_images: int
    side: int  # branch 0's input side: pixels are (N, 3, side, side)
    num_classes: int


@dataclass(frozen=True)
class Requested:
    name: str
    binary: bool
    classification: int | None  # top-k as BYTES instead of the tensor


@dataclass(frozen=True)
class Decoded:
    """A checked request: the images (encoded files) or the pixels, and the outputs to send."""

    id: str | None
    images: list[bytes] | None
    pixels: np.ndarray | None  # (N, 3, side, side) float32
    outputs: list[Requested]

    @property
    def count(self) -> int:
        return int(self.pixels.shape[0]) if self.pixels is not None else len(self.images or [])

    @property
    def top_k(self) -> int:
        return max([o.classification or 1 for o in self.outputs] or [1])

    @property
    def branches(self) -> bool:
        return any(o.name == BRANCH_LOGITS and o.classification for o in self.outputs)


def _bad(message: str) -> BadRequestError:
    return BadRequestError(message, code="invalid_tensor")


def max_values(limits: Limits) -> int:
    """The most JSON values a request this server would serve can hold: its largest pixels tensor sent as
    JSON, and room for everything else."""
    return limits.max_images * 3 * limits.side * limits.side + 4096


def _parse(header: bytes, limits: Limits) -> InferenceRequest:
    # Parsed, each number becomes a Python float in a list (about 32 bytes for the 3-4 it took in JSON):
    # bound the count before parsing. Every value of an array but its last is followed by a comma, so
    # commas plus brackets bound the values from above (commas inside strings only overcount).
    values = header.count(b",") + header.count(b"[")
    if values > max_values(limits):
        raise PayloadTooLargeError(
            f"the inference request holds up to {values} JSON values; no request this server serves has more "
            f"than {max_values(limits)} (send pixels as binary data)", code="too_many_values",
        )
    try:
        payload = json.loads(header)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequestError(f"the inference request is not valid JSON: {exc}", code="invalid_json") from None
    try:
        return InferenceRequest.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise BadRequestError(f"malformed inference request: {problems}", code="invalid_json") from None


def _count(tensor: RequestInput, limits: Limits) -> int:
    if any(d < 0 for d in tensor.shape):
        raise _bad(f"input '{tensor.name}' has a negative dimension in shape {tensor.shape}")
    count = tensor.shape[0] if tensor.shape else 0
    if count == 0:
        raise BadRequestError(f"input '{tensor.name}' holds no images (shape {tensor.shape})", code="no_images")
    if count > limits.max_images:
        raise too_many_images(limits.max_images, count)
    return count


def _flat(data: list[object]) -> list[object]:
    """Nested or flat row-major data, flattened; nesting depth is bounded by the JSON parser."""
    flat: list[object] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _images(tensor: RequestInput, raw: bytes | None, limits: Limits) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise _bad(f"input '{IMAGE}' must be BYTES (encoded image files), got {tensor.datatype}")
    if len(tensor.shape) != 1:
        raise _bad(f"input '{IMAGE}' must have shape [N], got {tensor.shape}")
    count = _count(tensor, limits)
    if raw is not None:
        return codec.decode_bytes(raw, count, IMAGE)
    content_type = tensor.parameters.content_type if tensor.parameters else None
    if content_type not in (None, "base64"):
        raise _bad(f"input '{IMAGE}' as JSON holds base64 strings (content_type 'base64'), got {content_type!r}")
    elements = tensor.data or []
    if len(elements) != count:
        raise _bad(f"input '{IMAGE}' holds {len(elements)} element(s); its shape gives {count}")
    images: list[bytes] = []
    for index, element in enumerate(elements):
        if not isinstance(element, str):
            raise _bad(f"input '{IMAGE}' element {index} must be a base64 string in JSON")
        images.append(decode_base64_image(element, name=f"input '{IMAGE}' element {index}", index=index,
                                          data_uri=False))
    return images


def _pixels(tensor: RequestInput, raw: bytes | None, limits: Limits) -> np.ndarray:
    side = limits.side
    if tensor.datatype != "FP32":
        raise _bad(f"input '{PIXELS}' must be FP32, got {tensor.datatype}")
    if len(tensor.shape) != 4 or tensor.shape[1:] != [3, side, side]:
        raise _bad(f"input '{PIXELS}' must have shape [N, 3, {side}, {side}], got {tensor.shape}")
    count = _count(tensor, limits)
    expected = count * 3 * side * side
    if raw is not None:
        if len(raw) != expected * 4:
            raise codec.malformed(
                f"input '{PIXELS}' has {len(raw)} bytes of binary data; FP32 {tensor.shape} needs {expected * 4}"
            )
        values = np.frombuffer(raw, dtype="<f4").astype(np.float32)  # a copy: writable, native order
    else:
        flat = _flat(tensor.data or [])
        if len(flat) != expected:
            raise _bad(f"input '{PIXELS}' holds {len(flat)} values; shape {tensor.shape} needs {expected}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
            raise _bad(f"input '{PIXELS}' must hold numbers only")
        values = np.asarray(flat, dtype=np.float32)
    if not np.isfinite(values).all() or np.abs(values).max() > MAX_ABS_PIXEL:
        raise InvalidParameterError(
            f"input '{PIXELS}' must hold finite normalised values within +-{MAX_ABS_PIXEL:g}", code="invalid_pixels"
        )
    return values.reshape(count, 3, side, side)


def _outputs(request: InferenceRequest, limits: Limits) -> list[Requested]:
    default_binary = bool(request.parameters and request.parameters.binary_data_output)
    if not request.outputs:
        return [Requested(LOGITS, default_binary, None)]
    outputs: list[Requested] = []
    for out in request.outputs:
        if out.name not in (LOGITS, BRANCH_LOGITS):
            raise _bad(f"unknown output '{out.name}'; this model has '{LOGITS}' and '{BRANCH_LOGITS}'")
        if any(o.name == out.name for o in outputs):  # each would be built and sent again: a request's
            raise _bad(f"output '{out.name}' is asked for more than once")  # answer stays bounded
        params = out.parameters
        binary = params.binary_data if params and params.binary_data is not None else default_binary
        k = params.classification if params else None
        if k is not None and not 1 <= k <= limits.num_classes:
            raise InvalidParameterError(
                f"output '{out.name}': classification must be between 1 and {limits.num_classes}, got {k}"
            )
        outputs.append(Requested(out.name, binary, k))
    return outputs


def decode(body: bytes, header_length: str | None, limits: Limits) -> Decoded:
    """Check a whole request (framing, JSON, input, outputs) before anything is queued."""
    header, binary = codec.split_body(body, header_length)
    request = _parse(header, limits)
    if len(request.inputs) != 1:
        raise _bad(f"send exactly one input ('{IMAGE}' or '{PIXELS}'), got {len(request.inputs)}")
    sizes = [t.parameters.binary_data_size if t.parameters else None for t in request.inputs]
    (raw,) = codec.split_tensors(binary, sizes)
    (tensor,) = request.inputs
    if raw is not None and tensor.data is not None:
        raise _bad(f"input '{tensor.name}' has both JSON data and binary_data_size")
    if raw is None and tensor.data is None:
        raise _bad(f"input '{tensor.name}' has no data (neither 'data' nor binary_data_size)")
    outputs = _outputs(request, limits)
    if tensor.name == IMAGE:
        return Decoded(request.id, _images(tensor, raw, limits), None, outputs)
    if tensor.name == PIXELS:
        return Decoded(request.id, None, _pixels(tensor, raw, limits), outputs)
    raise _bad(f"unknown input '{tensor.name}'; this model takes '{IMAGE}' (BYTES [N], encoded images) "
               f"or '{PIXELS}' (FP32 [N, 3, {limits.side}, {limits.side}], normalised)")


def _classes(rows: Sequence[Sequence[Prediction]]) -> list[bytes]:
    """Triton's classification strings, "<value>:<index>:<label>", highest first; the value is the
    logit exactly as /v1 prints it (Triton's %f would round it to 6 decimals)."""
    return [f"{p.logit!r}:{p.class_id}:{p.label}".encode() for row in rows for p in row]


def build_outputs(decoded: Decoded, result: Classification) -> list[codec.OutputTensor]:
    n = result.logits.shape[0]
    tensors: list[codec.OutputTensor] = []
    for out in decoded.outputs:
        if out.classification:
            k = out.classification
            if out.name == LOGITS:
                rows: list[Sequence[Prediction]] = [r.predictions[:k] for r in result.results]
                shape = [n, k]
            else:
                rows = [b[:k] for r in result.results for b in (r.branches or [])]
                shape = [n, 2, k]
            tensors.append(codec.OutputTensor(out.name, "BYTES", shape, _classes(rows), out.binary))
            continue
        logits = result.logits.mean(axis=1) if out.name == LOGITS else result.logits  # (n, C) or (n, 2, C)
        array = logits.astype(np.float32, copy=False)
        tensors.append(codec.OutputTensor(out.name, "FP32", list(array.shape), array, out.binary))
    return tensors

