"""What every adapter gives the gateway, and what the gateway gives every adapter.

An adapter polls or listens to its devices and hands each read to a :data:`ScanSink` as a
:class:`~gateway.core.readings.Scan`. Before a device's data may flow, the adapter collects
:class:`Evidence` of the device's identity and asks the gateway's auth gate (an
:data:`Admit` callable) to admit it; a refused device is quarantined and never polled again in
this run. Health is kept per device and logs transitions, not repetitions.

Requests come in through a :class:`DeviceLink`: a fresh read of named points, or a write of one
point, served on the link's own connection and schedule (a Modbus link serves them from the same
task that polls, so one request is on the wire at a time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.core.auth import Evidence as Evidence  # what adapters hand the gate
from gateway.core.errors import FieldgateError
from gateway.core.readings import Scan

log = logging.getLogger("fieldgate.devices")

ScanSink = Callable[[Scan], None]

UP = "up"
DOWN = "down"
STARTING = "starting"
QUARANTINED = "quarantined"


# Returns None when admitted, or the reason the device is refused.
Admit = Callable[[Evidence], str | None]
# A device that is not in the registry showed itself: (transport, endpoint, what was seen).
Unknown = Callable[[str, str, str], None]


class NotWritable(FieldgateError):
    """A write was refused before it reached the device: ``point`` takes no writes."""

    def __init__(self, device_id: str, point: str, reason: str) -> None:
        self.device_id = device_id
        self.point = point
        self.reason = reason
        super().__init__(f"{device_id}: {point} is not writable: {reason}")


class DeviceLink(Protocol):
    """One device's link, as the gateway (and the control path to come) sees it."""

    device_id: str
    health: DeviceHealth

    async def run(self) -> None:
        """Connect, ask the gate, deliver readings until cancelled (reconnecting as needed)."""

    async def read(self, points: Sequence[str]) -> Scan:
        """A fresh read of ``points`` (every point if empty); ``Scan.quality`` says whether
        all of them were read. Raises ``DeviceUnavailable`` while the device is not
        connected."""

    async def write(self, point: str, value: Any) -> Scan:
        """Write ``value`` to ``point`` and read it back. Raises :class:`NotWritable` for a
        point that takes no writes, ``DeviceUnavailable`` when the device cannot be reached."""


@dataclass(slots=True)
class DeviceHealth:
    device_id: str
    state: str = STARTING
    since: float = field(default_factory=time.time)
    reads_ok: int = 0
    reads_failed: int = 0
    # Unix time of the last successful read (None: none yet in this run). Set by read_ok():
    # one time.time() per read, the cost of the "last successful read" series.
    last_ok: float | None = None
    malformed: int = 0
    malformed_causes: dict[str, int] = field(default_factory=dict)
    overruns: int = 0
    last_error: str | None = None
    # Configuration problems found while polling (a point the device never answers), once each.
    config_problems: list[str] = field(default_factory=list)
    # Called at each change of state (the twin's reported properties follow it).
    watchers: list[Callable[[], None]] = field(default_factory=list)

    def _changed(self) -> None:
        for watcher in self.watchers:
            watcher()

    def read_ok(self) -> None:
        """A read succeeded: counted, timed, and the device is up."""
        self.reads_ok += 1
        self.last_ok = time.time()
        self.up()

    def up(self) -> None:
        if self.state != UP:
            if self.state == DOWN:
                log.info("%s: recovered", self.device_id)
            self.state, self.since = UP, time.time()
            self._changed()
        # Cleared on every good read, so that the next episode of errors is told again.
        self.last_error = None

    def down(self, reason: str) -> None:
        if self.state != DOWN:
            log.warning("%s: unavailable: %s", self.device_id, reason)
            self.state, self.since = DOWN, time.time()
            self._changed()
        self.last_error = reason

    def quarantine(self, reason: str) -> None:
        log.error("%s: quarantined: %s", self.device_id, reason)
        self.state, self.since, self.last_error = QUARANTINED, time.time(), reason
        self._changed()
