"""Modbus links (issue 11): RTU on a serial bus (a socat pty pair), RTU over TCP, a shared TCP
link to many units, against pymodbus's own servers; one task per link, units as schedules."""

from __future__ import annotations

import asyncio
import sys
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from adapters.base import DOWN, UP, DeviceHealth, Evidence
from adapters.modbus import checks
from adapters.modbus.config import ModbusEndpoint, Point, RtuLink, RtuOverTcpLink, TcpLink
from adapters.modbus.link import ModbusBus, ModbusLink
from gateway.config import render_toml
from gateway.core.readings import GOOD, Scan
from gateway.identity.keyring import Keyring

from conftest import (
    Proc,
    fieldgate,
    free_ports,
    opened_from,
    start_hub,
    start_simulator,
    wait_until,
)
from rtu_servers import SOCAT, PtyPair, Units, value

POINTS = [Point(name=f"r{a}", address=a, period=0.05) for a in range(10)]

needs_socat = pytest.mark.skipif(SOCAT is None, reason="socat is not installed")


class Fleet:
    """Devices ``dev-U`` (unit U) on one link, their scans and health, the evidence seen."""

    def __init__(self, link: Any, units: list[int], refuse: frozenset[int] = frozenset()):
        self.scans: dict[int, list[Scan]] = {u: [] for u in units}
        self.health = {u: DeviceHealth(f"dev-{u}") for u in units}
        self.evidence: list[Evidence] = []
        self._refuse = refuse
        self.devices = [
            ModbusLink(
                f"dev-{u}",
                ModbusEndpoint(link=link.name, unit=u).on(link),
                POINTS,
                self.scans[u].append,
                self._admit,
                self.health[u],
                transport=link.transport,
            )
            for u in units
        ]
        self.bus = ModbusBus(link, self.devices, backoff_min=0.5, backoff_max=5.0)

    def _admit(self, evidence: Evidence) -> str | None:
        self.evidence.append(evidence)
        unit = int(evidence.device_id.split("-")[1])
        return "not in the registry" if unit in self._refuse else None

    async def run_for(self, seconds: float) -> None:
        task = asyncio.create_task(self.bus.run(), name=f"link[{self.bus.name}]")
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def good(self, unit: int) -> list[Scan]:
        return [s for s in self.scans[unit] if s.quality == GOOD]


def _rtu(port: str) -> RtuLink:
    return RtuLink(name="bus-1", type="rtu", port=port, baud=115200, parity="N", timeout=0.2)


def _right(scan: Scan, unit: int) -> bool:
    return list(scan.values) == [value(unit, int(n[1:])) for n in scan.names]


@needs_socat
def test_rtu_bus_dead_unit_does_not_slow_the_others(tmp_path: Path) -> None:
    """8 units on one serial bus, unit 8 dead: the other 7 keep their rate, one request on the
    wire at a time, and the dead one is probed rarely."""
    live = list(range(1, 8))

    async def go(pty: PtyPair) -> tuple[Fleet, Units]:
        bus = _rtu(pty.gateway)
        async with Units("rtu", pty.device, live) as server:
            fleet = Fleet(bus, [*live, 8])
            await fleet.run_for(4.0)
        return fleet, server

    with PtyPair(tmp_path) as pty:
        fleet, server = asyncio.run(go(pty))
    assert server.overlaps == 0
    for unit in live:
        good = fleet.good(unit)
        # 10 registers every 0.05 s: about 80 reads in 4 s; a dead unit that stalled the bus
        # (0.2 s per timeout, per round) would leave at most 20.
        assert len(good) >= 40, (unit, len(good))
        assert all(_right(s, unit) for s in good)
        assert fleet.health[unit].state == UP
    assert fleet.scans[8] == [] and fleet.health[8].state == DOWN
    # Backed off: first probe after 0.5 s, then 1, 2 s...: a handful of requests, not one
    # per period.
    assert 1 <= server.requests[8] <= 6, server.requests[8]
    assert {e.transport for e in fleet.evidence} == {"modbus-rtu"}
    assert {e.endpoint for e in fleet.evidence} >= {"bus-1/unit 1", "bus-1/unit 8"}


