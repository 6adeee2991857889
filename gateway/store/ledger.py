"""The bookkeeping both queues share: per-device FIFOs with leases, bytes, and drop victims.

Pure: no I/O, no SQLite. :class:`gateway.store.memory.MemoryQueue` and
:class:`gateway.store.sqlite.Store` keep their envelopes here and differ only in what they do
around it (the store commits first and keeps bodies on disk). The one piece of asyncio is the
"ready" wake-up (:meth:`Ledger.wait`): a lease waits on it until its device has something
pending or the queue closes. It lives here, beside the state it waits for, so that neither
queue re-implements it; the rest is tested without an event loop.

An entry is *pending* (at its device's head in id order, leasable) or *leased* (out with a
session until ``ack`` removes it or ``release`` puts it back at the head, in order). Bytes count
both. When a put would go over the bound, :meth:`Ledger.plan` decides by the policy:
``drop-oldest`` picks the oldest pending entries across devices (lowest id: first accepted,
never one out on lease), ``refuse-newest`` keeps the new envelopes that fit, in order.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gateway.core.readings import Envelope, Header
from gateway.store.queue import DeviceDepth

Policy = Literal["drop-oldest", "refuse-newest"]


@dataclass(slots=True)
class Entry:
    id: int
    device: str
    header: Header
    size: int
    oldest_ts_ms: int
    body: bytes | None  # None: not held in memory (the store reads it from its file)


@dataclass(slots=True)
class _Device:
    pending: deque[Entry] = field(default_factory=deque)
    leased: OrderedDict[int, Entry] = field(default_factory=OrderedDict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    readings: int = 0  # the header counts of pending and leased entries, kept as they move


@dataclass(frozen=True, slots=True)
class Plan:
    """What a put does when the bound is reached: store ``keep``, refuse ``refused``, drop
    ``victims`` (entries already held)."""

    keep: list[Envelope]
    refused: list[Envelope]
    victims: list[Entry]

    def dropped(self, what: str) -> list[tuple[str, str, list[tuple[int, int]]]]:
        """Per device and reason, the (first seq, count) ranges dropped or refused: one
        ``envelopes-dropped`` event each. ``what``: "store" or "queue", for the reason."""
        out = []
        for reason, ranges in (
            (f"{what} full: dropped oldest", ranges_of((v.device, v.header) for v in self.victims)),
            (
                f"{what} full: refused newest",
                ranges_of((e.device_id, e.header) for e in self.refused),
            ),
        ):
            out += [(device, reason, device_ranges) for device, device_ranges in ranges.items()]
        return out


def ranges_of(items: Iterable[tuple[str, Header]]) -> dict[str, list[tuple[int, int]]]:
    """Per device, the (first seq, count) of each envelope in ``items``."""
    out: dict[str, list[tuple[int, int]]] = {}
    for device, header in items:
        out.setdefault(device, []).append((header.first_seq, header.count))
    return out


class Ledger:
    """Per-device FIFOs of :class:`Entry` with leases and byte accounting."""

    def __init__(self) -> None:
        self._devices: dict[str, _Device] = {}
        self.bytes = 0
        self.closed = False

    def _device(self, device_id: str) -> _Device:
        entry = self._devices.get(device_id)
        if entry is None:
            entry = self._devices[device_id] = _Device()
        return entry

    # -- in ---------------------------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        """Append at the tail of its device's FIFO (ids grow with every add)."""
        device = self._device(entry.device)
        device.pending.append(entry)
        device.readings += entry.header.count
        self.bytes += entry.size
        device.ready.set()

    def plan(
        self, envelopes: Sequence[Envelope], max_bytes: int, policy: Policy = "drop-oldest"
    ) -> Plan:
        """What to keep, refuse and drop so that ``envelopes`` fit in ``max_bytes``."""
        incoming = sum(len(e.body) for e in envelopes)
        if self.bytes + incoming <= max_bytes:
            return Plan(list(envelopes), [], [])
        if policy == "refuse-newest":
            room = max_bytes - self.bytes
            keep: list[Envelope] = []
            refused: list[Envelope] = []
            for envelope in envelopes:
                if len(envelope.body) <= room:
                    keep.append(envelope)
                    room -= len(envelope.body)
                else:
                    refused.append(envelope)
            return Plan(keep, refused, [])
        return Plan(list(envelopes), [], self.oldest_to_drop(self.bytes + incoming - max_bytes))

    def oldest_to_drop(self, need: int) -> list[Entry]:
        """The oldest entries not out on lease, across devices, freeing at least ``need`` bytes
        (fewer when there are not enough)."""
        heads = {d: 0 for d, q in self._devices.items() if q.pending}
        victims: list[Entry] = []
        freed = 0
        while freed < need and heads:
            device = min(heads, key=lambda d: self._devices[d].pending[heads[d]].id)
            entry = self._devices[device].pending[heads[device]]
            victims.append(entry)
            freed += entry.size
            heads[device] += 1
            if heads[device] >= len(self._devices[device].pending):
                del heads[device]
        return victims

    def forget(self, entry: Entry) -> None:
        """Take a pending entry out (a drop victim)."""
        device = self._devices[entry.device]
        device.pending.remove(entry)
        device.readings -= entry.header.count
        self.bytes -= entry.size

    def restore(self, entry: Entry) -> None:
        """Put back an entry taken out by :meth:`forget`, in id order."""
        device = self._devices[entry.device]
        index = next(
            (i for i, e in enumerate(device.pending) if e.id > entry.id), len(device.pending)
        )
        device.pending.insert(index, entry)
        device.readings += entry.header.count
        self.bytes += entry.size
        device.ready.set()

    # -- out --------------------------------------------------------------------------------

    async def wait(self, device_id: str) -> bool:
        """Until the device has something pending (True) or the ledger is closed with nothing
        pending for it (False)."""
        device = self._device(device_id)
        while not device.pending:
            if self.closed:
                return False
            device.ready.clear()
            await device.ready.wait()
        return True

    def lease(self, device_id: str, limit: int) -> list[Entry]:
        """Up to ``limit`` entries from the device's head, now out on lease."""
        device = self._device(device_id)
        taken: list[Entry] = []
        while device.pending and len(taken) < limit:
            entry = device.pending.popleft()
            device.leased[entry.id] = entry
            taken.append(entry)
        return taken

    def ack(self, device_id: str, lease_id: int) -> Entry | None:
        """The entry leaves for good; None if it was not out on lease."""
        device = self._devices.get(device_id)
        entry = device.leased.pop(lease_id, None) if device is not None else None
        if entry is not None and device is not None:
            device.readings -= entry.header.count
            self.bytes -= entry.size
        return entry

    def release(self, device_id: str) -> None:
        """Every lease not acked goes back to the head, in its original order."""
        device = self._devices.get(device_id)
        if device is None or not device.leased:
            return
        device.pending.extendleft(reversed(device.leased.values()))
        device.leased.clear()
        device.ready.set()

    def close(self) -> None:
        """Wake every waiting lease; those of devices with nothing pending get nothing."""
        self.closed = True
        for device in self._devices.values():
            device.ready.set()

    def pending(self, device_id: str) -> int:
        device = self._devices.get(device_id)
        return len(device.pending) if device is not None else 0

    def holds(self, device_id: str) -> bool:
        """Whether the device has anything queued or out on lease (O(1), for a fleet's stop)."""
        device = self._devices.get(device_id)
        return device is not None and bool(device.pending or device.leased)

    def depth(self) -> list[DeviceDepth]:
        out = []
        for device_id, device in self._devices.items():
            entries = [*device.leased.values(), *device.pending]
            out.append(
                DeviceDepth(
                    device_id,
                    len(device.pending),
                    len(device.leased),
                    sum(e.size for e in entries),
                    min((e.oldest_ts_ms for e in entries), default=None),
                    device.readings,
                )
            )
        return out
