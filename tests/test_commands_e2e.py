"""Cloud commands end to end, with real parts: `fieldgate localhub` (the TLS front that scopes
$iothub per identity, mosquitto, the twin holder), the pymodbus simulator in its own process
(counting the writes it takes), and `fieldgate run`; the cloud side is driven through
:class:`~gateway.testbed.localhub.control.HubControl`, the service side `fieldgate hub` uses."""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway.config import render_toml
from gateway.events import read_events
from gateway.identity.pki import Pki
from gateway.testbed.localhub.control import HubControl

from conftest import Proc, fieldgate, start_hub, start_simulator, wait_until

CONTROL = {
    "channels": ["method", "c2d", "twin"],
    "max_writes_per_minute": 600,
    "writes": {"float32_0": {"min": -1000.0, "max": 1000.0}, "int16_1": {}, "bool_6": {}},
}


def sim_stats(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def writes_at(stats: Path, device: str) -> int:
    return int(sim_stats(stats)["devices"][device]["writes"])


class Rig:
    """A hub, simulated devices with control on the first, and a running gateway."""

    def __init__(
        self,
        tmp: Path,
        pki_dir: Path,
        procs: list[Proc],
        devices: int = 2,
        *extra: str,
        period: float = 0.3,
    ) -> None:
        self.tmp = tmp
        self.pki = Pki(pki_dir)
        self.hub_port, self.record = start_hub(procs, tmp, pki_dir)
        self.stats = tmp / "sim-stats.json"
        self.config, self.sim = start_simulator(
            procs,
            tmp,
            pki_dir,
            self.hub_port,
            devices,
            "--period",
            str(period),
            "--max-age",
            "0.5",
            "--stats",
            str(self.stats),
            *extra,
        )
        doc = tomllib.loads(self.config.read_text())
        doc["devices"][0]["control"] = CONTROL
        self.config.write_text(render_toml(doc))
        self.state = tmp / "state"
        self.procs = procs
        self.gateway = self.start()

    def start(self) -> Proc:
        gateway = Proc(fieldgate("run", "--config", str(self.config)), self.tmp / "gateway.log")
        self.procs.append(gateway)
        return gateway

    def hub(self) -> HubControl:
        return HubControl(self.pki, "127.0.0.1", self.hub_port, broker_log=self.tmp / "broker.log")

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in read_events(self.state) if e["kind"] == kind]

    def drive(self, body: Callable[[HubControl], Awaitable[Any]]) -> Any:
        async def go() -> Any:
            async with self.hub() as hub:
                await until_connected(hub, "plc-1", "plc-2")
                return await body(hub)

        return asyncio.run(go())


async def until_connected(hub: HubControl, *devices: str) -> None:
    async with asyncio.timeout(30):
        # Another process's connections: nothing here to wait on but asking again.
        while not all(hub.connected(d) for d in devices):  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def until_up(hub: HubControl, device: str) -> None:
    """The device is polled (status says up): a write now reaches it."""
    async with asyncio.timeout(30):
        while True:
            status, body = await hub.invoke(device, "status", None, timeout=10)
            if status == 200 and body["state"] == "up":
                return
            await asyncio.sleep(0.2)


