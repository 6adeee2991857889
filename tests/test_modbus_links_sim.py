"""Modbus links against the paced bus simulators (branch rtusim): a serial line that times every
character at its baud rate and counts overlaps, RTU over TCP onto that line, and a
serial-to-Ethernet gateway that takes one connection."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from adapters.base import DOWN, UP, DeviceHealth
from adapters.modbus.admission import ModbusRequirements
from adapters.modbus.config import (
    ModbusEndpoint,
    ModbusIdentity,
    RtuLink,
    RtuOverTcpLink,
    TcpLink,
)
from adapters.modbus.identity import collect_fingerprint, comparable
from adapters.modbus.link import ModbusBus, ModbusLink, UnitSource
from adapters.modbus.sim.bus import MbapGateway, RtuBus, RtuOverTcp, rtu_line
from adapters.modbus.sim.devices import DeviceSpec, held_value, make_points
from adapters.modbus.sim.rtuframe import LineTiming
from adapters.modbus.transport import ModbusTransport, Target
from gateway.core.auth import AuthGate, Registration
from gateway.core.readings import GOOD, Scan

from conftest import free_ports
from rtu_servers import SOCAT

STEP = 1000.0  # the simulated values hold still for the length of a test
PERIOD = 0.2
FC43 = ModbusIdentity(fc43=True)


def _specs(units: list[int], faults: dict[int, str] | None = None) -> list[DeviceSpec]:
    return [
        DeviceSpec(
            f"plc-{u}",
            0,
            unit=u,
            points=make_points(10, types=["uint16"], period=PERIOD, seed=u),
            fault=(faults or {}).get(u),
        )
        for u in units
    ]


class Run:
    """The link's devices, one per spec, their scans and health."""

    def __init__(
        self, link: Any, specs: list[DeviceSpec], admit: Any = None, identity: Any = None
    ) -> None:
        self.specs = {s.unit: s for s in specs}
        self.scans: dict[int, list[Scan]] = {s.unit: [] for s in specs}
        self.health = {s.unit: DeviceHealth(s.device_id) for s in specs}
        devices = [
            ModbusLink(
                s.device_id,
                ModbusEndpoint(link=link.name, unit=s.unit).on(link),
                [sp.point for sp in s.points],
                self.scans[s.unit].append,
                admit or (lambda _e: None),
                self.health[s.unit],
                transport=link.transport,
                identity=identity,
            )
            for s in specs
        ]
        self.bus = ModbusBus(link, devices, backoff_min=0.5, backoff_max=5.0)

    async def run_for(self, seconds: float) -> None:
        task = asyncio.create_task(self.bus.run())
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def good(self, unit: int) -> list[Scan]:
        return [s for s in self.scans[unit] if s.quality == GOOD]

    def right(self, unit: int) -> bool:
        """Every value of every scan of ``unit`` is what the simulated device holds."""
        points = {sp.point.name: sp for sp in self.specs[unit].points}
        now = int(time.time() / STEP)  # the simulator's time step (or the one before it)
        return all(
            v in {held_value(points[n].point, points[n].seed, k) for k in (now - 1, now)}
            for scan in self.scans[unit]
            for n, v in zip(scan.names, scan.values, strict=True)
        )


async def _fingerprints(link: Any, specs: list[DeviceSpec]) -> dict[int, dict[str, str]]:
    """Each answering unit's FC 43 fingerprint, read as `fieldgate enroll` reads it (one
    connection for the link); a unit that does not answer is left out."""
    async with ModbusTransport(link, lambda _c, _t: None) as transport:
        seen: dict[int, dict[str, str]] = {}
        for s in specs:
            if s.fault == "dead":
                continue
            target = Target(s.device_id, s.unit, f"{link.name}/unit {s.unit}")
            found = await collect_fingerprint(UnitSource(transport, target), FC43)
            assert found.refusal is None, found.refusal
            seen[s.unit] = comparable(found.values)
        return seen


def _gate(
    link: Any, specs: list[DeviceSpec], pinned: dict[int, dict[str, str]], record: Any
) -> AuthGate:
    """The auth gate over the link's units, each with its enrolled (``pinned``) fingerprint."""
    return AuthGate(
        [
            Registration(
                s.device_id,
                link.transport,
                f"{link.name}/unit {s.unit}",
                requirements=ModbusRequirements(True, pinned[s.unit]),
            )
            for s in specs
        ],
        record,
    )


@pytest.mark.skipif(SOCAT is None, reason="socat is not installed")
def test_paced_bus_of_8_units_one_dead_keeps_the_others_rate(tmp_path: Path) -> None:
    specs = _specs(list(range(1, 9)), {3: "dead"})
    timing = LineTiming(38400)

    async def go() -> tuple[Run, dict[str, Any]]:
        async with rtu_line(specs, tmp_path / "line", timing, step=STEP) as sim:
            link = RtuLink(name="bus-1", type="rtu", port=str(sim.path), baud=38400, parity="N")
            link = link.model_copy(update={"timeout": 0.3})
            run = Run(link, specs)
            await run.run_for(4.0)
            return run, sim.bus.stats()

    run, stats = asyncio.run(go())
    assert stats["overlaps"] == 0 and stats["bad_frames"] == 0
    for unit in (1, 2, 4, 5, 6, 7, 8):
        # Every 0.2 s for 4 s: about 20 reads. A bus that waited out the dead unit's 0.3 s
        # timeout every round would give each about 9.
        assert len(run.good(unit)) >= 15, (unit, len(run.good(unit)))
        assert run.right(unit) and run.health[unit].state == UP
    assert run.scans[3] == [] and run.health[3].state == DOWN
    assert 1 <= stats["units"]["3"]["requests"] <= 6, stats["units"]["3"]


