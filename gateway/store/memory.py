"""The in-memory queue (``store.kind = "memory"``): the ledger alone, nothing on disk."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence

from gateway.core.readings import Envelope
from gateway.store.ledger import Entry, Ledger, Policy
from gateway.store.queue import DeviceDepth, Leased

log = logging.getLogger(__name__)

EventSink = Callable[..., None]


class MemoryQueue:
    """An in-memory :class:`gateway.store.queue.EnvelopeQueue`, bounded by bytes, with the
    store's policies when full (``drop-oldest``: the oldest envelope not out on lease goes
    first; ``refuse-newest``: new envelopes that do not fit are refused).

    It loses everything on a crash or restart: it exists to measure what the durable store
    costs. Drops are reported as ``envelopes-dropped`` events with the store's fields. Each run
    is a new boot, with sequence numbers from 0.
    """

    def __init__(
        self,
        max_bytes: int = 256 * 1024 * 1024,
        on_event: EventSink | None = None,
        policy: Policy = "drop-oldest",
    ):
        self.max_bytes = max_bytes
        self.policy = policy
        self._on_event = on_event
        self.boot_id = secrets.token_hex(8)
        self.next_seq: dict[str, int] = {}
        self._ledger = Ledger()
        self._next_id = 0

    async def __aenter__(self) -> MemoryQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def put(self, envelopes: Sequence[Envelope]) -> None:
        if self._ledger.closed:
            raise RuntimeError("queue is closed")
        plan = self._ledger.plan(envelopes, self.max_bytes, self.policy)
        for victim in plan.victims:
            self._ledger.forget(victim)
        for envelope in plan.keep:
            self._next_id += 1
            self._ledger.add(
                Entry(
                    self._next_id,
                    envelope.device_id,
                    envelope.header,
                    len(envelope.body),
                    envelope.oldest_ts_ms,
                    envelope.body,
                )
            )
        if self._on_event is not None:
            for device_id, reason, ranges in plan.dropped("queue"):
                self._on_event(
                    "envelopes-dropped",
                    device_id,
                    reason,
                    envelopes=len(ranges),
                    readings=sum(count for _, count in ranges),
                    seq_ranges=ranges,
                    policy=self.policy,
                )

    async def lease(self, device_id: str, limit: int) -> list[Leased]:
        if not await self._ledger.wait(device_id):
            return []
        out = []
        for e in self._ledger.lease(device_id, limit):
            assert e.body is not None  # a memory queue holds every body
            out.append(Leased(e.id, Envelope(e.device, e.header, e.body, e.oldest_ts_ms)))
        return out

    def ack(self, device_id: str, lease_id: int) -> None:
        self._ledger.ack(device_id, lease_id)

    def release(self, device_id: str) -> None:
        self._ledger.release(device_id)

    def close(self) -> None:
        self._ledger.close()

    def depth(self) -> list[DeviceDepth]:
        return self._ledger.depth()

    def holds(self, device_id: str) -> bool:
        return self._ledger.holds(device_id)

    def pending(self, device_id: str) -> int:
        return self._ledger.pending(device_id)
