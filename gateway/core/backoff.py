"""Reconnect pacing shared by every room that reconnects (device links, hub sessions)."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Exponential backoff with jitter: half fixed, half random, so a fleet spreads out."""
    ceiling = min(high, low * (2 ** min(attempt, 30)))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))
