"""Pure batching: scans -> per-device batches sized for IoT Hub's meter and bounded in age.

IoT Hub meters device-to-cloud traffic in 4 KB units, so a batch should fill a unit without
passing it. The sealed size is only known after compression, so the batcher estimates it from the
raw size and a per-device ratio that it learns from what the sealer reports (:meth:`observe`).
A batch closes when the next scan would push the estimate past ``max_bytes``, or when the
gateway's timer calls :meth:`take` at ``deadline``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.core.readings import Scan

# Raw JSON bytes a scan costs beyond its values, and a value on average. They only seed the
# estimate: the learnt ratio (sealed bytes / estimated raw bytes) absorbs their error.
SCAN_OVERHEAD = 24
VALUE_BYTES = 9
# Close a little early so that an estimate a few percent low rarely forces a re-seal.
FILL = 0.97
INITIAL_RATIO = 0.3
RATIO_WEIGHT = 0.5


@dataclass(slots=True)
class _Open:
    scans: list[Scan] = field(default_factory=list)
    count: int = 0
    raw: int = 0
    tables: set[tuple[str, ...]] = field(default_factory=set)
    deadline: float = 0.0


@dataclass(slots=True)
class Batch:
    device_id: str
    scans: list[Scan]
    count: int
    estimated_raw: int

    @property
    def oldest_ts_ms(self) -> int:
        return self.scans[0].ts_ms


class Batcher:
    def __init__(self, max_bytes: int, max_age: float) -> None:
        self.max_bytes = max_bytes
        self.max_age = max_age
        # The learnt ratio is against the envelope's metered size (body and properties), so
        # the whole budget is max_bytes.
        self._budget = max_bytes
        self._open: dict[str, _Open] = {}
        self._ratio: dict[str, float] = {}

    def add(self, scan: Scan, now: float) -> tuple[Batch | None, bool]:
        """Add a scan read at monotonic time ``now``.

        Returns (a batch that closed to make room, whether this scan opened a new batch, so
        the caller can arm a timer for :attr:`deadline`).
        """
        device = scan.device_id
        cost = SCAN_OVERHEAD + VALUE_BYTES * len(scan.values)
        current = self._open.get(device)
        closed = None
        if current is not None and current.scans:
            extra = cost if scan.names in current.tables else cost + _table_cost(scan.names)
            estimate = (current.raw + extra) * self._ratio.get(device, INITIAL_RATIO)
            if estimate > self._budget * FILL:
                closed = self._close(device, current)
                current = None
        opened = current is None
        if current is None:
            current = self._open[device] = _Open(deadline=now + self.max_age)
        if scan.names not in current.tables:
            current.tables.add(scan.names)
            cost += _table_cost(scan.names)
        current.scans.append(scan)
        current.count += len(scan.values)
        current.raw += cost
        return closed, opened

    def requeue(self, device_id: str, scans: list[Scan], now: float) -> bool:
        """Put scans that did not fit a sealed envelope back at the head of the device's open
        batch (they are older than anything in it). Returns whether a batch was opened."""
        current = self._open.get(device_id)
        opened = current is None
        if current is None:
            current = self._open[device_id] = _Open(deadline=now + self.max_age)
        for scan in scans:
            cost = SCAN_OVERHEAD + VALUE_BYTES * len(scan.values)
            if scan.names not in current.tables:
                current.tables.add(scan.names)
                cost += _table_cost(scan.names)
            current.count += len(scan.values)
            current.raw += cost
        current.scans[:0] = scans
        return opened

    def deadline(self, device_id: str) -> float | None:
        current = self._open.get(device_id)
        return current.deadline if current is not None and current.scans else None

    def take(self, device_id: str) -> Batch | None:
        """Close and return the device's open batch, if any."""
        current = self._open.get(device_id)
        if current is None or not current.scans:
            return None
        return self._close(device_id, current)

    def take_all(self) -> list[Batch]:
        return [b for d in list(self._open) if (b := self.take(d)) is not None]

    def observe(self, device_id: str, estimated_raw: int, sealed_bytes: int) -> None:
        """Learn the device's sealed/estimated ratio from a batch the sealer just sealed."""
        if estimated_raw <= 0:
            return
        seen = sealed_bytes / estimated_raw
        old = self._ratio.get(device_id)
        self._ratio[device_id] = seen if old is None else old + RATIO_WEIGHT * (seen - old)

    def _close(self, device_id: str, current: _Open) -> Batch:
        del self._open[device_id]
        return Batch(device_id, current.scans, current.count, current.raw)


def _table_cost(names: tuple[str, ...]) -> int:
    return sum(len(n) + 3 for n in names) + 4