@pytest.mark.skipif(SOCAT is None, reason="socat is not installed")
def test_crc_faults_on_the_paced_line_are_counted_never_forwarded(tmp_path: Path) -> None:
    specs = _specs([1, 2], {2: "crc:4"})

    async def go() -> tuple[Run, dict[str, Any]]:
        async with rtu_line(specs, tmp_path / "line", LineTiming(38400), step=STEP) as sim:
            link = RtuLink(name="bus-1", type="rtu", port=str(sim.path), baud=38400, parity="N")
            run = Run(link, specs)
            await run.run_for(3.0)
            return run, sim.bus.stats()

    run, stats = asyncio.run(go())
    faults = stats["units"]["2"]["crc_faults"]
    assert faults >= 3
    assert run.health[2].malformed_causes == {"crc": faults}
    assert run.health[1].malformed == 0
    assert run.good(1) and run.good(2) and run.right(1) and run.right(2)


def test_rtu_over_tcp_onto_the_paced_line() -> None:
    specs = _specs([1, 2, 3])
    port = free_ports(1)

    async def go() -> tuple[Run, dict[str, Any]]:
        async with (
            RtuBus(specs, LineTiming(38400), step=STEP) as bus,
            RtuOverTcp(bus, "127.0.0.1", port),
        ):
            link = RtuOverTcpLink(name="ser", type="rtu-over-tcp", host="127.0.0.1", port=port)
            run = Run(link, specs)
            await run.run_for(2.0)
            return run, bus.stats()

    run, stats = asyncio.run(go())
    assert stats["overlaps"] == 0 and stats["connections"] == 1
    for unit in (1, 2, 3):
        assert len(run.good(unit)) >= 7 and run.right(unit), unit


def test_gateway_with_16_units_and_one_connection() -> None:
    specs = _specs(list(range(1, 17)))
    port = free_ports(1)

    async def go() -> tuple[Run, dict[str, Any]]:
        async with MbapGateway(specs, "127.0.0.1", port, max_connections=1, step=STEP) as gw:
            link = TcpLink(name="gw", type="tcp", host="127.0.0.1", port=port)
            run = Run(link, specs)
            await run.run_for(2.0)
            return run, gw.stats()

    run, stats = asyncio.run(go())
    assert stats["connections"] == 1 and stats["connections_refused"] == 0
    assert stats["overlaps"] == 0
    for unit in range(1, 17):
        assert len(run.good(unit)) >= 7 and run.right(unit), unit


@pytest.mark.skipif(SOCAT is None, reason="socat is not installed")
def test_units_on_a_paced_line_are_verified_by_their_own_fc43_objects(tmp_path: Path) -> None:
    """Identity on a shared serial link: each unit answers FC 43 with its own objects (through
    the line's framing and pacing); a unit whose objects are not the enrolled ones (plc-2,
    pinned with plc-3's, as after a swap on the bus) is quarantined before any of its
    readings, with the event naming expected and seen; the others are read."""

    specs = _specs([1, 2, 3])
    events: list[tuple[Any, ...]] = []

    async def go() -> Run:
        async with rtu_line(specs, tmp_path / "line", LineTiming(38400), step=STEP) as sim:
            link = RtuLink(name="bus-1", type="rtu", port=str(sim.path), baud=38400, parity="N")
            seen = await _fingerprints(link, specs)
            pinned = {1: seen[1], 2: seen[3], 3: seen[3]}
            gate = _gate(link, specs, pinned, lambda *e, **f: events.append((*e, f)))
            run = Run(link, specs, admit=gate.admit, identity=FC43)
            await run.run_for(2.0)
            return run

    run = asyncio.run(go())
    assert run.scans[2] == [] and run.health[2].state != UP
    assert run.good(1) and run.good(3) and run.right(1) and run.right(3)
    refused = [e for e in events if e[0] == "device-quarantined"]
    assert refused and refused[0][1] == "plc-2"
    assert "identity mismatch" in refused[0][2] and "expected" in refused[0][2]
    assert "seen" in refused[0][2]


@pytest.mark.skipif(SOCAT is None, reason="socat is not installed")
def test_a_dead_unit_whose_identity_cannot_be_read_does_not_hold_up_the_bus(
    tmp_path: Path,
) -> None:
    """Every unit is verified by FC 43 and unit 3 is dead: its identity read at connect times
    out once, it is backed off like a unit that stops answering its polls, and the other units
    are admitted and read at their rate; the link is not reconnected over it."""

    specs = _specs([1, 2, 3, 4], {3: "dead"})

    async def go() -> tuple[Run, dict[str, Any]]:
        async with rtu_line(specs, tmp_path / "line", LineTiming(38400), step=STEP) as sim:
            link = RtuLink(name="bus-1", type="rtu", port=str(sim.path), baud=38400, parity="N")
            link = link.model_copy(update={"timeout": 0.3})
            pinned = await _fingerprints(link, specs)
            pinned[3] = {"vendor": "whatever it was"}
            gate = _gate(link, specs, pinned, lambda *e, **f: None)
            run = Run(link, specs, admit=gate.admit, identity=FC43)
            await run.run_for(3.0)
            return run, sim.bus.stats()

    run, stats = asyncio.run(go())
    for unit in (1, 2, 4):
        # Every 0.2 s for 3 s, less the one 0.3 s timeout at connect.
        assert len(run.good(unit)) >= 10 and run.right(unit), (unit, len(run.good(unit)))
    assert run.scans[3] == [] and run.health[3].state == DOWN
    assert stats["overlaps"] == 0
    assert run.bus.attempt <= 1  # one connection, never reconnected over the dead unit
