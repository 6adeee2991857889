"""An identity check that meets a passing fault (a gateway's 0x0B while its device is away, a
busy answer) fails like a timeout and is checked again: it never quarantines a good device."""

from __future__ import annotations

import asyncio
from typing import Any

from test_modbus_identity import _link_run, _pinned

from adapters.base import QUARANTINED, DeviceHealth
from adapters.modbus.admission import ModbusRequirements
from adapters.modbus.config import ModbusEndpoint, ModbusIdentity
from adapters.modbus.link import ModbusLink
from adapters.modbus.sim.devices import DeviceSpec, SimulatedDevice, make_points, persona_of
from adapters.modbus.sim.server import DeviceServer
from gateway.core.auth import AuthGate, Registration
from gateway.core.readings import Scan

from conftest import free_ports


def test_a_briefly_absent_device_behind_a_gateway_is_not_quarantined_for_good() -> None:
    port = free_ports(1)
    spec = DeviceSpec("plc-1", port, points=make_points(2, period=0.1), serial="A123")
    objects = persona_of(spec).objects
    pinned = {
        "vendor": "Fieldgate Simulations",
        "product_code": "FGS-100",
        "revision": "2.4.1",
        "vendor_url": "https://fieldgate.invalid/fgs-100",
        "product_name": "Simulated PLC",
        "model_name": "FGS-100 SN A123",
        "user_application_name": "unit 1",
    }
    absent = {"on": False}

    async def action(*_a: Any) -> int | None:
        return 0x0B if absent["on"] else None

    def identify(_code: int, _oid: int) -> dict[int, bytes] | int:
        return 0x0B if absent["on"] else dict(objects)

    scans: list[Scan] = []
    events: list[str] = []

    async def go() -> DeviceHealth:
        async with DeviceServer("127.0.0.1", port, 1, 64, action, identify):
            endpoint = ModbusEndpoint(host="127.0.0.1", port=port)
            gate = AuthGate(
                [
                    Registration(
                        "plc-1",
                        "modbus-tcp",
                        endpoint.label,
                        True,
                        ModbusRequirements(True, pinned),
                    )
                ],
                lambda kind, _d, reason, **f: events.append(f"{kind}: {reason}"),
            )
            health = DeviceHealth("plc-1")
            link = ModbusLink(
                "plc-1",
                endpoint,
                [sp.point for sp in spec.points],
                scans.append,
                gate.admit,
                health,
                identity=ModbusIdentity(fc43=True),
            )
            task = asyncio.create_task(link.run())
            await asyncio.sleep(0.5)
            absent["on"] = True
            await asyncio.sleep(0.5)
            absent["on"] = False
            before = len([s for s in scans if s.values[0] is not None])
            await asyncio.sleep(1.5)
            after = len([s for s in scans if s.values[0] is not None])
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            assert after > before, events
            return health

    health = asyncio.run(asyncio.wait_for(go(), 20))
    assert health.state != QUARANTINED, events


def test_a_busy_answer_to_an_identity_register_at_a_recheck_does_not_quarantine() -> None:
    spec = DeviceSpec(
        "plc-1", free_ports(1), points=make_points(2, period=0.1), serial="A123", busy_every=2
    )
    serial_at = SimulatedDevice(spec, 1.0).serial_address
    identity = ModbusIdentity.model_validate(
        {
            "fc43": True,
            "recheck": 1,
            "registers": [{"name": "serial", "address": serial_at, "count": 5}],
        }
    )
    pinned = {**_pinned("A123"), "serial": "A123"}
    _scans, events, health = _link_run(spec, identity, ModbusRequirements(True, pinned), wait=6.0)
    assert health.state != QUARANTINED, events
