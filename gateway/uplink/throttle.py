"""Pacing of what the uplink does across devices: the hub's connect and send throttles."""

from __future__ import annotations

import asyncio


class RateLimiter:
    """Spaces events to at most ``rate`` per second (0: unlimited), first come first served:
    the hub's connect throttle, and the send rate that paces a backlog's drain."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    async def acquire(self) -> None:
        if not self._interval:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)
