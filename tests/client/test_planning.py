"""The client's pure parts: how work is split to fit the limits, and how long to wait before a retry."""

from __future__ import annotations

import email.utils
import time

import pytest

from client.batching import BODY_OVERHEAD_BYTES, Limits, multipart_size, plan_batches
from client.retry import RetryPolicy, parse_retry_after


def test_batches_respect_the_image_count_in_order() -> None:
    parts = [(f"{i}.jpg", 10) for i in range(7)]
    assert plan_batches(parts, Limits(3, 10**6)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_batches_respect_the_body_size_and_a_too_large_image_goes_alone() -> None:
    limit = BODY_OVERHEAD_BYTES + 2 * multipart_size("a.jpg", 1000)  # exactly two 1000-byte parts
    parts = [("a.jpg", 1000), ("a.jpg", 1000), ("a.jpg", 1000), ("a.jpg", 5000), ("a.jpg", 1000)]
    batches = plan_batches(parts, Limits(16, limit))
    assert batches == [[0, 1], [2], [3], [4]]
    for batch in batches:
        body = BODY_OVERHEAD_BYTES + sum(multipart_size(*parts[i]) for i in batch)
        assert body <= limit or len(batch) == 1


def test_retry_after_seconds_and_http_dates() -> None:
    assert parse_retry_after("7") == 7.0
    in_five = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert parse_retry_after(in_five) == pytest.approx(5, abs=1.5)
    assert parse_retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert parse_retry_after("soon") is None


def test_delay_honours_retry_after_up_to_a_cap_and_backs_off_otherwise() -> None:
    policy = RetryPolicy(backoff_s=0.5, backoff_max_s=4.0, retry_after_max_s=10.0)
    assert policy.delay(1, "3") == 3.0
    assert policy.delay(1, "120") == 10.0
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [policy.delay(attempt, "garbage" if attempt % 2 else None) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) > min(delays)  # jittered, so clients that failed together spread out