@needs_socat
def test_rtu_crc_errors_are_counted_and_never_forwarded(tmp_path: Path) -> None:

    async def go(pty: PtyPair) -> tuple[Fleet, Units]:
        bus = _rtu(pty.gateway)
        async with Units("rtu", pty.device, [1, 2]) as server:
            server.corrupt(2, every=3)
            fleet = Fleet(bus, [1, 2])
            await fleet.run_for(2.0)
        return fleet, server

    with PtyPair(tmp_path) as pty:
        fleet, server = asyncio.run(go(pty))
    assert server.corrupted >= 5
    causes = fleet.health[2].malformed_causes
    assert causes.get(checks.CRC, 0) == server.corrupted, causes
    assert fleet.health[1].malformed == 0
    for unit in (1, 2):
        assert fleet.good(unit) and all(_right(s, unit) for s in fleet.scans[unit])
    # The bad frames cost only their own reads: unit 2 keeps about 2/3 of unit 1's rate.
    assert len(fleet.good(2)) >= len(fleet.good(1)) // 2


def test_rtu_over_tcp_serves_several_units() -> None:
    port = free_ports(1)
    link = RtuOverTcpLink(
        name="serial-server", type="rtu-over-tcp", host="127.0.0.1", port=port, timeout=0.3
    )

    async def go() -> tuple[Fleet, Units]:
        async with Units("rtu-over-tcp", port, [3, 4, 5]) as server:
            fleet = Fleet(link, [3, 4, 5])
            await fleet.run_for(1.5)
        return fleet, server

    fleet, server = asyncio.run(go())
    assert server.connections == 1 and server.overlaps == 0
    for unit in (3, 4, 5):
        good = fleet.good(unit)
        assert len(good) >= 10 and all(_right(s, unit) for s in good), unit
        assert fleet.health[unit].malformed == 0
    assert {e.transport for e in fleet.evidence} == {"modbus-rtu-over-tcp"}


def test_shared_tcp_link_reads_16_units_on_one_connection() -> None:
    port = free_ports(1)
    units = list(range(1, 17))
    link = TcpLink(name="gw", type="tcp", host="127.0.0.1", port=port, timeout=0.5)

    async def go() -> tuple[Fleet, Units]:
        async with Units("tcp", port, units) as server:
            fleet = Fleet(link, units, refuse=frozenset({16}))
            await fleet.run_for(2.0)
        return fleet, server

    fleet, server = asyncio.run(go())
    assert server.connections == 1 and server.overlaps == 0
    for unit in units[:-1]:
        good = fleet.good(unit)
        assert len(good) >= 10 and all(_right(s, unit) for s in good), unit
    # A unit the gate refuses is quarantined and never read; the others are unaffected.
    assert fleet.scans[16] == [] and server.requests[16] == 0
    assert fleet.health[16].state == "quarantined"


def test_requests_on_a_shared_link_reach_their_own_unit() -> None:
    port = free_ports(1)
    link = TcpLink(name="gw", type="tcp", host="127.0.0.1", port=port, timeout=0.5)

    async def go() -> list[Scan]:
        async with Units("tcp", port, [1, 2]):
            fleet = Fleet(link, [1, 2])
            task = asyncio.create_task(fleet.bus.run())
            try:
                for _ in range(250):  # until both have answered (at most 5 s)
                    if fleet.good(1) and fleet.good(2):
                        break
                    await asyncio.sleep(0.02)
                one, two = fleet.devices
                return [
                    await asyncio.wait_for(two.read(["r3"]), 5),
                    await asyncio.wait_for(one.read([]), 5),
                    await asyncio.wait_for(two.write("r5", 4242), 5),  # FC 6 to unit 2 only
                    await asyncio.wait_for(one.read(["r5"]), 5),
                ]
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    scans = asyncio.run(go())
    assert scans[0].values == [value(2, 3)] and scans[0].device_id == "dev-2"
    assert list(scans[1].values) == [value(1, a) for a in range(10)]
    assert scans[2].values == [4242] and scans[2].device_id == "dev-2"
    assert scans[3].values == [value(1, 5)]


