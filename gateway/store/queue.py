"""The seam between the sealer and the uplink: a per-device FIFO of sealed envelopes.

The contract every implementation keeps (:class:`gateway.store.memory.MemoryQueue` and the
durable :class:`gateway.store.sqlite.Store`; both keep their envelopes in
:class:`gateway.store.ledger.Ledger`):

- ``await put(envelopes)``: when it returns, the envelopes are accepted (for a durable store:
  committed). Order per device is the order of the calls.
- ``await lease(device_id, limit)``: up to ``limit`` envelopes from the head of the device's
  queue, waiting until there is at least one. Returns ``[]`` only after :meth:`close` once the
  device has nothing left to lease.
- ``ack(device_id, lease_id)``: the hub took it (PUBACK); it leaves the queue for good.
- ``release(device_id)``: every lease not acked goes back to the head, in its original order
  (the session lost its connection; those envelopes will be published again).
- ``close()``: no more puts; wakes leasers so that sessions can finish.
- ``depth()``: per device, what is queued and leased (status); ``holds(device_id)``: whether
  one device has anything queued or leased, in constant time (a stop asks it per session);
  ``pending(device_id)``: how many are queued and not out on lease (a session whose device a
  reload removed leases only those, then ends).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.core.readings import Envelope


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
    # Readings in those envelopes (their headers' counts, queued and leased): a running count
    # in the ledger, so that a scrape of 1,000 devices scans nothing for it.
    readings: int = 0


class EnvelopeQueue(Protocol):
    async def put(self, envelopes: Sequence[Envelope]) -> None: ...
    async def lease(self, device_id: str, limit: int) -> list[Leased]: ...
    def ack(self, device_id: str, lease_id: int) -> None: ...
    def release(self, device_id: str) -> None: ...
    def close(self) -> None: ...
    def depth(self) -> list[DeviceDepth]: ...
    def holds(self, device_id: str) -> bool: ...
    def pending(self, device_id: str) -> int: ...
