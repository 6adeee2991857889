"""The pipeline step, pure: admitted scans -> batches -> sealed envelopes.

    scan -> (gate admits?) -> batcher (per device, sized for the meter, bounded in age)
         -> sealer (envelopes of at most max_bytes) -> out

It holds no loop, no timer and no queue. Every call says what came out and, when a device's
open batch changed, the deadline its timer must be (re)armed for; the gateway's asyncio shell
(:class:`gateway.app.Intake`) keeps the timers and hands the envelopes to the store's writer.
Tests drive this same object with a clock of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.core.batcher import Batch, Batcher
from gateway.core.envelope import Sealer
from gateway.core.readings import UNAVAILABLE, Envelope, Scan


@dataclass(slots=True)
class Output:
    """What one step gave: envelopes to store, and whether to (re)arm the device's timer."""

    envelopes: list[Envelope] = field(default_factory=list)
    # The device's open batch must close at this (monotonic) time; None: keep the timer as is.
    arm: float | None = None


class PipelineStep:
    def __init__(self, batcher: Batcher, sealer: Sealer, admitted: Callable[[str], bool]) -> None:
        self._batcher = batcher
        self._sealer = sealer
        self._admitted = admitted
        self.readings = 0  # readings of admitted devices taken in
        self.unavailable = 0  # of those, points that could not be read (no value)

    def add(self, scan: Scan, read_at: float, now: float) -> Output | None:
        """Take a scan read at monotonic time ``read_at``, arriving at ``now``; None if its
        device is not admitted (quarantined: its refusal is already a security event)."""
        if not self._admitted(scan.device_id):
            return None
        self.readings += len(scan.values)
        if scan.quality == UNAVAILABLE:
            self.unavailable += len(scan.values)
        closed, opened = self._batcher.add(scan, read_at)
        out = Output()
        if opened:
            out.arm = self._batcher.deadline(scan.device_id)
        if closed is not None:
            self._seal(closed, now, out)
        return out

    def expire(self, device_id: str, now: float) -> Output:
        """The device's batch reached its deadline: seal it."""
        out = Output()
        batch = self._batcher.take(device_id)
        if batch is not None:
            self._seal(batch, now, out)
        return out

    def flush(self) -> list[Envelope]:
        """Seal every open batch whole (a stop): nothing is left over."""
        envelopes: list[Envelope] = []
        for batch in self._batcher.take_all():
            sealed = self._sealer.seal(batch, final=True)
            self._learn(batch.device_id, sealed.observed)
            envelopes += sealed.envelopes
        return envelopes

    def flush_device(self, device_id: str) -> list[Envelope]:
        """Seal one device's open batch whole (a reload removes or restarts the device)."""
        batch = self._batcher.take(device_id)
        if batch is None:
            return []
        sealed = self._sealer.seal(batch, final=True)
        self._learn(device_id, sealed.observed)
        return sealed.envelopes

    def _seal(self, batch: Batch, now: float, out: Output) -> None:
        sealed = self._sealer.seal(batch)
        self._learn(batch.device_id, sealed.observed)
        out.envelopes += sealed.envelopes
        # Scans that did not fit go to the head of the next batch, ahead of newer ones.
        if sealed.leftover and self._batcher.requeue(batch.device_id, sealed.leftover, now):
            out.arm = self._batcher.deadline(batch.device_id)

    def _learn(self, device_id: str, observed: list[tuple[int, int]]) -> None:
        for estimated, size in observed:
            self._batcher.observe(device_id, estimated, size)