def test_link_timeouts_reconnect_when_no_unit_answers() -> None:
    """Every unit dead (the bus unplugged): the link reconnects with backoff instead of
    probing forever on one connection; nothing is delivered."""
    port = free_ports(1)
    link = TcpLink(name="gw", type="tcp", host="127.0.0.1", port=port, timeout=0.1)

    async def go() -> tuple[Fleet, Units]:
        async with Units("tcp", port, []) as server:
            fleet = Fleet(link, [1, 2])
            await fleet.run_for(2.0)
        return fleet, server

    fleet, server = asyncio.run(go())
    assert server.connections >= 2
    assert all(h.state == DOWN for h in fleet.health.values())
    assert Counter(len(s) for s in fleet.scans.values()) == Counter({0: 2})


_SERVE = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from rtu_servers import Units

async def main() -> None:
    async with Units("tcp", int(sys.argv[2]), [1, 2, 3]):
        print("units ready", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def test_the_gateway_runs_one_task_per_link_beside_implicit_links(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    """`fieldgate run` with a [[links]] entry (three units behind one TCP gateway) and a device
    that gives its own host: every device arrives at the hub with its own values."""
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 1, "--max-age", "0.5")
    port = free_ports(1)
    server = Proc(
        [sys.executable, "-c", _SERVE, str(Path(__file__).parent), str(port)],
        tmp_path / "units.log",
    )
    procs.append(server)
    server.wait_for("units ready")
    doc = tomllib.loads(config.read_text())
    doc["links"] = [{"name": "gw", "type": "tcp", "host": "127.0.0.1", "port": port}]
    devices = pki_dir / "devices"
    doc["devices"] += [
        {
            "id": f"plc-{unit + 1}",
            "cert": str(devices / f"plc-{unit + 1}.pem"),
            "key": str(devices / f"plc-{unit + 1}.key"),
            "modbus": {"link": "gw", "unit": unit},
            "identity": "none",
            "points": [p.model_dump(exclude_defaults=True) for p in POINTS[:4]],
        }
        for unit in (1, 2, 3)
    ]
    config.write_text(render_toml(doc))
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)

    def readings() -> dict[str, list[Any]]:
        opened, _, _ = opened_from(record, keyring)
        out: dict[str, list[Any]] = {}
        for o in opened:
            out.setdefault(o.device_id, []).extend(o.readings)
        return out

    wait_until(
        lambda: len(got := readings()) == 4 and min(len(r) for r in got.values()) >= 40,
        40,
        "every device, on both kinds of link, to deliver 40 readings",
    )
    assert gateway.stop() == 0, gateway.output()[-2000:]
    for unit in (1, 2, 3):
        got = readings()[f"plc-{unit + 1}"]
        assert {(r.point, r.value) for r in got} == {(f"r{a}", value(unit, a)) for a in range(4)}


def test_a_serial_port_that_is_not_there_takes_its_units_down_and_retries(
    tmp_path: Path,
) -> None:
    link = _rtu(str(tmp_path / "ttyUSB9"))

    async def go() -> Fleet:
        fleet = Fleet(link, [1, 2])
        await fleet.run_for(1.5)
        return fleet

    fleet = asyncio.run(go())
    for unit in (1, 2):
        health = fleet.health[unit]
        assert health.state == DOWN and health.last_error is not None
        assert "connect" in health.last_error
    assert fleet.bus.attempt >= 2  # reconnected with backoff, not given up
    assert fleet.evidence == []  # never admitted: nothing was seen on the link
