"""The v2 endpoints driven by the field's own clients (tritonclient, KServe's REST client) against the
real server, and their answers compared with /v1's for the same images on the same server."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from model.variants import get_variant
from service.imaging.preprocess import InputSpec, preprocess
from tests.conftest import TEST_VARIANT
from tests.photos import encode, photo, resized

MODEL = TEST_VARIANT
JPEG = encode(resized(photo("chelsea"), 640, 480), "JPEG", quality=90)
PNG = encode(resized(photo("coffee"), 400, 300), "PNG")


@pytest.fixture
def triton_client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.removeprefix("http://"), network_timeout=120)
    yield client
    client.close()


def _v1(server: str, images: list[bytes], top_k: int = 1000, branches: bool = False) -> list[dict[str, object]]:
    files = [("images", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    response = httpx.post(f"{server}/v1/classify", params={"top_k": top_k, "branches": branches}, files=files,
                          timeout=120)
    assert response.status_code == 200, response.text
    results: list[dict[str, object]] = response.json()["results"]
    return results


def _v1_logits(server: str, images: list[bytes]) -> np.ndarray:
    """(n, 1000) from /v1's full top-1000, put back in class order."""
    logits = np.zeros((len(images), 1000), dtype=np.float32)
    for i, result in enumerate(_v1(server, images)):
        for p in result["predictions"]:  # type: ignore[attr-defined]
            logits[i, p["class_id"]] = p["logit"]
    return logits


def _image_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    return tensor


def test_server_and_model_metadata_and_readiness(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL) and triton_client.is_model_ready(MODEL, "1")
    assert not triton_client.is_model_ready("resnet50") and not triton_client.is_model_ready(MODEL, "2")
    server = triton_client.get_server_metadata()
    assert server["name"] == "crossvit-serve"
    assert set(server["extensions"]) >= {"binary_tensor_data", "classification"}
    model = triton_client.get_model_metadata(MODEL)
    assert model == triton_client.get_model_metadata(MODEL, "1")
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in model["inputs"]} == {
        ("image", "BYTES", (-1,)), ("pixels", "FP32", (-1, 3, 240, 240))}
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in model["outputs"]} == {
        ("logits", "FP32", (-1, 1000)), ("branch_logits", "FP32", (-1, 2, 1000))}
    with pytest.raises(InferenceServerException, match="no model 'resnet50' here") as raised:
        triton_client.get_model_metadata("resnet50")
    assert raised.value.status() == "404"


