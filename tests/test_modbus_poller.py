"""The Modbus poller against real pymodbus servers, in one event loop."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

from adapters.base import DeviceHealth, Evidence
from adapters.modbus.link import ModbusLink
from adapters.modbus.sim.devices import DeviceSpec, SimulatedFleet, make_points
from gateway.config import DeviceConfig
from gateway.core.readings import Scan

from conftest import free_ports


def _device(port: int, points: int = 8, period: float = 0.01) -> tuple[DeviceSpec, DeviceConfig]:
    sim_points = make_points(points, period=period)
    spec = DeviceSpec("plc-1", port, points=sim_points)
    config = DeviceConfig.model_validate(
        {
            "id": "plc-1",
            "cert": "x",
            "key": "x",
            "modbus": {"host": "127.0.0.1", "port": port, "timeout": 1.0},
            "identity": "none",
            "points": [sp.point.model_dump() for sp in sim_points],
        },
        context={"check_files": False},
    )
    return spec, config


def _link(config: DeviceConfig, *args: Any, **kwargs: Any) -> ModbusLink:
    """The device's link, built from its config entry as the gateway builds it."""
    assert config.modbus is not None
    return ModbusLink(config.id, config.modbus, config.points, *args, **kwargs)


def test_a_stop_always_ends_a_busy_poller() -> None:
    """Cancel at random moments while reads are in flight: every cancel must end the task.

    pymodbus's wait_for can swallow a cancellation that races a response (Python 3.11); the
    poller must still stop, or the gateway hangs on SIGTERM.
    """
    port = free_ports(1)
    spec, config = _device(port)

    async def scenario() -> tuple[int, int]:
        scans: list[Scan] = []
        stuck = 0
        async with SimulatedFleet([spec]):
            rng = random.Random(5)
            for _ in range(150):
                poller = _link(config, scans.append, lambda _e: None, DeviceHealth("plc-1"))
                task = asyncio.create_task(poller.run())
                await asyncio.sleep(rng.uniform(0.0, 0.03))
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=2)
                if not done:
                    stuck += 1
                    task.cancel()
                    await asyncio.wait({task}, timeout=2)
        return stuck, len(scans)

    stuck, scans = asyncio.run(scenario())
    assert scans > 100  # it really was reading when cancelled
    assert stuck == 0


def test_poller_reads_every_block_and_asks_the_gate_first() -> None:
    port = free_ports(1)
    spec, config = _device(port, points=20, period=0.05)

    async def scenario() -> tuple[list[Evidence], list[Scan]]:
        scans: list[Scan] = []
        seen: list[Evidence] = []

        def admit(evidence: Evidence) -> None:
            seen.append(evidence)
            return None

        async with SimulatedFleet([spec]):
            poller = _link(config, scans.append, admit, DeviceHealth("plc-1"))
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(poller.run())
                await asyncio.sleep(0.5)
                task.cancel()
        return seen, scans

    seen, scans = asyncio.run(scenario())
    assert seen == [Evidence("plc-1", "modbus-tcp", f"127.0.0.1:{port}/unit 1")]
    names = {n for s in scans for n in s.names}
    assert names == {p.name for p in config.points}
    assert len(scans) >= 4 * 5  # four blocks (one per table) at 20 Hz for 0.5 s, with slack


def test_a_refused_device_is_never_polled() -> None:
    port = free_ports(1)
    spec, config = _device(port)

    async def scenario() -> tuple[list[Scan], DeviceHealth]:
        scans: list[Scan] = []
        health = DeviceHealth("plc-1")
        async with SimulatedFleet([spec]) as fleet:
            poller = _link(config, scans.append, lambda _e: "not in the registry", health)
            await asyncio.wait_for(poller.run(), 5)  # returns: quarantined
            assert fleet.devices[0].requests == 0
        return scans, health

    scans, health = asyncio.run(scenario())
    assert scans == [] and health.state == "quarantined"
    assert health.last_error == "not in the registry"


def test_a_dead_device_costs_no_file_descriptors_over_many_reconnects() -> None:
    port = free_ports(1)
    spec, config = _device(port, period=0.05)
    spec.fault = "dead"
    config = config.model_copy(
        update={"modbus": config.modbus.model_copy(update={"timeout": 0.05})}
    )

    async def scenario() -> tuple[int, int, DeviceHealth]:
        health = DeviceHealth("plc-1")
        async with SimulatedFleet([spec]):
            poller = _link(
                config, lambda _s: None, lambda _e: None, health, backoff_min=0.01, backoff_max=0.02
            )
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(poller.run())
                await asyncio.sleep(0.5)
                before = len(os.listdir("/proc/self/fd"))
                failures = health.reads_failed
                await asyncio.sleep(2.0)
                after = len(os.listdir("/proc/self/fd"))
                task.cancel()
        assert health.reads_failed - failures >= 20  # it really kept reconnecting
        return before, after, health

    before, after, health = asyncio.run(scenario())
    assert after <= before + 2, (before, after)
    assert health.state == "down" and "no response within 0.05 s" in (health.last_error or "")