def test_a_method_write_reaches_the_simulator_is_read_back_and_recorded(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    rig = Rig(tmp_path, pki_dir, procs)

    async def body(hub: HubControl) -> list[tuple[int, Any]]:
        await until_up(hub, "plc-1")
        return [
            await hub.invoke("plc-1", "write", {"point": "float32_0", "value": 42.5}),
            await hub.invoke("plc-1", "write", {"point": "bool_6", "value": True}),
            await hub.invoke("plc-1", "read", {"points": ["float32_0", "bool_6"]}),
            # The other device's identity, its own policy: no writes at all.
            await hub.invoke("plc-2", "write", {"point": "float32_0", "value": 1.0}),
        ]

    write, coil, read, other = rig.drive(body)
    assert write == (
        200,
        {"point": "float32_0", "value": 42.5, "read_back": 42.5, "exact": True, "quality": "good"},
    )
    assert coil[0] == 200 and coil[1]["read_back"] is True
    # The simulator holds what was written (it does not follow its signal any more).
    assert read[1]["values"] == {"float32_0": 42.5, "bool_6": True}
    assert other[0] == 403 and other[1]["rule"] == "devices.control.channels"
    wait_until(lambda: writes_at(rig.stats, "plc-1") == 2, 5, "the simulator's write count")
    assert writes_at(rig.stats, "plc-2") == 0
    assert rig.gateway.stop() == 0
    accepted = rig.events("command-accepted")
    assert [
        (e["device"], e["command"], e["point"]) for e in accepted if e["command"] == "write"
    ] == [
        ("plc-1", "write", "float32_0"),
        ("plc-1", "write", "bool_6"),
    ]
    refused = rig.events("command-refused")
    assert [(e["device"], e["rule"], e["value"]) for e in refused] == [
        ("plc-2", "devices.control.channels", 1.0)
    ]


def test_a_c2d_message_delivered_twice_writes_once_and_a_twin_setpoint_is_reported(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    rig = Rig(tmp_path, pki_dir, procs)

    async def body(hub: HubControl) -> dict[str, Any]:
        await until_up(hub, "plc-1")
        request = {"point": "int16_1", "value": 12.3}
        mid = await hub.c2d("plc-1", request)
        await hub.c2d("plc-1", request, message_id=mid)  # redelivered
        await hub.c2d("plc-1", {"point": "int16_1", "value": 99999})  # 400: cannot hold it
        await hub.desire("plc-1", {"points": {"float32_0": 7.25, "uint16_2": 3}})
        async with asyncio.timeout(30):
            while True:
                twin = await hub.twin("plc-1")
                points = twin["reported"].get("points", {})
                if {"float32_0", "uint16_2"} <= set(points):
                    return twin
                await asyncio.sleep(0.2)

    twin = rig.drive(body)
    reported = twin["reported"]
    assert reported["points"]["float32_0"] == {
        "status": "applied",
        "value": 7.25,
        "read_back": 7.25,
        "version": twin["desired"]["$version"],
    }
    assert reported["points"]["uint16_2"]["status"] == "refused"  # not in the writes
    assert reported["points"]["uint16_2"]["rule"] == "devices.control.writes"
    assert reported["fieldgate"]["state"] == "up"
    assert reported["fieldgate"]["identity"]["state"] == "admitted"
    # One C2D write and one twin write reached the device; the redelivery and the 400 did not.
    wait_until(lambda: writes_at(rig.stats, "plc-1") == 2, 10, "the simulator's write count")
    assert rig.gateway.stop() == 0
    c2d = [e for e in read_events(rig.state) if e.get("channel") == "c2d"]
    assert [(e["kind"], e["status"]) for e in c2d] == [
        ("command-accepted", 200),
        ("command-failed", 400),
    ]
    ledger = (rig.state / "c2d-messages.jsonl").read_text().splitlines()
    assert len(ledger) == 4  # started + done, for each of the two message ids carried out


def test_a_desired_setpoint_set_while_the_gateway_was_away_is_applied_at_connect(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    rig = Rig(tmp_path, pki_dir, procs)
    rig.drive(lambda hub: until_up(hub, "plc-1"))
    assert rig.gateway.stop() == 0

    async def set_it() -> None:
        async with rig.hub() as hub:
            await hub.desire("plc-1", {"points": {"float32_0": -3.5}})

    asyncio.run(set_it())
    rig.gateway = rig.start()

    async def body(hub: HubControl) -> tuple[int, Any]:
        async with asyncio.timeout(30):
            while True:
                twin = await hub.twin("plc-1")
                if twin["reported"].get("points", {}).get("float32_0", {}).get("value") == -3.5:
                    break
                await asyncio.sleep(0.2)
        return await hub.invoke("plc-1", "read", {"points": ["float32_0"]})

    status, read = rig.drive(body)
    assert status == 200 and read["values"] == {"float32_0": -3.5}
    assert rig.gateway.stop() == 0


def test_malformed_requests_are_answered_and_the_session_stays_up(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    rig = Rig(tmp_path, pki_dir, procs)
    cases: list[tuple[str, Any, int]] = [
        ("write", "not an object", 400),
        ("write", {"point": "float32_0", "value": "hot"}, 400),
        ("write", {"point": ["float32_0"], "value": 1}, 400),
        ("write", {"point": "float32_0", "value": 1, "extra": 2}, 400),
        ("read", {"points": "float32_0"}, 400),
        ("read", {"points": ["no_such_point"]}, 404),
        ("write", {"point": "no_such_point", "value": 1}, 404),
        ("reboot", {}, 404),
        ("", {}, 404),
        ("write", {"point": "x" * 100_000, "value": 1}, 400),
    ]

    async def body(hub: HubControl) -> list[tuple[int, Any]]:
        await until_up(hub, "plc-1")
        out = [await hub.invoke("plc-1", m, p, timeout=10) for m, p, _ in cases]
        # Raw bytes that are no JSON at all, and 1 MB (IoT Hub would not carry it; the
        # stand-in's service side refuses it, so it is sent on the inner topic directly).
        out.append(await raw_invoke(hub, "plc-1", "write", b"{\x00\xff"))
        out.append(await raw_invoke(hub, "plc-1", "write", b"[" + b"1," * 500_000 + b"1]"))
        out.append(await hub.invoke("plc-1", "write", {"point": "float32_0", "value": 5.0}))
        return out

    answers = rig.drive(body)
    expected = [s for _, _, s in cases] + [400, 400, 200]
    assert [a[0] for a in answers] == expected, answers
    assert all("error" in a[1] for a in answers[:-1])
    assert "at most 131072" in answers[-2][1]["error"]
    assert rig.gateway.stop() == 0
    # One connection the whole time: nothing of it took the session down.
    log = rig.gateway.output()
    assert log.count("plc-1: connected to") == 1, log[-3000:]
    wait_until(lambda: writes_at(rig.stats, "plc-1") == 1, 5, "the simulator's write count")


async def raw_invoke(hub: HubControl, device: str, method: str, payload: bytes) -> tuple[int, Any]:
    """A method call with any payload bytes, past the service side's own checks."""
    import uuid

    from gateway.core import iothub
    from gateway.testbed.localhub.front import inner_topic

    rid = uuid.uuid4().hex[:16]
    future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
    hub._waiting[rid] = future
    sent = hub.client.publish(
        inner_topic(device, iothub.method_request_topic(method, rid)), payload, qos=1
    )
    assert sent is not None
    await sent
    async with asyncio.timeout(15):
        return await future


def test_writes_on_a_serial_bus_keep_one_request_on_the_wire(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    """Three units on one paced RTU line (a socat pty pair): commands go through the link's
    own schedule, between the polls, and the line never sees two requests at once."""
    rig = Rig(tmp_path, pki_dir, procs, 3, "--rtu", "--baud", "19200", period=1.0)

    async def body(hub: HubControl) -> list[tuple[int, Any]]:
        await until_connected(hub, "plc-3")
        for unit in (1, 2, 3):
            await until_up(hub, f"plc-{unit}")
        calls = [
            hub.invoke("plc-1", "write", {"point": "float32_0", "value": float(i)}, timeout=20)
            for i in range(5)
        ]
        calls += [hub.invoke(f"plc-{u}", "read", {}, timeout=20) for u in (1, 2, 3)]
        return list(await asyncio.gather(*calls))

    answers = rig.drive(body)
    assert [a[0] for a in answers] == [200] * 8, answers
    assert [a[1]["read_back"] for a in answers[:5]] == [0.0, 1.0, 2.0, 3.0, 4.0]
    wait_until(lambda: writes_at(rig.stats, "plc-1") == 5, 5, "the simulator's write count")
    assert rig.gateway.stop() == 0
    stats = sim_stats(rig.stats)
    assert stats["overlaps"] == 0 and stats["bad_frames"] == 0
    assert writes_at(rig.stats, "plc-2") == writes_at(rig.stats, "plc-3") == 0


def test_a_method_call_is_answered_while_100_devices_send_telemetry(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    rig = Rig(tmp_path, pki_dir, procs, 100, period=0.2)

    async def body(hub: HubControl) -> list[tuple[int, Any]]:
        await until_connected(hub, *(f"plc-{i}" for i in range(1, 101)))
        await until_up(hub, "plc-1")
        out = []
        for i in range(5):
            out.append(await hub.invoke("plc-1", "write", {"point": "float32_0", "value": i + 0.5}))
            out.append(await hub.invoke(f"plc-{50 + i}", "status", None))
        return out

    answers = rig.drive(body)
    assert [a[0] for a in answers] == [200] * 10, answers
    assert answers[8][1]["read_back"] == 4.5
    assert all(a[1]["uplink"]["connected"] for a in answers[1::2])
    assert rig.gateway.stop() == 0


def test_a_ble_setpoint_is_written_with_response_and_read_back(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    from conftest import ble_sim, start_ble_simulator

    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _, bus = start_ble_simulator(
        procs, tmp_path, pki_dir, hub_port, 2, "--writable", "--bond", "just-works"
    )
    doc = tomllib.loads(config.read_text())
    doc["devices"][0]["control"] = {"channels": ["method"], "writes": {"setpoint": {"max": 40}}}
    config.write_text(render_toml(doc))
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    pki = Pki(pki_dir)

    async def go() -> list[tuple[int, Any]]:
        async with HubControl(pki, "127.0.0.1", hub_port) as hub:
            await until_connected(hub, "ble-1", "ble-2")
            await until_up(hub, "ble-1")
            return [
                await hub.invoke("ble-1", "write", {"point": "setpoint", "value": 21.5}),
                await hub.invoke("ble-1", "write", {"point": "setpoint", "value": 41}),
                await hub.invoke("ble-2", "write", {"point": "setpoint", "value": 21.5}),
            ]

    written, too_high, other = asyncio.run(go())
    assert written[0] == 200 and written[1]["read_back"] == 21.5, written
    assert too_high[0] == 403 and too_high[1]["rule"] == "devices.control.writes.setpoint.max"
    assert other[0] == 403
    stats: Any = ble_sim(bus, "stats")
    assert stats["devices"]["ble-1"]["write_requests"] == 1
    assert stats["devices"]["ble-2"]["writes"] == 0
    assert gateway.stop() == 0
