"""A shared link's units that fail in ways the link must not copy onto the others: a dead
unit with an identity method, a backed-off unit answering garbage, a unit refusing every point."""

from __future__ import annotations

import asyncio
from typing import Any

from adapters.base import DeviceHealth
from adapters.modbus.config import ModbusEndpoint, ModbusIdentity, Point, RtuOverTcpLink, TcpLink
from adapters.modbus.link import ModbusBus, ModbusLink

from conftest import free_ports
from rtu_servers import Units


def _units(
    link: Any,
    points: dict[int, list[Point]],
    scans: dict[int, list[Any]] | None = None,
    identity: ModbusIdentity | None = None,
) -> list[ModbusLink]:
    """One device per unit id of ``link``, reading ``points[unit]``; its scans go to
    ``scans[unit]`` (or nowhere)."""
    return [
        ModbusLink(
            f"dev-{u}",
            ModbusEndpoint(link=link.name, unit=u).on(link),
            pts,
            scans[u].append if scans is not None else lambda _s: None,
            lambda _e: None,
            DeviceHealth(f"dev-{u}"),
            transport=link.transport,
            identity=identity,
        )
        for u, pts in points.items()
    ]


def test_a_dead_unit_with_an_identity_method_does_not_stop_its_link() -> None:
    port = free_ports(1)
    link = TcpLink(name="gw", type="tcp", host="127.0.0.1", port=port, timeout=0.2)
    points = [Point(name=f"r{a}", address=a, period=0.05) for a in range(4)]
    identity = ModbusIdentity.model_validate(
        {"registers": [{"name": "serial", "address": 0, "count": 1, "format": "uint"}]}
    )
    scans: dict[int, list] = {1: [], 2: [], 3: []}

    async def go() -> int:
        async with Units("tcp", port, [1, 2]) as server:  # unit 3 is not there
            units = _units(link, {u: points for u in (1, 2, 3)}, scans, identity)
            bus = ModbusBus(link, units, backoff_min=0.2, backoff_max=1.0)
            task = asyncio.create_task(bus.run())
            await asyncio.sleep(3.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return server.connections

    connections = asyncio.run(asyncio.wait_for(go(), 20))
    assert scans[1] and scans[2], (connections, {u: len(s) for u, s in scans.items()})


def test_a_backed_off_unit_answering_garbage_is_still_probed_rarely() -> None:
    port = free_ports(1)
    link = RtuOverTcpLink(name="ser", type="rtu-over-tcp", host="127.0.0.1", port=port, timeout=0.2)
    points = [Point(name=f"r{a}", address=a, period=0.5) for a in range(4)]

    async def go() -> tuple[int, int]:
        async with Units("rtu-over-tcp", port, [1, 2]) as server:
            server.served = [1]  # unit 2 silent: it times out and is backed off
            units = _units(link, {u: points for u in (1, 2)})
            bus = ModbusBus(link, units, backoff_min=0.5, backoff_max=5.0)
            task = asyncio.create_task(bus.run())
            await asyncio.sleep(1.0)
            server.served = [1, 2]
            server.corrupt(2, every=1)  # now it answers, every frame with a bad CRC
            before = server.requests[2]
            await asyncio.sleep(2.0)
            after = server.requests[2]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return before, after

    before, after = asyncio.run(asyncio.wait_for(go(), 20))
    # Backed off from 0.5 s doubling: a handful of probes in 2 s, not one per free slot.
    assert after - before <= 6, after - before


def test_a_unit_refusing_every_point_is_probed_again_on_a_shared_link() -> None:
    port = free_ports(1)
    link = TcpLink(name="gw", type="tcp", host="127.0.0.1", port=port, timeout=0.3)
    good = [Point(name=f"r{a}", address=a, period=0.05) for a in range(4)]
    beyond = [Point(name=f"x{a}", address=a, period=0.05) for a in (40, 41)]  # size is 32

    async def go() -> tuple[list[int], int]:
        async with Units("tcp", port, [1, 2]) as server:
            units = _units(link, {u: pts for u, pts in ((1, good), (2, beyond))})
            bus = ModbusBus(link, units, backoff_min=0.2, backoff_max=0.4)
            task = asyncio.create_task(bus.run())
            seen = []
            for _ in range(6):
                await asyncio.sleep(0.5)
                seen.append(server.requests[2])
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return seen, server.connections

    seen, _connections = asyncio.run(asyncio.wait_for(go(), 20))
    # Backed off with probes every 0.2-0.4 s: unit 2 must keep being asked.
    assert seen[-1] > seen[1], seen
