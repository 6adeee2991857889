"""One BLE radio (``hci0``, ...): what the devices on it share.

A :class:`BleAdapter` owns discovery, the connection slots, one connect at a time, the bond
book and fieldgate's own pairing agent; each allow-listed device has its own task
(:class:`~adapters.ble.link.BleLink`), so a dead or slow device only ever delays itself.

Devices whose decode table only polls give their connection slot back between polls when the
adapter has more devices than slots; devices that notify keep theirs. Discovery runs while a
link waits for its device, and for ``scan_window`` seconds every ``scan_every`` seconds, so that
advertisers carrying the fleet's company id but not allow-listed get reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from adapters.base import Admit, DeviceHealth, ScanSink, Unknown
from adapters.ble import bluez
from adapters.ble.bonds import BondBook
from adapters.ble.config import BleEndpoint, BleSection
from adapters.ble.link import BleLink
from gateway.core.backoff import backoff_delay

log = logging.getLogger("adapters.ble")


class BleAdapter:
    """What the devices on one radio share (``devices``: device id -> its endpoint). Run
    :meth:`run` until cancelled."""

    def __init__(
        self,
        name: str,
        section: BleSection,
        devices: Mapping[str, BleEndpoint],
        *,
        sink: ScanSink,
        admit: Admit,
        unknown: Unknown,
        health: dict[str, DeviceHealth],
        state_dir: Path,
    ) -> None:
        self.name = name
        self.section = section
        self.sink = sink
        self.admit = admit
        self.unknown = unknown
        self.bonds = BondBook(state_dir)
        self.agent = bluez.Agent()
        self.connect_lock = asyncio.Lock()
        slots = section.max_connections
        rotate = len(devices) > slots
        self.slots = asyncio.Semaphore(slots)
        # When polled devices rotate through the slots, notifying devices leave one free.
        held = slots - 1 if rotate and slots > 1 else slots
        self.held_slots = asyncio.Semaphore(held)
        self.links = [
            BleLink(self, device_id, ble, health[device_id], rotate=rotate and ble.polls)
            for device_id, ble in devices.items()
        ]
        holders = sum(1 for link in self.links if not link.rotate)
        if holders > held:
            log.warning(
                "%s: %d devices keep a connection but the adapter has %d slots for them; "
                "the rest wait for a slot",
                name,
                holders,
                held,
            )
        self._by_address = {
            link.ble.address: link for link in self.links if link.ble.address is not None
        }
        self._by_app_id = {
            link.ble.app_id: link for link in self.links if link.ble.app_id is not None
        }
        self._wanted = asyncio.Event()
        self._complete = asyncio.Event()

    async def run(self) -> None:
        if self.section.dbus_address:
            # bleak and dbus-fast take the system bus from the environment.
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.section.dbus_address
        attempt = 0
        while True:
            try:
                await bluez.ready()
                await self.agent.__aenter__()  # left in the finally below
                break
            except bluez.BlueZUnavailable as err:
                # No bluetoothd (yet): the BLE devices wait, the rest of the gateway runs on.
                for link in self.links:
                    link.health.down(err.reason)
                attempt += 1
                section = self.section
                await asyncio.sleep(
                    backoff_delay(attempt, section.backoff_min, section.backoff_max)
                )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._discover(), name=f"ble-scan[{self.name}]")
                for link in self.links:
                    group.create_task(link.run(), name=f"ble[{link.device_id}]")
        finally:
            await self.agent.__aexit__(None, None, None)

    def want(self) -> None:
        """A link needs its device found (again): discovery runs until every link has it."""
        self._complete.clear()
        self._wanted.set()

    def check_complete(self) -> None:
        if not any(link.needs_device for link in self.links):
            self._complete.set()

    async def _discover(self) -> None:
        section = self.section
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(section.scan_every):
                    await self._wanted.wait()
            try:
                async with bluez.Scanner(self.name, self._seen):
                    log.debug("%s: discovering", self.name)
                    self._wanted.clear()
                    await asyncio.sleep(section.scan_window)
                    self.check_complete()
                    await self._complete.wait()
            except bluez.BlueZError as err:
                log.warning("%s: %s", self.name, err.reason)
                await asyncio.sleep(backoff_delay(3, section.backoff_min, section.backoff_max))
                continue
            log.debug("%s: discovery stopped", self.name)
            self._wanted.clear()

    def _seen(self, found: bluez.Found, manufacturer_data: dict[int, bytes]) -> None:
        link = self._by_address.get(found.address)
        if link is not None:
            link.found(found)
            return
        data = manufacturer_data.get(self.section.company_id)
        if data is None:
            return  # not one of the fleet's kind: somebody else's device
        app_id = data.decode("utf-8", "replace")
        link = self._by_app_id.get(app_id) if app_id else None
        if link is not None:
            link.found(found)
            return
        seen = (
            f"{found.address} advertises app id {app_id!r}"
            if app_id
            else f"address {found.address}"
        )
        self.unknown("ble", f"{self.name}/{found.address}", seen)
