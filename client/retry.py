"""When and how long to wait before trying a request again: 503s and lost connections only."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

__all__ = ["RetryEvent", "RetryPolicy", "parse_retry_after"]


def parse_retry_after(value: str) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None when unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryEvent:
    """Passed to `on_retry` before each wait: which retry this is, how long, and why."""

    attempt: int  # 1 for the first retry
    delay_s: float
    reason: str  # "503 overloaded: ..." or the connection error


@dataclass(frozen=True)
class RetryPolicy:
    """Retry 503 (honouring Retry-After) and connection errors with capped exponential backoff.

    Classification is idempotent, so resending after a lost connection is safe; a 4xx is the
    caller's problem and is never retried.
    """

    retries: int = 5  # after the first attempt
    backoff_s: float = 0.5  # first backoff; doubles per retry
    backoff_max_s: float = 8.0
    retry_after_max_s: float = 60.0  # a Retry-After beyond this is waited only this long

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry `attempt` (1-based)."""
        if retry_after is not None and (seconds := parse_retry_after(retry_after)) is not None:
            return min(seconds, self.retry_after_max_s)
        ceiling = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # jitter: clients that failed together spread out
