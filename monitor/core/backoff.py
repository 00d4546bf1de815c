"""The one backoff formula, for polls and deliveries alike."""

from __future__ import annotations

import random

__all__ = ["backoff"]


def backoff(
    attempt: int,
    *,
    first: float,
    cap: float,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry ``attempt`` (1 = the first retry): ``first`` doubled per
    attempt, at most ``cap``; with ``jitter`` a random share of up to that fraction taken off
    ("full jitter" between ``1 - jitter`` and all of the step), so retries of many clients do
    not fall in step."""
    if attempt <= 0:
        return 0.0
    step = min(cap, first * 2.0 ** min(attempt - 1, 32))
    if not jitter:
        return step
    return step * (1.0 - jitter * (rng or random).random())
