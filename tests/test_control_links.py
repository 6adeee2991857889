"""The control room against a real Modbus link and the pymodbus simulator: answers, the writes
that reach the device (the simulator counts them), the security events, C2D carried out once."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from test_modbus_link import _with_link

from adapters.modbus.link import ModbusLink
from adapters.modbus.sim.devices import SimulatedFleet
from gateway.control.commands import Answer
from gateway.control.dispatch import Control
from gateway.core.policy import DevicePolicy, Switches, WriteRule

POLICY = DevicePolicy(
    writes={"setpoint": WriteRule(0.0, 100.0), "relay": WriteRule(), "limit": WriteRule()},
    channels=frozenset({"method", "c2d", "twin"}),
    per_minute=1000,
)


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, kind: str, device: str | None, reason: str, **fields: Any) -> None:
        self.events.append({"kind": kind, "device": device, "reason": reason, **fields})

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.events]


def make_control(
    tmp: Path,
    link: ModbusLink,
    record: Recorder,
    *,
    policy: DevicePolicy = POLICY,
    switches: Switches | None = None,
    timeout: float = 5.0,
) -> Control:
    control = Control(
        switches or Switches(),
        {"plc-1": policy},
        record=record,
        status_of=lambda d: {"device": d, "state": link.health.state},
        section_of=lambda d: {"state": link.health.state},
        watch=lambda d, changed: link.health.watchers.append(changed),
        state_dir=tmp,
        timeout=timeout,
    )
    control.attach("plc-1", link, frozenset(link.points))
    return control


async def invoke(control: Control, name: str, payload: object) -> Answer:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return await asyncio.wait_for(control.method("plc-1", name, data, "7"), 10)


def test_a_method_write_reaches_the_register_is_read_back_and_recorded(tmp_path: Path) -> None:
    record = Recorder()

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> list[Answer]:
        control = make_control(tmp_path, link, record)
        try:
            out = [
                await invoke(control, "write", {"point": "setpoint", "value": 42.5}),
                await invoke(control, "write", {"point": "relay", "value": True}),
                await invoke(control, "read", {"points": ["setpoint", "relay"]}),
            ]
            assert fleet.devices[0].writes == 2
            return out
        finally:
            control.close()

    write, relay, read = asyncio.run(_with_link(body))
    assert write.status == 200, write.body
    assert write.body == {
        "point": "setpoint",
        "value": 42.5,
        "read_back": 42.5,
        "exact": True,
        "quality": "good",
    }
    assert relay.status == 200 and relay.body["read_back"] is True
    assert read.body["values"] == {"setpoint": 42.5, "relay": True}
    accepted = [e for e in record.events if e["kind"] == "command-accepted"]
    assert [(e["command"], e["point"], e["value"], e["channel"]) for e in accepted] == [
        ("write", "setpoint", 42.5, "method"),
        ("write", "relay", True, "method"),
        ("read", None, None, "method"),
    ]
    assert accepted[0]["read_back"] == 42.5 and accepted[0]["status"] == 200


def test_fifty_refused_commands_of_every_kind_write_nothing_and_name_their_rule(
    tmp_path: Path,
) -> None:
    record = Recorder()
    kinds = [
        # (policy or switches, method, payload, status, rule)
        ("policy", "write", {"point": "float32_0", "value": 1.0}, 403, "devices.control.writes"),
        (
            "policy",
            "write",
            {"point": "setpoint", "value": 100.5},
            403,
            "devices.control.writes.setpoint.max",
        ),
        (
            "policy",
            "write",
            {"point": "setpoint", "value": -1},
            403,
            "devices.control.writes.setpoint.min",
        ),
        ("policy", "write", {"point": "nothing", "value": 1}, 404, "points"),
        ("policy", "write", {"point": "setpoint"}, 400, "request"),
        ("policy", "write", b"{oops", 400, "request"),
        ("policy", "reboot", {}, 404, "request"),
        ("off", "write", {"point": "setpoint", "value": 5}, 403, "control.enabled"),
        ("ro", "write", {"point": "setpoint", "value": 5}, 403, "control.read_only"),
        (
            "method-less",
            "write",
            {"point": "setpoint", "value": 5},
            403,
            "devices.control.channels",
        ),
    ]

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> None:
        controls = {
            "policy": make_control(tmp_path / "a", link, record),
            "off": make_control(tmp_path / "b", link, record, switches=Switches(enabled=False)),
            "ro": make_control(tmp_path / "c", link, record, switches=Switches(read_only=True)),
            "method-less": make_control(
                tmp_path / "d",
                link,
                record,
                policy=DevicePolicy(POLICY.writes, frozenset({"twin"}), 1000),
            ),
        }
        before = fleet.devices[0].writes
        try:
            for round_ in range(5):
                for which, name, payload, status, rule in kinds:
                    answer = await invoke(controls[which], name, payload)
                    assert answer.status == status, (round_, which, payload, answer.body)
                    assert answer.body.get("rule", "request") == rule
            # Over the rate: 2 writes allowed per minute, the rest refused.
            rated = make_control(
                tmp_path / "e", link, record, policy=DevicePolicy(POLICY.writes, POLICY.channels, 2)
            )
            answers = [
                await invoke(rated, "write", {"point": "limit", "value": float(i)})
                for i in range(4)
            ]
            assert [a.status for a in answers] == [200, 200, 403, 403]
            assert answers[2].body["rule"] == "devices.control.max_writes_per_minute"
            assert fleet.devices[0].writes == before + 2
            # Quarantined: refused before anything is sent.
            link.health.quarantine("a test says so")
            quarantined = await invoke(controls["policy"], "write", {"point": "limit", "value": 1})
            assert quarantined.status == 409 and quarantined.body["rule"] == "device.quarantined"
            assert fleet.devices[0].writes == before + 2
        finally:
            for control in controls.values():
                control.close()

    asyncio.run(_with_link(body))
    refused = [e for e in record.events if e["kind"] == "command-refused"]
    assert len(refused) == 5 * len(kinds) + 2 + 1
    for event in refused:
        assert event["rule"] and event["status"] in (400, 403, 404, 409)
        assert event["channel"] == "method" and event["outcome"] == "refused"


def test_a_c2d_message_id_is_carried_out_once_even_across_a_restart(tmp_path: Path) -> None:
    record = Recorder()
    message = json.dumps({"point": "limit", "value": 3.5}).encode()

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> None:
        control = make_control(tmp_path, link, record)
        try:
            await asyncio.wait_for(control.c2d("plc-1", message, "mid-1"), 10)
            await asyncio.wait_for(control.c2d("plc-1", message, "mid-1"), 10)
            assert fleet.devices[0].writes == 1
        finally:
            control.close()
        # A new gateway run: the ledger on disk remembers.
        again = make_control(tmp_path, link, record)
        try:
            await asyncio.wait_for(again.c2d("plc-1", message, "mid-1"), 10)
            assert fleet.devices[0].writes == 1
            await asyncio.wait_for(again.c2d("plc-1", message, "mid-2"), 10)
            assert fleet.devices[0].writes == 2
        finally:
            again.close()

    asyncio.run(_with_link(body))
    assert record.kinds().count("command-accepted") == 2


def test_a_c2d_message_started_before_a_crash_is_not_done_twice(tmp_path: Path) -> None:
    record = Recorder()
    # What a gateway killed between the ledger's "started" line and the write leaves behind.
    (tmp_path / "c2d-messages.jsonl").write_text(
        json.dumps({"device": "plc-1", "mid": "mid-9", "state": "started"}) + "\n" + '{"devi'
    )

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> None:
        control = make_control(tmp_path, link, record)
        try:
            message = json.dumps({"point": "limit", "value": 1.0}).encode()
            await asyncio.wait_for(control.c2d("plc-1", message, "mid-9"), 10)
            assert fleet.devices[0].writes == 0
        finally:
            control.close()

    asyncio.run(_with_link(body))
    assert record.kinds() == ["command-outcome-unknown"]


def test_twin_desired_points_are_applied_once_and_refusals_reported(tmp_path: Path) -> None:
    record = Recorder()

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> list[dict[str, Any]]:
        control = make_control(tmp_path, link, record)
        try:
            doc = {"points": {"setpoint": 55, "limit": 1e9, "float32_0": 3.0}, "$version": 4}
            first = await control.desired("plc-1", doc, None)
            writes = fleet.devices[0].writes
            # The same desired document again (a twin GET after a reconnect): nothing written.
            second = await control.desired("plc-1", doc, None)
            assert fleet.devices[0].writes == writes
            third = await control.desired("plc-1", {"points": {"setpoint": 60}}, 5)
            assert fleet.devices[0].writes == writes + 1
            return [first, second, third]
        finally:
            control.close()

    first, second, third = asyncio.run(_with_link(body))
    points = first["points"]
    assert points["setpoint"] == {"status": "applied", "value": 55, "read_back": 55.0, "version": 4}
    assert points["float32_0"]["status"] == "refused"
    assert points["float32_0"]["rule"] == "devices.control.writes"
    assert points["limit"]["status"] == "applied"  # float32 holds 1e9
    assert second == {"points": {"float32_0": points["float32_0"]}}
    assert third["points"]["setpoint"]["version"] == 5


def test_a_device_that_does_not_answer_in_time_is_a_504_and_one_that_refuses_a_502(
    tmp_path: Path,
) -> None:
    record = Recorder()

    async def slow(link: ModbusLink, fleet: SimulatedFleet) -> Answer:
        control = make_control(tmp_path / "slow", link, record, timeout=0.3)
        try:
            fleet.devices[0].spec = replace(fleet.devices[0].spec, fault="slow:0.8")
            return await invoke(control, "write", {"point": "limit", "value": 2.0})
        finally:
            control.close()

    async def refusing(link: ModbusLink, fleet: SimulatedFleet) -> Answer:
        policy = DevicePolicy({"unmapped": WriteRule()}, POLICY.channels, 10)
        control = make_control(tmp_path / "refusing", link, record, policy=policy)
        try:
            return await invoke(control, "write", {"point": "unmapped", "value": 7})
        finally:
            control.close()

    timed_out = asyncio.run(_with_link(slow))
    assert timed_out.status == 504, timed_out.body
    refused = asyncio.run(_with_link(refusing, holes=frozenset({("holding", 46)})))
    assert refused.status == 502, refused.body
    assert "exception" in refused.body["error"] or refused.body.get("cause") == "exception"
    failed = [e for e in record.events if e["kind"] == "command-failed"]
    assert [e["status"] for e in failed] == [504, 502]


def test_a_value_the_register_cannot_hold_is_a_400_and_reaches_nothing(tmp_path: Path) -> None:
    record = Recorder()
    policy = DevicePolicy({"setpoint": WriteRule(), "relay": WriteRule()}, POLICY.channels, 100)

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> list[Answer]:
        control = make_control(tmp_path, link, record, policy=policy)
        try:
            out = [
                # int16 with scale 0.1 holds -3276.8 .. 3276.7
                await invoke(control, "write", {"point": "setpoint", "value": 4000}),
                await invoke(control, "write", {"point": "setpoint", "value": True}),
                await invoke(control, "write", {"point": "relay", "value": 7}),
            ]
            assert fleet.devices[0].writes == 0
            return out
        finally:
            control.close()

    answers = asyncio.run(_with_link(body))
    assert [a.status for a in answers] == [400, 400, 400]
    assert "4000 does not fit setpoint (int16, scale 0.1)" in answers[0].body["error"]


def test_a_desired_point_refused_while_the_device_is_down_is_applied_when_it_is_up(
    tmp_path: Path,
) -> None:
    record = Recorder()

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> list[dict[str, Any]]:
        control = make_control(tmp_path, link, record)
        try:
            link.health.down("a test says so")
            first = await control.desired("plc-1", {"points": {"limit": 12.0}, "$version": 3}, None)
            assert fleet.devices[0].writes == 0
            changed = asyncio.Event()
            control.watch("plc-1", changed.set)  # as a session does, for its reported patches
            link.health.up()  # the next good poll does this; the wait ends at once here
            async with asyncio.timeout(5):
                while control.reported("plc-1")["points"]["limit"]["status"] != "applied":
                    await changed.wait()
                    changed.clear()
            assert fleet.devices[0].writes == 1
            return [first, control.reported("plc-1")]
        finally:
            control.close()

    first, reported = asyncio.run(_with_link(body))
    assert first["points"]["limit"]["status"] == "failed"
    assert first["points"]["limit"]["rule"] == "device.state"
    assert reported["points"]["limit"] == {
        "status": "applied",
        "value": 12.0,
        "read_back": 12.0,
        "version": 3,
    }
    assert reported["fieldgate"] == {"state": "up"}


def test_a_redelivery_while_the_first_delivery_is_carried_out_waits_for_it(
    tmp_path: Path,
) -> None:
    record = Recorder()
    message = json.dumps({"point": "limit", "value": 8.0}).encode()

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> None:
        control = make_control(tmp_path, link, record)
        try:
            fleet.devices[0].spec = replace(fleet.devices[0].spec, fault="slow:0.3")
            await asyncio.wait_for(
                asyncio.gather(
                    control.c2d("plc-1", message, "mid-5"), control.c2d("plc-1", message, "mid-5")
                ),
                10,
            )
            assert fleet.devices[0].writes == 1
        finally:
            control.close()

    asyncio.run(_with_link(body))
    assert record.kinds() == ["command-accepted"]


def test_the_write_rate_holds_above_a_thousand_a_minute(tmp_path: Path) -> None:
    record = Recorder()
    limit = 1005
    policy = DevicePolicy(POLICY.writes, POLICY.channels, limit)

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> list[int]:
        control = make_control(tmp_path, link, record, policy=policy)
        try:
            return [
                (await invoke(control, "write", {"point": "limit", "value": float(i)})).status
                for i in range(limit + 2)
            ]
        finally:
            control.close()

    statuses = asyncio.run(_with_link(body))
    assert statuses.count(200) == limit and statuses[-2:] == [403, 403]


def test_fresh_reads_are_rate_limited_too(tmp_path: Path) -> None:
    record = Recorder()
    policy = DevicePolicy(POLICY.writes, POLICY.channels, 10, reads_per_minute=3)

    async def body(link: ModbusLink, fleet: SimulatedFleet) -> list[Answer]:
        control = make_control(tmp_path, link, record, policy=policy)
        try:
            return [await invoke(control, "read", {"points": ["limit"]}) for _ in range(5)]
        finally:
            control.close()

    answers = asyncio.run(_with_link(body))
    assert [a.status for a in answers] == [200, 200, 200, 403, 403]
    assert answers[-1].body["rule"] == "devices.control.max_reads_per_minute"
