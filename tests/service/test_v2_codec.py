"""The binary tensor data extension against the clients' own serialisers (tritonclient, KServe)."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import serialize_byte_tensor

from service.api.v2 import codec
from service.errors import BadRequestError

ELEMENTS = [b"\xff\xd8jpeg bytes", b"", b"\x00" * 7]


def test_bytes_tensor_reads_what_tritonclient_writes() -> None:
    wire = serialize_byte_tensor(np.array(ELEMENTS, dtype=np.object_)).item()
    assert codec.decode_bytes(wire, 3, "image") == ELEMENTS
    assert codec.encode_bytes(ELEMENTS) == wire


@pytest.mark.parametrize(
    ("wire", "count", "problem"),
    [
        (b"\x05\x00\x00\x00abc", 1, "declares 5 bytes but 3 remain"),
        (b"\x01\x00", 1, "truncated 4-byte length"),
        (codec.encode_bytes([b"a", b"b"]), 1, "more than the 1 element"),
        (codec.encode_bytes([b"a"]), 2, "holds 1 element(s); its shape gives 2"),
        (b"\xff\xff\xff\xff", 1, "declares 4294967295 bytes but 0 remain"),
    ],
    ids=["overlong", "truncated-length", "extra-element", "missing-element", "huge-length"],
)
def test_malformed_bytes_tensors_are_400(wire: bytes, count: int, problem: str) -> None:
    with pytest.raises(BadRequestError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        codec.decode_bytes(wire, count, "image")


@pytest.mark.parametrize(
    ("header", "problem"),
    [("abc", "must be the JSON header's length"), ("-3", "must be the JSON header's length"),
     ("0", "raw binary body"), ("99", "the body has only 10 bytes"), ("1e3", "must be the JSON header's length")],
)
def test_bad_header_lengths_are_400(header: str, problem: str) -> None:
    with pytest.raises(BadRequestError, match=problem):
        codec.split_body(b"{}" + b"x" * 8, header)


def test_split_body_and_tensors() -> None:
    assert codec.split_body(b'{"a":1}', None) == (b'{"a":1}', b"")
    assert codec.split_body(b'{"a":1}tail', "7") == (b'{"a":1}', b"tail")
    assert codec.split_tensors(b"abcdef", [2, None, 4]) == [b"ab", None, b"cdef"]
    with pytest.raises(BadRequestError, match="add up to 5 bytes but 6 bytes follow"):
        codec.split_tensors(b"abcdef", [5])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_responses_parse_in_tritonclient_and_kserve(binary: bool) -> None:
    from kserve import InferResponse

    logits = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    classes = [b"0.5:1:tench, Tinca tinca", b"0.25:2:goldfish"]
    outputs = [codec.OutputTensor("logits", "FP32", [2, 3], logits, binary),
               codec.OutputTensor("classes", "BYTES", [2, 1], classes, binary)]
    header = {"model_name": "m", "model_version": "1", "id": "r1"}
    body, json_length = codec.encode_response(header, outputs)
    assert (json_length is not None) == binary
    parsed = triton.InferResult.from_response_body(body, header_length=json_length)
    np.testing.assert_array_equal(parsed.as_numpy("logits"), logits)
    got = parsed.as_numpy("classes").reshape(-1).tolist()
    assert [c if binary else c.encode() for c in got] == classes  # JSON BYTES come back as str
    response = InferResponse.from_bytes(body, json_length or len(body))
    np.testing.assert_array_equal(response.outputs[0].as_numpy(), logits)
