"""BLE writes with real parts: a BleLink in this process, bleak's own BlueZ backend, the
simulated bluetoothd of `fieldgate simulate ble --writable` on a private D-Bus. The simulator
holds what was written and counts every write that reaches a peripheral."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.base import DeviceHealth, NotWritable
from adapters.ble import gatt
from adapters.ble.adapter import BleAdapter
from adapters.ble.link import BleLink
from adapters.ble.sim.control import SimControl
from adapters.ble.sim.fleet import setpoint_raw
from gateway.config import load
from gateway.core.errors import DeviceUnavailable
from gateway.core.readings import GOOD, Scan

from conftest import Proc, edit_config, start_ble_simulator

pytestmark = pytest.mark.slow

INITIAL = setpoint_raw(0) / 100  # what ble-1's setpoint reads as before any write


def written(raw_hex: str) -> float:
    """The simulator's setpoint bytes as the value they decode to."""
    (raw,) = struct.unpack(gatt.SETPOINT_FORMAT, bytes.fromhex(raw_hex))
    return float(raw) / 100


class Delivered:
    """The link's sink: the scans it delivered, and a wait for more of them."""

    def __init__(self) -> None:
        self.scans: list[Scan] = []
        self._new = asyncio.Event()

    def __call__(self, scan: Scan) -> None:
        self.scans.append(scan)
        self._new.set()

    def __len__(self) -> int:
        return len(self.scans)

    def of(self, point: str, after: int = 0) -> list[Scan]:
        return [s for s in self.scans[after:] if point in s.names]

    async def more(self, point: str, after: int, count: int = 3) -> None:
        """Return once ``count`` scans holding ``point`` arrived after index ``after``."""
        while len(self.of(point, after)) < count:
            self._new.clear()
            await self._new.wait()


Scenario = Callable[[BleLink, SimControl, Delivered], Awaitable[None]]


def run_link(
    tmp_path: Path,
    pki_dir: Path,
    procs: list[Proc],
    monkeypatch: pytest.MonkeyPatch,
    scenario: Scenario,
    *,
    ble: dict[str, object] | None = None,
) -> None:
    """One simulated peripheral (ble-1, notifying at 10 Hz, setpoint polled every 0.5 s) and
    its link in this process; ``scenario`` runs once the link delivers data."""
    config_path, _, bus = start_ble_simulator(
        procs, tmp_path, pki_dir, 1, 1, "--rate", "10", "--poll-period", "0.5", "--writable"
    )
    if ble:
        edit_config(config_path, ble=ble)
    config = load(config_path, check_files=False)
    # The adapter points bleak at the simulator's bus through the environment: undone after.
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus)
    devices = {d.id: d.ble for d in config.devices if d.ble is not None}

    async def main() -> None:
        scans = Delivered()
        adapter = BleAdapter(
            "hci0",
            config.ble,
            devices,
            sink=scans,
            admit=lambda _e: None,
            unknown=lambda *_a: None,
            health={d: DeviceHealth(d) for d in devices},
            state_dir=tmp_path / "in-process-state",
        )
        link = adapter.links[0]
        async with SimControl(bus) as control:
            task = asyncio.create_task(adapter.run(), name="ble[hci0]")
            try:
                await asyncio.wait_for(scans.more("counter", 0), 30)
                await scenario(link, control, scans)
            finally:
                task.cancel("the test is over")
                with pytest.raises(asyncio.CancelledError):
                    await task

    asyncio.run(main())


async def device_stats(control: SimControl) -> dict[str, Any]:
    stats: dict[str, Any] = (await control.stats())["devices"]["ble-1"]
    return stats


