"""Requests in: a Modbus link's read() and write() against the real pymodbus simulator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from adapters.base import DeviceHealth, NotWritable
from adapters.modbus.config import ModbusEndpoint, Point
from adapters.modbus.link import ModbusLink
from adapters.modbus.sim.devices import DeviceSpec, SimulatedFleet, make_points
from gateway.core.errors import DeviceUnavailable
from gateway.core.readings import GOOD, Scan

from conftest import free_ports

# Points the simulator does not refresh (past its own map), so a write stays written.
SETPOINT = Point(name="setpoint", address=40, table="holding", type="int16", scale=0.1)
LIMIT = Point(name="limit", address=42, table="holding", type="float32")
RELAY = Point(name="relay", address=20, table="coil", type="bool")
# Written only: the device answers exception 02 to it (its register is not mapped).
UNMAPPED = Point(name="unmapped", address=46, table="holding", type="uint16")


async def _with_link(
    body: Callable[[ModbusLink, SimulatedFleet], Awaitable[Any]],
    *,
    fault: str | None = None,
    holes: frozenset[tuple[str, int]] = frozenset(),
) -> Any:
    port = free_ports(1)
    sim_points = make_points(9, period=0.05)
    spec = DeviceSpec("plc-1", port, points=sim_points, fault=fault, holes=holes)
    points = [sp.point for sp in sim_points] + [SETPOINT, LIMIT, RELAY, UNMAPPED]
    first = asyncio.Event()

    def sink(_scan: Scan) -> None:
        first.set()

    async with SimulatedFleet([spec]) as fleet:
        link = ModbusLink(
            "plc-1",
            ModbusEndpoint(host="127.0.0.1", port=port, timeout=1.0),
            points,
            sink,
            lambda _e: None,
            DeviceHealth("plc-1"),
        )
        task = asyncio.create_task(link.run(), name="modbus[plc-1]")
        try:
            if fault is None:
                await asyncio.wait_for(first.wait(), 5)
            return await body(link, fleet)
        finally:
            task.cancel("the test is over")
            with pytest.raises(asyncio.CancelledError):
                await task


def test_read_returns_fresh_values_of_the_named_points() -> None:
    async def body(link: ModbusLink, fleet: SimulatedFleet) -> Scan:
        before = fleet.devices[0].requests
        scan = await asyncio.wait_for(link.read(["float32_0", "bool_6", "uint16_2"]), 5)
        assert fleet.devices[0].requests > before
        return scan

    scan = asyncio.run(_with_link(body))
    assert scan.device_id == "plc-1" and scan.quality == GOOD
    assert scan.names == ("float32_0", "bool_6", "uint16_2")
    assert isinstance(scan.values[0], float) and isinstance(scan.values[1], bool)
    assert isinstance(scan.values[2], int)


def test_write_holding_registers_and_coils_then_read_them_back() -> None:
    async def body(link: ModbusLink, _fleet: SimulatedFleet) -> list[Scan]:
        out = [
            await asyncio.wait_for(link.write("setpoint", 12.3), 5),  # FC 6
            await asyncio.wait_for(link.write("limit", 80.5), 5),  # FC 16, two registers
            await asyncio.wait_for(link.write("relay", True), 5),  # FC 5
        ]
        out.append(await asyncio.wait_for(link.read(["setpoint", "limit", "relay"]), 5))
        out.append(await asyncio.wait_for(link.write("relay", False), 5))
        return out

    setpoint, limit, relay, again, relay_off = asyncio.run(_with_link(body))
    assert setpoint.values == [pytest.approx(12.3)] and setpoint.quality == GOOD
    assert limit.values == [80.5]
    assert relay.values == [True]
    assert again.values == [pytest.approx(12.3), 80.5, True]
    assert relay_off.values == [False]


def test_read_only_points_refuse_a_write_before_it_reaches_the_device() -> None:
    async def body(link: ModbusLink, fleet: SimulatedFleet) -> None:
        for name in ("uint16_2", "bool_8"):  # an input register, a discrete input
            before = fleet.devices[0].requests
            with pytest.raises(NotWritable, match="read-only"):
                await link.write(name, 1)
            assert fleet.devices[0].requests - before <= 1  # only polls went out meanwhile
        with pytest.raises(KeyError):
            await link.write("nonesuch", 1)

    asyncio.run(_with_link(body))


def test_a_request_to_a_device_that_is_not_connected_fails_at_once() -> None:
    async def body(link: ModbusLink, _fleet: SimulatedFleet) -> None:
        with pytest.raises(DeviceUnavailable, match="not connected"):
            await asyncio.wait_for(link.read([]), 1)

    asyncio.run(_with_link(body, fault="down"))


def test_a_write_the_device_refuses_fails_that_request_and_the_link_goes_on() -> None:
    async def body(link: ModbusLink, fleet: SimulatedFleet) -> None:
        with pytest.raises(DeviceUnavailable) as refused:
            await asyncio.wait_for(link.write("unmapped", 7), 5)
        assert refused.value.cause == "exception" and "0x02" in refused.value.reason
        # The connection and the polls are untouched: the next request is served at once.
        assert link.health.state == "up"
        written = await asyncio.wait_for(link.write("setpoint", 12.5), 5)
        assert written.values == [pytest.approx(12.5)] and written.quality == GOOD

    asyncio.run(_with_link(body, holes=frozenset({("holding", 46)})))


def test_a_request_is_planned_as_the_polls_learnt_to_read_the_device() -> None:
    """The polls learnt that holding 46 is a hole ('unmapped' answers 02). A request for
    'limit' (42-43) and 'unmapped' is not one bridged read refused whole: 'limit' arrives,
    'unmapped' stays None and the scan says BAD."""

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> Scan:
        async with asyncio.timeout(5):
            while "unmapped" not in link.unreadable:  # noqa: ASYNC110 (nothing signals it)
                await asyncio.sleep(0.02)
        return await asyncio.wait_for(link.read(["limit", "unmapped"]), 5)

    scan = asyncio.run(_with_link(body, holes=frozenset({("holding", 46)})))
    assert scan.names == ("limit", "unmapped")
    assert scan.values[0] is not None and scan.values[1] is None
    assert scan.quality == "bad"
