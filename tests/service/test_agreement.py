"""Branch agreement: the pure function against scipy, and what /v1 reports on photos and on noise."""

from __future__ import annotations

import statistics
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import jensenshannon

from service.inference.agreement import branch_agreement
from tests.photos import encode, photo

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera", "hubble_deep_field")


def _noise(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def _scipy_js(b0: np.ndarray, b1: np.ndarray) -> float:
    """The oracle: scipy's Jensen-Shannon distance (base 2) squared is the divergence."""
    p0, p1 = (np.exp(b - b.max()) / np.exp(b - b.max()).sum() for b in (b0.astype(np.float64), b1.astype(np.float64)))
    return float(jensenshannon(p0, p1, base=2) ** 2)


def test_identical_branches_agree_with_zero_divergence() -> None:
    logits = torch.randn(3, 1, 1000).expand(3, 2, 1000)
    for found in branch_agreement(logits.numpy()):
        assert found.top1_agree and found.js_divergence == pytest.approx(0, abs=1e-6)


def test_confident_disjoint_branches_reach_one() -> None:
    logits = torch.full((1, 2, 1000), -50.0)
    logits[0, 0, 3] = logits[0, 1, 7] = 50.0  # each branch sure of a different class
    (found,) = branch_agreement(logits.numpy())
    assert not found.top1_agree and found.js_divergence == pytest.approx(1, abs=1e-6)


def test_matches_scipy_on_random_logits_and_is_symmetric() -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 2, 1000) * torch.tensor([0.1, 1.0, 3.0, 10.0]).repeat(4)[:, None, None]
    found = branch_agreement(logits.numpy())
    swapped = branch_agreement(logits.flip(1).numpy())
    for row, (a, b) in enumerate(zip(found, swapped, strict=True)):
        expected = _scipy_js(logits[row, 0].numpy(), logits[row, 1].numpy())
        assert a.js_divergence == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert a.js_divergence == pytest.approx(b.js_divergence, abs=1e-7)
        assert a.top1_agree == (int(logits[row, 0].argmax()) == int(logits[row, 1].argmax())) == b.top1_agree
        assert 0.0 <= a.js_divergence <= 1.0


def _served(client: httpx.Client, image: bytes) -> tuple[dict[str, Any], float]:
    """The served agreement, and scipy's JS over the full per-branch logits of the same request."""
    response = client.post("/v1/classify?top_k=1000&branches=true", files={"images": ("x", image)})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    full = []
    for branch in result["branches"]:
        logits = np.zeros(1000)
        for p in branch["predictions"]:
            logits[p["class_id"]] = p["logit"]
        full.append(logits)
    agreement = result["agreement"]
    assert agreement["top1_agree"] == (result["branches"][0]["predictions"][0]["class_id"]
                                       == result["branches"][1]["predictions"][0]["class_id"])
    return agreement, _scipy_js(full[0], full[1])


def test_served_agreement_on_photos_and_noise(client: httpx.Client) -> None:
    """What the README documents for the random-init test checkpoint: no signal without trained weights.

    Random heads are independent projections whose softmaxes are nearly uniform, so photos and noise
    alike land at JS ~0.02 and the branches' top-1 classes never coincide (bench/agreement.py).
    """
    photos = [_served(client, encode(photo(name), "PNG")) for name in PHOTOS]
    noise = [_served(client, _noise(seed)) for seed in range(4)]
    for agreement, oracle in photos + noise:
        assert agreement["js_divergence"] == pytest.approx(oracle, rel=1e-3)
        assert 0.015 < agreement["js_divergence"] < 0.03
        assert agreement["top1_agree"] is False
    medians = [statistics.median(a["js_divergence"] for a, _ in group) for group in (photos, noise)]
    assert abs(medians[0] - medians[1]) < 0.003, medians


def test_every_result_carries_agreement_without_branches(client: httpx.Client) -> None:
    jpeg = encode(photo("chelsea"), "JPEG", quality=90)
    response = client.post("/v1/classify", files=[("images", ("a.jpg", jpeg)), ("images", ("b.png", _noise(9)))])
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        assert "branches" not in result
        assert set(result["agreement"]) == {"top1_agree", "js_divergence"}
        assert isinstance(result["agreement"]["top1_agree"], bool)
        assert 0 <= result["agreement"]["js_divergence"] <= 1
