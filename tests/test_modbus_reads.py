"""Reads that survive real maps (issue 11): holes, per-request limits, busy devices, unit ids."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from adapters.base import DeviceHealth
from adapters.modbus.config import ModbusEndpoint
from adapters.modbus.link import ModbusLink
from adapters.modbus.plan import (
    Learnt,
    decode_learnt,
    encode_learnt,
    learnt_from,
    plan_from,
    split_refused,
)
from adapters.modbus.planstore import PlanStore
from adapters.modbus.registers import plan_reads
from adapters.modbus.sim.devices import (
    DeviceSpec,
    SimPoint,
    SimulatedFleet,
    held_value,
    make_points,
)
from gateway.config import DeviceConfig
from gateway.core.readings import GOOD, UNAVAILABLE, Scan
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

STEP = 1000.0  # the simulator's values hold still for the length of a test


def _config(port: int, sim_points: list[SimPoint], **modbus: Any) -> DeviceConfig:
    return DeviceConfig.model_validate(
        {
            "id": "plc-1",
            "cert": "x",
            "key": "x",
            "modbus": {"host": "127.0.0.1", "port": port, "timeout": 1.0, **modbus},
            "identity": "none",
            "points": [sp.point.model_dump() for sp in sim_points],
        },
        context={"check_files": False},
    )


def _link(config: DeviceConfig, sink: Any, health: DeviceHealth, **kw: Any) -> ModbusLink:
    assert config.modbus is not None
    return ModbusLink(config.id, config.modbus, config.points, sink, lambda _e: None, health, **kw)


async def _run_for(link: ModbusLink, seconds: float) -> None:
    task = asyncio.create_task(link.run())
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _check_values(scans: list[Scan], sim_points: list[SimPoint]) -> set[str]:
    """Every good value is what the device held; returns the names that arrived."""
    by_name = {sp.point.name: sp for sp in sim_points}
    arrived: set[str] = set()
    for scan in scans:
        if scan.quality != GOOD:
            continue
        step = int(scan.ts_ms / 1000 / STEP)
        for name, value in zip(scan.names, scan.values, strict=True):
            sp = by_name[name]
            held = [held_value(sp.point, sp.seed, s) for s in (step, step + 1)]
            assert any(_same(value, h) for h in held), (name, value, held)
            arrived.add(name)
    return arrived


# -- pure planning --


def test_a_refused_block_is_split_in_halves_down_to_the_unreadable_point() -> None:
    points = {sp.point.name: sp.point for sp in make_points(6, types=["uint16"])}
    [block] = plan_reads(points.values())
    split = split_refused(block, 0x02, points, max_gap=8)
    assert [(b.address, b.count) for b in split.blocks] == [(0, 3), (3, 3)]
    assert split.unreadable is None
    one = plan_reads([points["uint16_4"]])[0]
    assert split_refused(one, 0x02, points, max_gap=8).unreadable == "uint16_4"
    assert split_refused(one, 0x02, points, max_gap=8).blocks == []


def test_a_learnt_plan_round_trips_and_a_plan_that_does_not_fit_the_map_is_dropped() -> None:
    points = {sp.point.name: sp.point for sp in make_points(6, types=["uint16"])}
    [block] = plan_reads(points.values())
    halves = split_refused(block, 0x03, points, max_gap=8).blocks
    learnt = learnt_from(halves[1:], {"uint16_0": 2, "uint16_1": 2, "uint16_2": 2})
    again = decode_learnt(json.loads(json.dumps(encode_learnt(learnt))), points)
    assert again == learnt
    assert [(b.address, b.count) for b in plan_from(learnt, points)] == [(3, 3)]
    fewer = {n: p for n, p in points.items() if n != "uint16_5"}
    assert decode_learnt(encode_learnt(learnt), fewer) is None  # a name the map lost
    assert decode_learnt(encode_learnt(Learnt((("uint16_0",),))), points) is None
    assert decode_learnt("junk", points) is None


def test_unit_ids_up_to_255_and_read_limits_are_config() -> None:
    endpoint = ModbusEndpoint(host="h", unit=255, max_registers=10, max_bits=16)
    assert (endpoint.unit, endpoint.max_registers, endpoint.max_bits) == (255, 10, 16)
    assert ModbusEndpoint(host="h").max_registers == 125
    with pytest.raises(ValueError):
        ModbusEndpoint(host="h", unit=256)
    with pytest.raises(ValueError):
        ModbusEndpoint(host="h", max_registers=126)


# -- against the simulator --


def test_a_device_limit_in_config_is_never_exceeded() -> None:
    port = free_ports(1)
    sim_points = make_points(40, types=["uint16"])
    spec = DeviceSpec("plc-1", port, points=sim_points, max_registers=10)
    config = _config(port, sim_points, max_registers=10)

    async def scenario() -> tuple[list[Scan], int]:
        scans: list[Scan] = []
        async with SimulatedFleet([spec], step=STEP) as fleet:
            await _run_for(_link(config, scans.append, DeviceHealth("plc-1")), 0.5)
            return scans, fleet.devices[0].exceptions

    scans, exceptions = asyncio.run(scenario())
    assert exceptions == 0
    assert _check_values(scans, sim_points) == {sp.point.name for sp in sim_points}


def test_holes_and_a_request_limit_are_learnt_once_and_kept_across_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_ports(1)
    sim_points = make_points(20, types=["uint16"], period=0.05)
    spec = DeviceSpec(
        "plc-1", port, points=sim_points, holes=frozenset({("holding", 7)}), max_registers=8
    )
    config = _config(port, sim_points)
    store = PlanStore(tmp_path)

    async def scenario() -> tuple[list[Scan], list[Scan], int, int, DeviceHealth, DeviceHealth]:
        first: list[Scan] = []
        second: list[Scan] = []
        h1, h2 = DeviceHealth("plc-1"), DeviceHealth("plc-1")
        async with SimulatedFleet([spec], step=STEP) as fleet:
            device = fleet.devices[0]
            await _run_for(_link(config, first.append, h1, plans=store), 1.0)
            learning = device.exceptions
            device.exceptions = 0
            await _run_for(_link(config, second.append, h2, plans=store), 1.0)
            return first, second, learning, device.exceptions, h1, h2

    with caplog.at_level(logging.WARNING, logger="adapters.modbus.link"):
        first, second, learning, after, h1, h2 = asyncio.run(scenario())
    readable = {sp.point.name for sp in sim_points} - {"uint16_7"}
    assert learning > 0
    assert after == 0  # the restart sent no failing read
    for scans in (first, second):
        assert _check_values(scans, sim_points) == readable
        # The other points keep their rate: 0.05 s for 1 s, with slack for the learning.
        counts = {n: sum(n in s.names for s in scans if s.quality == GOOD) for n in readable}
        assert min(counts.values()) >= 10, counts
    problem = "point 'uint16_7' (holding 7) cannot be read: Modbus exception 0x02"
    assert all(problem in p for h in (h1, h2) for p in h.config_problems)
    assert len(h1.config_problems) == 1
    told = [r for r in caplog.records if "uint16_7" in r.getMessage()]
    assert len(told) == 2  # once per start
    path = tmp_path / "modbus-plans.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # A changed map starts afresh.
    [key] = json.loads(path.read_text())
    assert key.startswith("plc-1:")


@pytest.mark.parametrize("answers_after", [1, 2, 3, 4, None])
def test_a_device_refusing_everything_for_a_while_teaches_nothing_that_outlives_it(
    tmp_path: Path, answers_after: int | None
) -> None:
    """A PLC answering 02 to every read (booting, its own slave absent) is not its map: no
    point is kept as unreadable, the link reconnects and probes again, and once it answers,
    every point arrives. ``answers_after``: the PLC answers from its n-th refusal on, in the
    middle of a bisection (None: after half a second, past several reconnects)."""
    port = free_ports(1)
    sim_points = make_points(6, types=["uint16"], period=0.05)
    fault = "exception:2" if answers_after is None else f"exception:2:{answers_after}"
    spec = DeviceSpec("plc-1", port, points=sim_points, fault=fault)
    config = _config(port, sim_points)
    store = PlanStore(tmp_path)

    async def scenario() -> tuple[ModbusLink, list[Scan], int]:
        scans: list[Scan] = []
        enough = asyncio.Event()

        def sink(scan: Scan) -> None:
            scans.append(scan)
            if sum(s.quality == GOOD for s in scans) >= 12:
                enough.set()

        health = DeviceHealth("plc-1")
        async with SimulatedFleet([spec], step=STEP) as fleet:
            link = _link(config, sink, health, plans=store, backoff_min=0.01, backoff_max=0.05)
            task = asyncio.create_task(link.run())
            device = fleet.devices[0]
            if answers_after is None:
                await asyncio.sleep(0.5)  # the PLC boots for half a second, refusing every read
                device.spec.fault = None
            refused = device.exceptions
            await asyncio.wait_for(enough.wait(), 10)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return link, scans, refused

    link, scans, refused = asyncio.run(scenario())
    if answers_after is None:
        assert refused >= 6  # enough to have walked a bisection down to every point
    assert link.unreadable == {}
    good = {n for s in scans if s.quality == GOOD for n in s.names}
    assert good == {sp.point.name for sp in sim_points}
    stored = (
        json.loads((tmp_path / "modbus-plans.json").read_text())
        if (tmp_path / "modbus-plans.json").exists()
        else {}
    )
    assert all(not entry.get("unreadable") for entry in stored.values()), stored


def test_busy_answers_are_retried_within_the_period() -> None:
    port = free_ports(1)
    sim_points = make_points(8, types=["uint16"], period=0.1)
    spec = DeviceSpec("plc-1", port, points=sim_points, busy_every=2)
    config = _config(port, sim_points)

    async def scenario() -> tuple[list[Scan], int]:
        scans: list[Scan] = []
        async with SimulatedFleet([spec], step=STEP) as fleet:
            await _run_for(_link(config, scans.append, DeviceHealth("plc-1")), 1.0)
            return scans, fleet.devices[0].exceptions

    scans, exceptions = asyncio.run(scenario())
    assert exceptions >= 5  # the device really was busy
    assert [s.quality for s in scans] == [GOOD] * len(scans)
    assert len(scans) >= 8  # one block at 10 Hz for 1 s, none lost to busy answers
    assert _check_values(scans, sim_points) == {sp.point.name for sp in sim_points}


def test_a_block_that_fails_arrives_as_unavailable_at_the_hub(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    """plc-2 answers every read busy (06), past its retries: its blocks arrive unavailable.
    plc-1 has a hole and busy answers on every 5th request: only good readings arrive."""
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 2, "--period", "0.2", "--max-age", "0.5",
        "--fault", "plc-2=exception:6", "--holes", "plc-1=0", "--busy-every", "5",
    )  # fmt: skip
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)

    def qualities() -> dict[str, set[str]]:
        opened, _, _ = opened_from(record, keyring)
        out: dict[str, set[str]] = {}
        for o in opened:
            for r in o.readings:
                out.setdefault(o.device_id, set()).add(r.quality)
        return out

    wait_until(lambda: len(qualities()) == 2, 40, "both devices to deliver readings")
    time.sleep(1.0)
    assert gateway.stop() == 0, gateway.output()[-2000:]
    opened, errors, _ = opened_from(record, keyring)
    assert errors == []
    broken = [r for o in opened if o.device_id == "plc-2" for r in o.readings]
    assert broken and all(r.quality == UNAVAILABLE and r.value is None for r in broken)
    # The stop line says how many of the readings it counts carry no value.
    summary = re.search(
        r"readings: (\d+) read, \1 delivered, 0 dropped \((\d+) of them unavailable: no value\)",
        gateway.output(),
    )
    assert summary is not None, gateway.output()[-2000:]
    assert int(summary[2]) == len(broken)
    # plc-1: its point on the hole is a configuration problem, told once; the rest is good.
    good = [r for o in opened if o.device_id == "plc-1" for r in o.readings]
    assert good and {r.quality for r in good} == {GOOD}
    assert "float32_0" not in {r.point for r in good}
    assert gateway.output().count("'float32_0' (holding 0) cannot be read") == 1
    assert (tmp_path / "state" / "modbus-plans.json").exists()


@pytest.mark.parametrize("unit", [0, 248, 255])
def test_unit_ids_above_247_are_read_on_tcp(unit: int) -> None:
    port = free_ports(1)
    sim_points = make_points(4, types=["uint16"])
    spec = DeviceSpec("plc-1", port, unit=unit, points=sim_points)
    config = _config(port, sim_points, unit=unit)

    async def scenario() -> list[Scan]:
        scans: list[Scan] = []
        async with SimulatedFleet([spec], step=STEP):
            await _run_for(_link(config, scans.append, DeviceHealth("plc-1")), 0.3)
        return scans

    scans = asyncio.run(scenario())
    assert _check_values(scans, sim_points) == {sp.point.name for sp in sim_points}
