"""The pure halves of the control path: decoding cloud requests, and the allow-list's decision."""

from __future__ import annotations

import pytest

from gateway.control.commands import Refused, decode_c2d, decode_desired, decode_method
from gateway.core import iothub
from gateway.core.policy import (
    Command,
    DevicePolicy,
    DeviceState,
    Switches,
    WriteRule,
    decide,
)

POLICY = DevicePolicy(
    writes={"setpoint": WriteRule(10.0, 80.0), "pump": WriteRule()},
    channels=frozenset({"method", "twin"}),
    per_minute=3,
)
UP = DeviceState(frozenset({"setpoint", "pump", "temp"}))


def write(point: str, value: object, channel: str = "method") -> Command:
    return Command("boiler-1", channel, "write", point=point, value=value)  # type: ignore[arg-type]


def test_a_write_inside_every_rule_is_allowed() -> None:
    assert decide(write("setpoint", 42.5), POLICY, Switches(), UP, 100.0).allowed
    assert decide(write("pump", True), POLICY, Switches(), UP, 100.0).allowed


@pytest.mark.parametrize(
    ("command", "switches", "state", "status", "rule"),
    [
        (write("setpoint", 42), Switches(enabled=False), UP, 403, "control.enabled"),
        (write("setpoint", 42), Switches(read_only=True), UP, 403, "control.read_only"),
        (write("temp", 1), Switches(), UP, 403, "devices.control.writes"),
        (write("nothing", 1), Switches(), UP, 404, "points"),
        (write("setpoint", 80.01), Switches(), UP, 403, "devices.control.writes.setpoint.max"),
        (write("setpoint", 9), Switches(), UP, 403, "devices.control.writes.setpoint.min"),
        (write("setpoint", "42"), Switches(), UP, 400, "devices.control.writes.setpoint"),
        (write("setpoint", 42, "c2d"), Switches(), UP, 403, "devices.control.channels"),
        (
            write("setpoint", 42),
            Switches(),
            DeviceState(UP.known_points, "quarantined"),
            409,
            "device.quarantined",
        ),
        (
            write("setpoint", 42),
            Switches(),
            DeviceState(UP.known_points, "down"),
            409,
            "device.state",
        ),
        (
            Command("boiler-1", "method", "read", points=("temp", "x")),
            Switches(),
            UP,
            404,
            "points",
        ),
        (
            Command("boiler-1", "method", "status"),
            Switches(enabled=False),
            UP,
            403,
            "control.enabled",
        ),
    ],
)
def test_each_refusal_names_its_rule(
    command: Command, switches: Switches, state: DeviceState, status: int, rule: str
) -> None:
    decision = decide(command, POLICY, switches, state, 100.0)
    assert not decision.allowed
    assert (decision.status, decision.rule) == (status, rule)
    assert decision.reason


def test_the_rate_counts_writes_of_the_last_minute_only() -> None:
    recent = DeviceState(UP.known_points, recent_writes=(10.0, 50.0, 60.0))
    refused = decide(write("setpoint", 20), POLICY, Switches(), recent, 65.0)
    assert refused.rule == "devices.control.max_writes_per_minute"
    # The first of the three is more than 60 s old at t = 70.5.
    assert decide(write("setpoint", 20), POLICY, Switches(), recent, 70.5).allowed


def test_reads_and_status_need_no_write_rule_but_read_only_keeps_them() -> None:
    nothing = DevicePolicy()
    read = Command("boiler-1", "method", "read", points=("temp",))
    assert decide(read, nothing, Switches(read_only=True), UP, 0).allowed
    assert decide(Command("boiler-1", "method", "status"), nothing, Switches(), UP, 0).allowed
    # The default policy allows no write at all.
    assert decide(write("setpoint", 20), nothing, Switches(), UP, 0).status == 403


@pytest.mark.parametrize(
    ("name", "payload", "status", "words"),
    [
        ("write", b"{not json", 400, "not JSON"),
        ("write", b'{"point": "setpoint"}', 400, '"point" and "value"'),
        ("write", b'{"point": 7, "value": 1}', 400, "payload.point"),
        ("write", b'{"point": "setpoint", "value": "hot"}', 400, "payload.value"),
        ("write", b'{"point": "setpoint", "value": [1]}', 400, "payload.value"),
        ("write", b'{"point": "setpoint", "value": 1, "force": true}', 400, "'force'"),
        ("write", b"[1, 2]", 400, "JSON object"),
        ("read", b'{"points": "temp"}', 400, "payload.points"),
        ("reboot", b"{}", 404, "no method 'reboot'"),
        ("write", b" " * (iothub.METHOD_PAYLOAD_MAX + 1), 400, "at most"),
    ],
)
def test_malformed_method_calls_are_refused_with_what_is_wrong(
    name: str, payload: bytes, status: int, words: str
) -> None:
    with pytest.raises(Refused) as caught:
        decode_method("boiler-1", name, payload, "7")
    assert caught.value.answer.status == status
    assert words in caught.value.answer.body["error"]


def test_method_calls_decode_to_commands() -> None:
    cmd = decode_method("boiler-1", "write", b'{"point": "setpoint", "value": 42.5}', "9")
    assert (cmd.action, cmd.point, cmd.value, cmd.ref, cmd.channel) == (
        "write",
        "setpoint",
        42.5,
        "9",
        "method",
    )
    assert decode_method("boiler-1", "read", b"", "1").points == ()
    assert decode_method("boiler-1", "read", b'{"points": ["a", "b"]}', "1").points == ("a", "b")
    assert decode_method("boiler-1", "status", b"null", "1").action == "status"


def test_a_c2d_message_is_a_write_request() -> None:
    cmd = decode_c2d("boiler-1", b'{"point": "pump", "value": false}', "mid-1")
    assert (cmd.channel, cmd.point, cmd.value, cmd.ref) == ("c2d", "pump", False, "mid-1")
    with pytest.raises(Refused):
        decode_c2d("boiler-1", b"x" * (iothub.C2D_PAYLOAD_MAX + 1), "mid-2")


def test_desired_points_become_twin_writes_and_bad_ones_are_reported() -> None:
    desired = {"points": {"setpoint": 55, "pump": None, "bad": "hot"}, "other": 1, "$version": 4}
    decoded = decode_desired("boiler-1", desired)
    assert decoded.version == 4
    assert [(c.point, c.value, c.ref, c.channel) for c in decoded.commands] == [
        ("setpoint", 55, "4", "twin")
    ]
    assert decoded.refused["bad"].status == 400
    assert decode_desired("boiler-1", {"$version": 2}).commands == ()
    assert "" in decode_desired("boiler-1", {"points": [1]}).refused