def test_a_write_reaches_the_peripheral_with_response_and_reads_back_what_it_holds(
    tmp_path: Path, pki_dir: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(link: BleLink, control: SimControl, scans: Delivered) -> None:
        before = await device_stats(control)
        assert written(before["setpoint"]) == INITIAL and before["writes"] == 0

        scan = await asyncio.wait_for(link.write("setpoint", 23.45), 10)
        assert scan.device_id == "ble-1" and scan.names == ("setpoint",)
        assert scan.quality == GOOD
        assert scan.values == [pytest.approx(23.45)]
        after = await device_stats(control)
        assert written(after["setpoint"]) == pytest.approx(23.45)  # the device holds it
        assert (after["writes"], after["write_requests"]) == (1, 1)  # with response
        assert after["writes_refused"] == 0

        # A negative value, then the lowest the int16 holds: the byte order and sign kept.
        assert (await link.write("setpoint", -5)).values == [pytest.approx(-5.0)]
        assert (await link.write("setpoint", -327.68)).values == [pytest.approx(-327.68)]
        assert written((await device_stats(control))["setpoint"]) == pytest.approx(-327.68)

        # The polls report the new value too: it is the device's, not a cached echo.
        mark = len(scans)
        await asyncio.wait_for(scans.more("setpoint", mark, 1), 10)
        assert scans.of("setpoint", mark)[-1].values == [pytest.approx(-327.68)]
        # A fresh read agrees.
        assert (await link.read(["setpoint"])).values == [pytest.approx(-327.68)]

        # Concurrent writes are served one at a time, each with its own read back.
        values = [10.0, 11.0, 12.0, 13.0]
        results = await asyncio.gather(*(link.write("setpoint", v) for v in values))
        assert [r.values for r in results] == [[pytest.approx(v)] for v in values]
        final = await device_stats(control)
        assert written(final["setpoint"]) == pytest.approx(13.0)
        assert final["writes"] == 7
        assert (final["connects"], final["disconnects"]) == (1, 0)

    run_link(tmp_path, pki_dir, procs, monkeypatch, scenario)


def test_refused_writes_never_reach_the_peripheral(
    tmp_path: Path, pki_dir: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(link: BleLink, control: SimControl, scans: Delivered) -> None:
        # A value on a characteristic the decode table does not mark writable.
        for point in ("temperature", "counter", "supply"):
            with pytest.raises(NotWritable) as refused:
                await link.write(point, 21.0)
            assert refused.value.point == point
            assert "is not marked writable in the decode table" in str(refused.value)
        # Values the setpoint's int16 at 0.01 cannot hold, or of the wrong type.
        for value, why in [
            (327.68, "outside what an int16 holds (-327.68 to 327.67)"),
            (-1000, "outside what an int16 holds"),
            (21.505, "holds only a whole number of steps of 0.01"),
            ("21.5", "an int16 field takes a number"),
            (True, "an int16 field takes a number"),
            (None, "an int16 field takes a number"),
            (float("nan"), "not a finite number"),
        ]:
            with pytest.raises(gatt.InvalidValue) as bad:
                await link.write("setpoint", value)
            assert isinstance(bad.value, ValueError)
            assert why in str(bad.value) and str(bad.value).startswith("setpoint: ")
        with pytest.raises(KeyError, match="nonesuch"):
            await link.write("nonesuch", 1)

        stats = await device_stats(control)
        assert (stats["writes"], stats["write_requests"]) == (0, 0)
        assert written(stats["setpoint"]) == INITIAL
        assert link.health.state == "up"

    run_link(tmp_path, pki_dir, procs, monkeypatch, scenario)


def test_a_write_the_peripheral_refuses_fails_with_its_att_error_and_the_link_goes_on(
    tmp_path: Path, pki_dir: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(link: BleLink, control: SimControl, scans: Delivered) -> None:
        for code, text in [
            ("0x80", "ATT error 0x80 (Application-specific Error 0x80)"),
            ("0x03", "ATT error 0x03 (Write Not Permitted)"),
            ("0x0d", "ATT error 0x0D (Invalid Attribute Value Length)"),
        ]:
            await control.set("ble-1", "write-error", code)  # the peripheral's application
            with pytest.raises(DeviceUnavailable) as failed:
                await asyncio.wait_for(link.write("setpoint", 25.0), 10)
            assert failed.value.cause == "exception"
            assert failed.value.reason == f"write setpoint refused: {text}"
            assert failed.value.device_id == "ble-1"

        # Notifications and polls went on through the refusals, on the same connection.
        mark = len(scans)
        await asyncio.wait_for(scans.more("counter", mark), 10)
        await asyncio.wait_for(scans.more("setpoint", mark), 10)
        assert all(s.values == [INITIAL] for s in scans.of("setpoint"))
        stats = await device_stats(control)
        assert (stats["connects"], stats["disconnects"]) == (1, 0)
        assert (stats["writes"], stats["writes_refused"]) == (3, 3)
        assert written(stats["setpoint"]) == INITIAL
        assert link.health.state == "up"

        # Once the peripheral takes writes again, the next one goes through.
        await control.set("ble-1", "write-error", "none")
        assert (await link.write("setpoint", 25.0)).values == [pytest.approx(25.0)]

    run_link(tmp_path, pki_dir, procs, monkeypatch, scenario)


def test_a_write_without_an_answer_in_time_times_out_and_a_device_not_connected_is_unavailable(
    tmp_path: Path, pki_dir: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(link: BleLink, control: SimControl, scans: Delivered) -> None:
        await control.set("ble-1", "write-delay", "3")
        with pytest.raises(DeviceUnavailable) as late:
            await link.write("setpoint", 19.0)
        assert late.value.cause == "timeout"
        assert late.value.reason == (
            "write setpoint: no answer within 1 s; it may have reached the device"
        )
        await control.set("ble-1", "write-delay", "0")
        # The late write still lands on the device, as one on a radio would.
        # (Another process's state: no event to wait on, so it is polled.)
        while written((await device_stats(control))["setpoint"]) != 19.0:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert (await link.write("setpoint", 18.0)).values == [pytest.approx(18.0)]
        mark = len(scans)
        await asyncio.wait_for(scans.more("counter", mark), 10)

        # The link dropped and not back yet: refused before anything is sent.
        connection = link.connection
        link.connection = None
        try:
            with pytest.raises(DeviceUnavailable) as down:
                await link.write("setpoint", 17.0)
        finally:
            link.connection = connection
        assert (down.value.cause, down.value.reason) == ("unavailable", "not connected")
        stats = await device_stats(control)
        assert stats["writes"] == 2  # the late one and 18.0
        assert (stats["connects"], stats["disconnects"]) == (1, 0)

    run_link(tmp_path, pki_dir, procs, monkeypatch, scenario, ble={"request_timeout": 1.0})