def test_binary_images_in_binary_logits_out_equal_v1(triton_client: triton.InferenceServerClient, server: str) -> None:
    outputs = [triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("branch_logits")]
    result = triton_client.infer(MODEL, [_image_input([JPEG, PNG])], outputs=outputs)
    logits, branch_logits = result.as_numpy("logits"), result.as_numpy("branch_logits")
    assert logits.dtype == np.float32 and logits.shape == (2, 1000) and branch_logits.shape == (2, 2, 1000)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    np.testing.assert_allclose(logits, _v1_logits(server, [JPEG, PNG]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(branch_logits.mean(axis=1), logits, rtol=0, atol=1e-6)
    assert not np.allclose(branch_logits[:, 0], branch_logits[:, 1])  # two different heads


def test_classification_extension_is_v1s_top_k(triton_client: triton.InferenceServerClient, server: str) -> None:
    outputs = [triton.InferRequestedOutput("logits", class_count=5),
               triton.InferRequestedOutput("branch_logits", class_count=3)]
    result = triton_client.infer(MODEL, [_image_input([JPEG, PNG])], outputs=outputs)
    top5, branch_top3 = result.as_numpy("logits"), result.as_numpy("branch_logits")
    assert top5.shape == (2, 5) and branch_top3.shape == (2, 2, 3)
    v1 = _v1(server, [JPEG, PNG], top_k=5)
    v1_branches = _v1(server, [JPEG, PNG], top_k=3, branches=True)
    for i in range(2):
        rows = [s.decode().split(":", 2) for s in top5[i]]  # Triton's "<value>:<index>:<label>", highest first
        expected = v1[i]["predictions"]
        assert [(int(c), label) for _, c, label in rows] == [(p["class_id"], p["label"]) for p in expected]  # type: ignore[index]
        # /v1's logit as /v1 prints it; batches formed differently may move the last bits (OpenVINO)
        np.testing.assert_allclose([float(v) for v, _, _ in rows], [p["logit"] for p in expected], rtol=0, atol=1e-6)  # type: ignore[index]
        for b in range(2):
            own = v1_branches[i]["branches"][b]["predictions"]  # type: ignore[index]
            assert [s.split(b":")[1] for s in branch_top3[i, b]] == [str(p["class_id"]).encode() for p in own]
    values = [float(s.split(b":")[0]) for s in top5[0]]
    assert values == sorted(values, reverse=True)


def test_json_form_equals_binary_form(triton_client: triton.InferenceServerClient, server: str) -> None:
    body = {
        "id": "json-form-1",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                    "parameters": {"content_type": "base64"},
                    "data": [base64.b64encode(JPEG).decode(), base64.b64encode(PNG).decode()]}],
        "outputs": [{"name": "logits"}],
    }
    response = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json" and "inference-header-content-length" not in (
        response.headers)
    answer = response.json()
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (MODEL, "1", "json-form-1")
    (out,) = answer["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [2, 1000])
    binary = triton_client.infer(MODEL, [_image_input([JPEG, PNG])]).as_numpy("logits")
    np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(2, 1000), binary, rtol=0, atol=1e-6)


def test_preprocessed_pixels_equal_the_image_path(triton_client: triton.InferenceServerClient) -> None:
    spec = InputSpec.from_variant(get_variant(MODEL))
    pixels = np.stack([preprocess(data, spec, max_pixels=40_000_000).pixels for data in (JPEG, PNG)])
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels.astype(np.float32))
    from_pixels = triton_client.infer(MODEL, [tensor]).as_numpy("logits")
    from_images = triton_client.infer(MODEL, [_image_input([JPEG, PNG])]).as_numpy("logits")
    np.testing.assert_allclose(from_pixels, from_images, rtol=0, atol=1e-6)


def test_kserve_rest_client(server: str) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    async def run() -> np.ndarray:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
        try:
            assert await client.is_server_live(server) and await client.is_server_ready(server)
            assert await client.is_model_ready(server, MODEL)
            tensor = InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([JPEG], dtype=np.object_), binary_data=True)
            request = InferRequest(MODEL, [tensor], request_outputs=[RequestedOutput("logits", {"binary_data": True})])
            response = await client.infer(server, request, model_name=MODEL)
            assert response.model_name == MODEL
            (out,) = response.outputs
            return out.as_numpy()  # type: ignore[no-any-return]
        finally:
            await client.close()

    logits = asyncio.run(run())
    np.testing.assert_allclose(logits.reshape(1, 1000), _v1_logits(server, [JPEG]), rtol=0, atol=1e-6)


def test_deadline_metrics_and_unknown_routes(server: str) -> None:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(JPEG).decode()]}]}
    late = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body, headers={"X-Request-Timeout-Ms": "1"})
    assert late.status_code == 504 and set(late.json()) == {"error"}, late.text
    assert "deadline" in late.json()["error"]
    missing = httpx.get(f"{server}/v2/repository/index")
    assert missing.status_code == 404 and missing.json() == {"error": "no route /v2/repository/index"}
    wrong_method = httpx.get(f"{server}/v2/models/{MODEL}/infer")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert set(wrong_method.json()) == {"error"}
    metrics = httpx.get(f"{server}/metrics").text
    assert re.search(r'crossvit_requests_total\{route="/v2/models/\{model_name\}/infer",status="504"\} [1-9]', metrics)
    assert re.search(r'crossvit_rejected_requests_total\{reason="deadline"\} [1-9]', metrics)
