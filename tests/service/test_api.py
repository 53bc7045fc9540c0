"""The classify API against the real server: every input route, parity with timm, and metadata."""

from __future__ import annotations

import base64
import hashlib

import httpx
import pytest
import timm
import torch
from PIL import Image
from torch.nn import functional as F

from tests.conftest import TEST_VARIANT, Reference
from tests.photos import encode, jpeg_with_orientation, photo, resized

# (name, encoded bytes, content type) for realistic inputs of every accepted format
PHOTO_640 = resized(photo("chelsea"), 640, 480)


def _cases() -> list[tuple[str, bytes, str]]:
    astronaut = resized(photo("astronaut"), 512, 512)
    coffee = photo("coffee")
    return [
        ("chelsea.jpg", encode(PHOTO_640, "JPEG", quality=90), "image/jpeg"),
        ("astronaut.png", encode(astronaut, "PNG"), "image/png"),
        ("coffee.webp", encode(coffee, "WEBP", quality=85), "image/webp"),
        ("chelsea.bmp", encode(photo("chelsea"), "BMP"), "image/bmp"),
        ("coffee.tiff", encode(coffee, "TIFF"), "image/tiff"),
        ("astronaut.gif", encode(astronaut.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"), "image/gif"),
        ("camera.png", encode(photo("camera"), "PNG"), "image/png"),  # grayscale
        ("camera.jpg", encode(photo("camera"), "JPEG", quality=90), "image/jpeg"),  # grayscale JPEG
    ]


CASES = _cases()


def _timm_logits(reference: Reference, data: bytes) -> torch.Tensor:
    """timm's own eval pipeline: its transform from the model's data config, then its model."""
    config = timm.data.resolve_data_config({}, model=reference.timm_model)
    transform = timm.data.create_transform(**config)
    import io

    with Image.open(io.BytesIO(data)) as image:
        x = transform(image.convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        return reference.timm_model(x)[0]


def _served_logits(client: httpx.Client, data: bytes, content_type: str) -> torch.Tensor:
    response = client.post("/v1/classify", params={"top_k": 1000}, content=data,
                           headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    predictions = response.json()["results"][0]["predictions"]
    assert len(predictions) == 1000
    logits = torch.empty(1000)
    for p in predictions:
        logits[p["class_id"]] = p["logit"]
    return logits


@pytest.mark.parametrize(("name", "data", "content_type"), CASES, ids=[c[0] for c in CASES])
def test_served_logits_match_timm_pipeline(
    backend_client: httpx.Client, reference: Reference, name: str, data: bytes, content_type: str
) -> None:
    served = _served_logits(backend_client, data, content_type)
    expected = _timm_logits(reference, data)
    assert F.cosine_similarity(served, expected, dim=0) >= 0.999
    assert served.topk(5).indices.tolist() == expected.topk(5).indices.tolist()
    assert float((served - expected).abs().max() / expected.abs().max()) <= 1e-4  # fp32 on either backend


def test_predictions_are_sorted_probabilities_and_labelled(client: httpx.Client) -> None:
    response = client.post("/v1/classify", params={"top_k": 5}, files={"images": ("cat.jpg", CASES[0][1])})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == TEST_VARIANT
    result = body["results"][0]
    assert (result["index"], result["filename"], result["width"], result["height"]) == (0, "cat.jpg", 640, 480)
    predictions = result["predictions"]
    assert len(predictions) == 5
    logits = [p["logit"] for p in predictions]
    assert logits == sorted(logits, reverse=True)
    assert all(0 < p["probability"] < 1 and p["label"] for p in predictions)
    full = client.post("/v1/classify", params={"top_k": 1000}, content=CASES[0][1],
                       headers={"Content-Type": "image/jpeg"}).json()["results"][0]["predictions"]
    assert sum(p["probability"] for p in full) == pytest.approx(1.0, abs=1e-4)
    assert full[0]["class_id"] == predictions[0]["class_id"]
    assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total"}
    assert "branches" not in result


def test_labels_are_imagenet_names(client: httpx.Client) -> None:
    full = client.post("/v1/classify", params={"top_k": 1000}, content=CASES[0][1],
                       headers={"Content-Type": "image/jpeg"}).json()["results"][0]["predictions"]
    labels = {p["class_id"]: p["label"] for p in full}
    assert labels[281] == "tabby, tabby cat" and labels[0] == "tench, Tinca tinca"


def test_many_images_keep_their_order_and_results(backend_client: httpx.Client) -> None:
    client = backend_client
    names = [c[0] for c in CASES[:5]]
    files = [("images", (c[0], c[1], c[2])) for c in CASES[:5]]
    batch = client.post("/v1/classify", params={"top_k": 3}, files=files).json()["results"]
    assert [r["filename"] for r in batch] == names
    assert [r["index"] for r in batch] == list(range(5))
    for case, result in zip(CASES[:5], batch, strict=True):  # each image gets exactly its own result
        single = client.post("/v1/classify", params={"top_k": 3}, content=case[1],
                             headers={"Content-Type": case[2]}).json()["results"][0]
        assert [p["class_id"] for p in result["predictions"]] == [p["class_id"] for p in single["predictions"]]
        for a, b in zip(result["predictions"], single["predictions"], strict=True):
            assert a["logit"] == pytest.approx(b["logit"], abs=1e-4)


def test_json_base64_with_and_without_data_uri(client: httpx.Client) -> None:
    data = CASES[0][1]
    plain = base64.b64encode(data).decode()
    response = client.post("/v1/classify", json={"images": [plain, "data:image/jpeg;base64," + plain]})
    assert response.status_code == 200, response.text
    a, b = response.json()["results"]
    assert a["predictions"] == b["predictions"] and a.get("filename") is None


def test_branches_carry_each_branch_top_k(client: httpx.Client, reference: Reference) -> None:
    body = client.post("/v1/classify", params={"top_k": 1000, "branches": "true"}, content=CASES[0][1],
                       headers={"Content-Type": "image/jpeg"}).json()
    result = body["results"][0]
    assert [b["branch"] for b in result["branches"]] == [0, 1]
    assert [b["resolution"] for b in result["branches"]] == [240, 224]
    per_branch = []
    for branch in result["branches"]:
        logits = torch.empty(1000)
        for p in branch["predictions"]:
            logits[p["class_id"]] = p["logit"]
        per_branch.append(logits)
    mean = torch.empty(1000)
    for p in result["predictions"]:
        mean[p["class_id"]] = p["logit"]
    torch.testing.assert_close((per_branch[0] + per_branch[1]) / 2, mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_photos_report_rotated_size(client: httpx.Client, orientation: int) -> None:
    data = jpeg_with_orientation(PHOTO_640, orientation)
    result = client.post("/v1/classify", content=data, headers={"Content-Type": "image/jpeg"}).json()["results"][0]
    assert (result["width"], result["height"]) == (480, 640)
    upright = PHOTO_640.transpose(Image.Transpose.ROTATE_270 if orientation == 6 else Image.Transpose.ROTATE_90)
    expected = client.post("/v1/classify", content=encode(upright, "JPEG", quality=95),
                           headers={"Content-Type": "image/jpeg"}).json()["results"][0]
    assert result["predictions"][0]["class_id"] == expected["predictions"][0]["class_id"]


def test_request_id_is_echoed_or_generated(client: httpx.Client) -> None:
    echoed = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    generated = client.get("/healthz")
    assert len(generated.headers["X-Request-ID"]) == 32
    hostile = client.get("/healthz", headers={"X-Request-ID": "a b\tc" * 50})
    assert hostile.headers["X-Request-ID"] != "a b\tc" * 50


def test_models_reports_variant_weights_and_serving(client: httpx.Client, reference: Reference) -> None:
    card = client.get("/v1/models").json()
    assert card["name"] == TEST_VARIANT
    assert card["parameters"] == 7_014_800
    assert card["weights"]["sha256"] == hashlib.sha256(reference.checkpoint.read_bytes()).hexdigest()
    assert card["weights"]["pretrained"] is True and card["weights"]["source"] == "configured"
    assert card["input"] == {
        "resolutions": [240, 224], "resize": 274, "crop": 240, "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    }
    assert card["labels"] == 1000 and card["worker_count"] == 2 and card["devices"] == ["cpu"]
    assert card["precision"] == ["fp32", "fp32"]
    assert [w["backend"] for w in card["workers"]] == ["openvino", "openvino"]
    assert all(w["guard_cosine"] >= 0.99999 and w["rel_err"] <= 1e-4 for w in card["workers"])
    assert card["batching"]["max_batch_size"] == 4
    assert all(w["state"] == "ready" and "pid" not in w for w in card["workers"])  # no pids to anyone
    assert card["weights"]["file"] == "crossvit_tiny_240.safetensors" and "path" not in card["weights"]
    assert card["config"]["embed_dim"] == [96, 192]


def test_health_ready_metrics_and_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    client.post("/v1/classify", content=CASES[0][1], headers={"Content-Type": "image/jpeg"})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("crossvit_requests_total", "crossvit_request_duration_seconds_bucket", "crossvit_queue_depth_images",
                 "crossvit_batch_size_bucket", "crossvit_inference_seconds_bucket", "crossvit_worker_restarts_total",
                 "crossvit_in_flight_requests", "crossvit_queue_wait_seconds_bucket"):
        assert name in text, name
    assert 'crossvit_requests_total{route="/v1/classify",status="200"}' in text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    classify = spec["paths"]["/v1/classify"]["post"]
    assert {"multipart/form-data", "application/json", "image/jpeg"} <= set(classify["requestBody"]["content"])
    assert {"200", "400", "401", "413", "415", "422", "503", "504"} <= set(classify["responses"])
    assert {"/v1/models", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
