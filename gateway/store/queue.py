"""The seam between the sealer and the uplink: a per-device FIFO of sealed envelopes.

The contract every implementation keeps (the durable SQLite store is the next one):

- ``await put(envelopes)``: when it returns, the envelopes are accepted (for a durable store:
  committed). Order per device is the order of the calls.
- ``await lease(device_id, limit)``: up to ``limit`` envelopes from the head of the device's
  queue, waiting until there is at least one. Returns ``[]`` only after :meth:`close` once the
  device has nothing left to lease.
- ``ack(device_id, lease_id)``: the hub took it (PUBACK); it leaves the queue for good.
- ``release(device_id)``: every lease not acked goes back to the head, in its original order
  (the session lost its connection; those envelopes will be published again).
- ``close()``: no more puts; wakes leasers so that sessions can finish.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.core.readings import Envelope

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Leased:
    lease_id: int
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class DeviceDepth:
    device_id: str
    queued: int
    leased: int
    bytes: int
    oldest_ts_ms: int | None


class EnvelopeQueue(Protocol):
    async def put(self, envelopes: Sequence[Envelope]) -> None: ...
    async def lease(self, device_id: str, limit: int) -> list[Leased]: ...
    def ack(self, device_id: str, lease_id: int) -> None: ...
    def release(self, device_id: str) -> None: ...
    def close(self) -> None: ...
    def depth(self) -> list[DeviceDepth]: ...


EventSink = Callable[..., None]


class _DeviceQueue:
    __slots__ = ("leased", "pending", "ready")

    def __init__(self) -> None:
        self.pending: deque[Leased] = deque()
        self.leased: OrderedDict[int, Leased] = OrderedDict()
        self.ready = asyncio.Event()


class MemoryQueue:
    """An in-memory :class:`EnvelopeQueue`, bounded by bytes; the oldest envelope goes first.

    It loses everything on a crash or restart (``store.kind = "memory"``): it exists to measure
    what the durable store costs. Drops are reported as ``envelopes-dropped`` events, like the
    store's. Each run is a new boot, with sequence numbers from 0.
    """

    def __init__(self, max_bytes: int = 256 * 1024 * 1024, on_event: EventSink | None = None):
        self.max_bytes = max_bytes
        self._on_event = on_event
        self.boot_id = secrets.token_hex(8)
        self.next_seq: dict[str, int] = {}
        self._devices: dict[str, _DeviceQueue] = {}
        self._next_id = 0
        self._bytes = 0
        self._closed = False

    def _device(self, device_id: str) -> _DeviceQueue:
        q = self._devices.get(device_id)
        if q is None:
            q = self._devices[device_id] = _DeviceQueue()
        return q

    async def put(self, envelopes: Sequence[Envelope]) -> None:
        if self._closed:
            raise RuntimeError("queue is closed")
        for envelope in envelopes:
            self._next_id += 1
            q = self._device(envelope.device_id)
            q.pending.append(Leased(self._next_id, envelope))
            self._bytes += len(envelope.body)
            q.ready.set()
        while self._bytes > self.max_bytes and self._drop_oldest():
            pass

    def _drop_oldest(self) -> bool:
        victims = [
            (q.pending[0].envelope.oldest_ts_ms, d) for d, q in self._devices.items() if q.pending
        ]
        if not victims:
            return False
        _, device_id = min(victims)
        dropped = self._devices[device_id].pending.popleft().envelope
        self._bytes -= len(dropped.body)
        if self._on_event is not None:
            self._on_event(
                "envelopes-dropped",
                device_id,
                "queue full: dropped oldest",
                envelopes=1,
                readings=dropped.header.count,
                policy="drop-oldest",
                seq_ranges=[(dropped.header.first_seq, dropped.header.count)],
            )
        return True

    async def __aenter__(self) -> MemoryQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def lease(self, device_id: str, limit: int) -> list[Leased]:
        q = self._device(device_id)
        while not q.pending:
            if self._closed:
                return []
            q.ready.clear()
            await q.ready.wait()
        out: list[Leased] = []
        while q.pending and len(out) < limit:
            item = q.pending.popleft()
            q.leased[item.lease_id] = item
            out.append(item)
        return out

    def ack(self, device_id: str, lease_id: int) -> None:
        item = self._devices[device_id].leased.pop(lease_id, None)
        if item is not None:
            self._bytes -= len(item.envelope.body)

    def release(self, device_id: str) -> None:
        q = self._devices.get(device_id)
        if q is None or not q.leased:
            return
        q.pending.extendleft(reversed(q.leased.values()))
        q.leased.clear()
        q.ready.set()

    def close(self) -> None:
        self._closed = True
        for q in self._devices.values():
            q.ready.set()

    def depth(self) -> list[DeviceDepth]:
        out = []
        for device_id, q in self._devices.items():
            items = list(q.leased.values()) + list(q.pending)
            out.append(
                DeviceDepth(
                    device_id,
                    len(q.pending),
                    len(q.leased),
                    sum(len(i.envelope.body) for i in items),
                    min((i.envelope.oldest_ts_ms for i in items), default=None),
                )
            )
        return out
