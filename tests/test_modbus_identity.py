"""Modbus device identity: fingerprints (FC 43 objects, identity registers), enrolment, the
gate's checks, and the swap of two devices at run time, against pymodbus's own servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.base import QUARANTINED, DeviceHealth
from adapters.modbus.admission import ModbusRequirements, mismatches
from adapters.modbus.checks import (
    LENGTH,
    TRAILING,
    UNDECODABLE,
    Expected,
    check_response,
)
from adapters.modbus.config import ModbusEndpoint, ModbusIdentity, implicit_link
from adapters.modbus.identity import (
    Identification,
    collect_evidence,
    collect_fingerprint,
    format_registers,
    next_request,
    objects_fingerprint,
    text,
)
from adapters.modbus.link import ModbusLink, UnitSource
from adapters.modbus.sim.devices import (
    DeviceSpec,
    SimulatedFleet,
    default_serial,
    held_value,
    make_points,
)
from adapters.modbus.sim.server import DeviceServer
from adapters.modbus.transport import ModbusTransport, Target
from gateway import config as config_mod
from gateway.core.auth import AuthGate, Registration
from gateway.core.errors import ConfigError, DeviceUnavailable
from gateway.core.readings import Scan
from gateway.enroll import load_registry, parse_registry, registry_path
from gateway.events import read_events
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

# -- pure: formats, objects, the "more follows" walk --


@contextlib.asynccontextmanager
async def _unit_source(device_id: str, endpoint: ModbusEndpoint) -> AsyncIterator[UnitSource]:
    """A device's own connection (its implicit link), as identity collection reads it."""
    link = implicit_link(device_id, endpoint)
    async with ModbusTransport(link, lambda _c, _t: None) as shared:
        yield UnitSource(shared, Target(device_id, endpoint.unit, endpoint.label))


def test_identity_registers_format_as_ascii_hex_and_uint() -> None:
    words = [0x4131, 0x3233, 0x0000]  # "A123" then NUL padding
    assert format_registers(words, "ascii") == "A123"
    assert format_registers(words, "hex") == "413132330000"
    assert format_registers([0x0001, 0x0002], "uint") == str(65538)
    # Bytes a device sends are never trusted as text: control characters are escaped.
    assert text(b"ab\x07c\xff") == "ab\\x07c\\xff"


def test_fc43_objects_are_named_and_a_repeated_object_keeps_both_values() -> None:
    objects = ((0, b"ACME"), (1, b"PX-9"), (2, b"1.0"), (0x81, b"x"), (0x81, b"y"))
    assert objects_fingerprint(objects) == {
        "vendor": "ACME",
        "product_code": "PX-9",
        "revision": "1.0",
        "object_0x81": "x|y",
    }


def test_more_follows_is_followed_forward_only() -> None:
    done = Identification(((0, b"a"),))
    assert next_request(done, 0, 1) is None
    more = Identification(((0, b"a"),), more_follows=True, next_object=3)
    assert next_request(more, 0, 1) == 3
    with pytest.raises(ValueError, match="not after"):
        next_request(Identification((), more_follows=True, next_object=3), 3, 2)
    with pytest.raises(ValueError, match="after 16 requests"):
        next_request(more, 0, 16)


def _fc43_frame(
    objects: list[tuple[int, bytes]], *, read_code: int = 2, extra: bytes = b""
) -> bytes:
    body = b"".join(bytes([oid, len(v)]) + v for oid, v in objects)
    pdu = bytes([0x2B, 0x0E, read_code, 0x82, 0x00, 0x00, len(objects)]) + body + extra
    return struct.pack(">HHHB", 7, 0, len(pdu) + 1, 1) + pdu


def test_fc43_answers_are_checked_against_their_request() -> None:
    expected = Expected(7, 1, 0x2B, 2, False, 0)
    good = _fc43_frame([(0, b"ACME"), (1, b"PX")])
    assert check_response(good, expected).cause is None
    assert check_response(_fc43_frame([(0, b"A")], extra=b"zz"), expected).cause == TRAILING
    assert check_response(_fc43_frame([(0, b"A")], read_code=1), expected).cause == UNDECODABLE
    short = bytearray(_fc43_frame([(0, b"ACME")]))
    short[13] = 9  # the object claims 9 bytes, the frame holds 4
    assert check_response(bytes(short), expected).cause == LENGTH


# -- pure: the decision --


def test_identity_none_is_admitted_as_unverified() -> None:
    assert ModbusRequirements(False, None).check({}, {}) == (None, {"verified": "no"})


def test_a_device_with_an_identity_method_but_nothing_pinned_is_not_enrolled() -> None:
    reason, _ = ModbusRequirements(True, None, "fieldgate enroll --config g.toml").check(
        {"serial": "A123"}, {}
    )
    assert reason == "not enrolled: run fieldgate enroll --config g.toml"


def test_a_mismatch_names_what_was_expected_and_what_was_seen() -> None:
    pinned = {"serial": "A123", "vendor": "ACME"}
    seen = {"serial": "B777", "vendor": "ACME", "identity_source": "fc43+registers"}
    reason, _ = ModbusRequirements(True, pinned).check(seen, {})
    assert reason == "identity mismatch: serial expected 'A123' seen 'B777'"
    # How it was read is not part of the identity; a value that appeared or vanished is.
    assert ModbusRequirements(True, pinned).check({**pinned, "fc43": "x"}, {}) == (
        None,
        {"verified": "yes"},
    )
    assert mismatches(pinned, {"serial": "A123"}) == ["vendor expected 'ACME' seen nothing"]
    assert mismatches({"serial": "A"}, {"serial": "A", "model_name": "M"}) == [
        "model_name expected nothing seen 'M'"
    ]


def test_the_gate_quarantines_a_mismatch_and_records_expected_and_seen() -> None:
    events: list[tuple[str, str | None, str, dict[str, Any]]] = []
    gate = AuthGate(
        [
            Registration(
                "plc-1",
                "modbus-tcp",
                "h:502/unit 1",
                requirements=ModbusRequirements(True, {"serial": "A123"}),
            )
        ],
        lambda kind, device, reason, **f: events.append((kind, device, reason, f)),
    )
    from gateway.core.auth import Evidence

    assert gate.admit(Evidence("plc-1", "modbus-tcp", "h:502/unit 1", {"serial": "A123"})) is None
    assert gate.admitted("plc-1")
    refusal = gate.admit(Evidence("plc-1", "modbus-tcp", "h:502/unit 1", {"serial": "B777"}))
    assert refusal == "identity mismatch: serial expected 'A123' seen 'B777'"
    assert not gate.admitted("plc-1")
    kinds = [e[0] for e in events]
    assert kinds == ["device-admitted", "device-quarantined"]
    assert events[0][3]["verified"] == "yes"
    assert events[1][3]["serial"] == "B777"


# -- config and registry --


def _doc(identity: object | None) -> dict[str, Any]:
    device: dict[str, Any] = {
        "id": "plc-1",
        "cert": "c.pem",
        "key": "k.pem",
        "modbus": {"host": "127.0.0.1", "port": 1502},
        "points": [{"name": "t", "address": 0}],
    }
    if identity is not None:
        device["identity"] = identity
    return {
        "hub": {"hostname": "h", "ca_file": "ca.pem"},
        "sealing": {"keyring": "k.json", "key_id": "k1"},
        "devices": [device],
    }


def test_a_modbus_device_must_say_how_it_is_verified() -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.validate(_doc(None), "g.toml", check_files=False)
    text_ = str(err.value)
    assert "g.toml" in text_ and "devices[0].identity" in text_
    assert 'identity = "none"' in text_ and "fc43 = true" in text_
    with pytest.raises(ConfigError, match=r"devices\[0\].identity: 'maybe'"):
        config_mod.validate(_doc("maybe"), "g.toml", check_files=False)
    with pytest.raises(ConfigError, match=r"devices\[0\].identity.registers\[0\].format"):
        bad = {"registers": [{"name": "serial", "address": 1, "format": "octal"}]}
        config_mod.validate(_doc(bad), "g.toml", check_files=False)
    cfg = config_mod.validate(_doc("none"), "g.toml", check_files=False)
    assert cfg.devices[0].identity is not None and not cfg.devices[0].identity.verified
    cfg = config_mod.validate(_doc({"fc43": True, "recheck": 60}), "g.toml", check_files=False)
    assert cfg.devices[0].identity == ModbusIdentity(fc43=True, recheck=60)


def test_a_malformed_registry_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = registry_path(tmp_path / "gateway.toml")
    assert path == tmp_path / "gateway.enrolled.json"
    assert load_registry(path) == {}  # nothing enrolled yet
    doc = {
        "format": "fieldgate-enrolment",
        "version": 1,
        "devices": {"plc-1": {"fingerprint": {"serial": 7}}},
    }
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        load_registry(path)
    assert str(path) in str(err.value) and "devices.plc-1.fingerprint.serial" in str(err.value)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_registry(path)
    problems: list[str] = []
    parse_registry({"format": "x", "version": 1, "devices": {}}, problems)
    assert problems == ["format: must be 'fieldgate-enrolment' (got 'x')"]


def test_the_gateway_refuses_a_malformed_registry_and_quarantines_devices_not_enrolled(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 2, "--identity", "fc43")
    registry_path(config).write_text('{"format": "fieldgate-enrolment", "version": 2}')
    run = subprocess.run(
        fieldgate("run", "--config", str(config)), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2, run.stderr
    assert "gateway.enrolled.json" in run.stderr and "version: must be 1" in run.stderr

    # Enrolled: plc-1 only. plc-2 has an identity method and nothing pinned.
    registry_path(config).unlink()
    enrolled = subprocess.run(
        fieldgate("enroll", "--config", str(config), "--yes", "--device", "plc-1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    state = tmp_path / "state"

    def refused() -> list[dict[str, Any]]:
        return [e for e in read_events(state) if e["kind"] == "device-quarantined"]

    wait_until(lambda: bool(refused()), 20, "plc-2 to be refused")
    wait_until(lambda: bool(opened_from(record, keyring)[0]), 20, "plc-1's readings")
    assert gateway.stop() == 0, gateway.output()[-2000:]
    [event] = refused()
    assert event["device"] == "plc-2"
    assert event["reason"] == f"not enrolled: run fieldgate enroll --config {config}"
    admitted = [e for e in read_events(state) if e["kind"] == "device-admitted"]
    assert [(e["device"], e["verified"]) for e in admitted] == [("plc-1", "yes")]
    assert {o.device_id for o in opened_from(record, keyring)[0]} == {"plc-1"}


# -- collection against pymodbus's server --


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_fc43_and_identity_registers_are_read_from_the_device() -> None:
    async def go() -> None:
        port = free_ports(1)
        spec = DeviceSpec("plc-1", port, points=make_points(4))
        async with SimulatedFleet([spec]) as fleet:
            serial_at = fleet.devices[0].serial_address
            identity = ModbusIdentity.model_validate(
                {"fc43": True, "registers": [{"name": "serial", "address": serial_at, "count": 5}]}
            )
            endpoint = ModbusEndpoint(host="127.0.0.1", port=port)
            async with _unit_source("plc-1", endpoint) as transport:
                found = await collect_fingerprint(transport, identity)
        assert found.refusal is None
        assert found.values["vendor"] == "Fieldgate Simulations"
        assert found.values["product_code"] == "FGS-100"
        assert found.values["model_name"] == f"FGS-100 SN {default_serial('plc-1')}"
        assert found.values["serial"] == default_serial("plc-1")
        assert found.notes["identity_source"] == "fc43+registers"

    _run(go())


def test_a_long_identification_is_followed_through_more_follows() -> None:
    long_objects = {i: bytes([0x41 + i]) * 100 for i in range(7)}  # 700 bytes: three answers
    asked: list[int] = []

    def identify(read_code: int, object_id: int) -> dict[int, bytes] | int:
        asked.append(object_id)
        return long_objects

    async def noop(*_a: Any) -> int | None:
        return None

    async def go() -> dict[str, str]:
        port = free_ports(1)
        async with DeviceServer("127.0.0.1", port, 1, 64, noop, identify):
            endpoint = ModbusEndpoint(host="127.0.0.1", port=port)
            async with _unit_source("dev", endpoint) as transport:
                found = await collect_fingerprint(transport, ModbusIdentity(fc43=True))
        assert found.refusal is None
        return found.values

    values = _run(go())
    assert len(asked) >= 3 and asked[0] == 0 and asked == sorted(asked)
    assert values["vendor"] == "A" * 100 and values["user_application_name"] == "G" * 100


def test_fc43_exception_falls_back_to_identity_registers_or_refuses_without_them() -> None:
    async def go() -> tuple[Any, Any]:
        port = free_ports(1)
        spec = DeviceSpec("plc-1", port, points=make_points(4), fc43_exception=True)
        async with SimulatedFleet([spec]) as fleet:
            serial_at = fleet.devices[0].serial_address
            both = ModbusIdentity.model_validate(
                {"fc43": True, "registers": [{"name": "serial", "address": serial_at, "count": 5}]}
            )
            endpoint = ModbusEndpoint(host="127.0.0.1", port=port)
            async with _unit_source("plc-1", endpoint) as transport:
                fallback = await collect_fingerprint(transport, both)
                alone = await collect_evidence(
                    transport, "plc-1", endpoint.label, ModbusIdentity(fc43=True)
                )
        return fallback, alone

    fallback, alone = _run(go())
    assert fallback.refusal is None
    assert fallback.values == {"serial": default_serial("plc-1")}
    assert fallback.notes == {"fc43": "exception 0x01", "identity_source": "registers"}
    assert alone.refusal == "no identity: FC 43 answered exception 0x01"


class _SilentOnFc43:
    """A device that never answers FC 43 (it lacks it and ignores it), with a serial in its
    holding registers: what the transport reports for it, a timeout."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def read(self, table: str, address: int, count: int) -> Any:
        self.asked.append(f"read {table}@{address}")
        from adapters.modbus.transport import Reply

        return Reply([0x4131, 0x3233][:count])

    async def read_device_information(self, read_code: int, object_id: int = 0) -> Identification:
        self.asked.append("fc43")
        raise DeviceUnavailable("plc-1", "h:502/unit 1", "no response within 1 s", cause="timeout")


def test_fc43_not_answered_falls_back_to_registers_and_without_them_is_unavailable() -> None:
    with_serial = ModbusIdentity.model_validate(
        {"fc43": True, "registers": [{"name": "serial", "address": 100, "count": 2}]}
    )
    found = _run(collect_fingerprint(_SilentOnFc43(), with_serial))
    assert found.values == {"serial": "A123"}
    assert found.notes == {"fc43": "no answer", "identity_source": "registers"}
    # Without registers it is not refused (a timeout may pass): the link reconnects.
    with pytest.raises(DeviceUnavailable):
        _run(collect_fingerprint(_SilentOnFc43(), ModbusIdentity(fc43=True)))


# -- the link: checked at connect, and again every recheck --


def _link_run(
    spec: DeviceSpec,
    identity: ModbusIdentity,
    requirements: ModbusRequirements,
    during: Any = None,
    wait: float = 3.0,
) -> tuple[list[Scan], list[tuple[str, str, dict[str, Any]]], DeviceHealth]:
    scans: list[Scan] = []
    events: list[tuple[str, str, dict[str, Any]]] = []

    async def go() -> None:
        async with SimulatedFleet([spec]) as fleet:
            endpoint = ModbusEndpoint(host="127.0.0.1", port=spec.port)
            gate = AuthGate(
                [Registration(spec.device_id, "modbus-tcp", endpoint.label, True, requirements)],
                lambda kind, _device, reason, **f: events.append((kind, reason, f)),
            )
            health = DeviceHealth(spec.device_id)
            link = ModbusLink(
                spec.device_id,
                endpoint,
                [sp.point for sp in spec.points],
                scans.append,
                gate.admit,
                health,
                identity=identity,
            )
            task = asyncio.create_task(link.run(), name=f"modbus[{spec.device_id}]")
            if during is not None:
                await asyncio.sleep(0.5)
                during(fleet, scans)
            done, _ = await asyncio.wait([task], timeout=wait)
            if not done:
                task.cancel("the test is over")
                with pytest.raises(asyncio.CancelledError):
                    await task
            holder.append(health)

    holder: list[DeviceHealth] = []
    asyncio.run(go())
    return scans, events, holder[0]


def test_identity_none_polls_and_the_admission_says_unverified() -> None:
    spec = DeviceSpec("plc-1", free_ports(1), points=make_points(2, period=0.1))
    scans, events, health = _link_run(
        spec, ModbusIdentity(none=True), ModbusRequirements(False, None), wait=1.0
    )
    assert scans and health.state != QUARANTINED
    assert [(k, f["verified"]) for k, _, f in events] == [("device-admitted", "no")]


def test_a_device_not_enrolled_is_refused_before_any_reading() -> None:
    spec = DeviceSpec("plc-1", free_ports(1), points=make_points(2, period=0.1))
    scans, events, health = _link_run(
        spec, ModbusIdentity(fc43=True), ModbusRequirements(True, None, "fieldgate enroll X")
    )
    assert scans == []
    assert health.state == QUARANTINED
    assert events[0][:2] == ("device-quarantined", "not enrolled: run fieldgate enroll X")


def test_a_mismatch_at_connect_is_refused_with_expected_and_seen_before_any_reading() -> None:
    spec = DeviceSpec("plc-1", free_ports(1), points=make_points(2, period=0.1), serial="B777")
    pinned = _pinned("A123")
    scans, events, health = _link_run(
        spec, ModbusIdentity(fc43=True), ModbusRequirements(True, pinned)
    )
    assert scans == [] and health.state == QUARANTINED
    kind, reason, fields = events[0]
    assert kind == "device-quarantined"
    assert (
        reason == "identity mismatch: model_name expected 'FGS-100 SN A123' seen 'FGS-100 SN B777'"
    )
    assert fields["model_name"] == "FGS-100 SN B777"


def test_the_recheck_catches_a_changed_device_on_the_same_connection() -> None:
    spec = DeviceSpec("plc-1", free_ports(1), points=make_points(2, period=0.1), serial="A123")
    identity = ModbusIdentity(fc43=True, recheck=1)
    seen_at_change: list[int] = []

    def change(fleet: SimulatedFleet, scans: list[Scan]) -> None:
        # Another device's objects behind the same connection (a serial device behind a TCP
        # gateway swapped without the gateway's link dropping): only the recheck can see it.
        fleet.devices[0].persona.objects[0x05] = b"FGS-100 SN B777"
        seen_at_change.append(len(scans))

    pinned = _pinned("A123")
    scans, events, health = _link_run(
        spec, identity, ModbusRequirements(True, pinned), during=change, wait=4.0
    )
    assert seen_at_change[0] > 0  # it was admitted and polled first
    assert health.state == QUARANTINED
    assert [e[0] for e in events] == ["device-admitted", "device-quarantined"]
    assert "model_name expected 'FGS-100 SN A123' seen 'FGS-100 SN B777'" in events[1][1]
    # Polling stopped at the recheck: at most one recheck period of readings after the change.
    assert len(scans) - seen_at_change[0] <= 2 * 12


def test_a_device_that_comes_back_after_gateway_exceptions_is_checked_before_its_next_reading() -> (
    None
):
    # Behind a TCP gateway, a serial device that is unplugged answers 0x0B (target failed to
    # respond) while the TCP connection stays up; what answers after it may be another one.
    spec = DeviceSpec(
        "plc-1",
        free_ports(1),
        points=make_points(2, period=0.1),
        serial="A123",
        fault="exception:11:12",
    )

    def replaced(fleet: SimulatedFleet, scans: list[Scan]) -> None:
        assert scans == []  # still silent behind its gateway
        fleet.devices[0].persona.objects[0x05] = b"FGS-100 SN B777"

    scans, events, health = _link_run(
        spec, ModbusIdentity(fc43=True), ModbusRequirements(True, _pinned("A123")), during=replaced
    )
    assert scans == [] and health.state == QUARANTINED
    assert [e[0] for e in events] == ["device-admitted", "device-quarantined"]
    assert "seen 'FGS-100 SN B777'" in events[1][1]


def _pinned(serial: str) -> dict[str, str]:
    return {
        "vendor": "Fieldgate Simulations",
        "product_code": "FGS-100",
        "revision": "2.4.1",
        "vendor_url": "https://fieldgate.invalid/fgs-100",
        "product_name": "Simulated PLC",
        "model_name": f"FGS-100 SN {serial}",
        "user_application_name": "unit 1",
    }


# -- enrolment, end to end through the CLI --


def test_enroll_pins_fingerprints_and_a_changed_device_needs_confirmation(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 2, "--identity", "both", "--no-fc43", "plc-2"
    )
    # No terminal and no --yes: nobody confirmed, nothing is pinned.
    refused = subprocess.run(
        fieldgate("enroll", "--config", str(config)),
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 0, refused.stderr
    assert "Pin this fingerprint for plc-1?" in refused.stdout
    assert not registry_path(config).exists()

    done = subprocess.run(
        fieldgate("enroll", "--config", str(config)),
        input="y\ny\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    pinned = load_registry(registry_path(config))
    assert pinned["plc-1"].fingerprint["serial"] == default_serial("plc-1")
    assert pinned["plc-1"].fingerprint["vendor"] == "Fieldgate Simulations"
    # plc-2 answers FC 43 with exception 01: its serial register stands in.
    assert pinned["plc-2"].fingerprint == {"serial": default_serial("plc-2")}
    assert "FC 43 answered exception 0x01" in done.stdout

    # A device that changed since: old against new, and "no" keeps the enrolled values.
    doc = json.loads(registry_path(config).read_text())
    doc["devices"]["plc-1"]["fingerprint"]["serial"] = "OLD-1"
    registry_path(config).write_text(json.dumps(doc))
    again = subprocess.run(
        fieldgate("enroll", "--config", str(config), "--device", "plc-1"),
        input="n\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert "CHANGED" in again.stdout
    assert f"'OLD-1'  ->  '{default_serial('plc-1')}'" in again.stdout
    assert load_registry(registry_path(config))["plc-1"].fingerprint["serial"] == "OLD-1"
    yes = subprocess.run(
        fieldgate("enroll", "--config", str(config), "--yes"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert yes.returncode == 0, yes.stderr
    assert load_registry(registry_path(config))["plc-1"].fingerprint["serial"] == default_serial(
        "plc-1"
    )
    assert "enrolled already, unchanged" in yes.stdout  # plc-2


# -- the swap, end to end --


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


@pytest.mark.slow
def test_two_devices_swapped_at_run_time_are_quarantined_before_a_swapped_reading_reaches_the_hub(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, sim = start_simulator(
        procs,
        tmp_path,
        pki_dir,
        hub_port,
        3,
        "--identity",
        "fc43",
        "--swap",
        "plc-1,plc-2",
        "--period",
        "0.1",
        "--max-age",
        "0.3",
    )
    enrolled = subprocess.run(
        fieldgate("enroll", "--config", str(config), "--yes"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    state = tmp_path / "state"

    def readings() -> dict[str, int]:
        out: dict[str, int] = {}
        for o in opened_from(record, keyring)[0]:
            out[o.device_id] = out.get(o.device_id, 0) + len(o.readings)
        return out

    wait_until(lambda: len(readings()) == 3 and min(readings().values()) >= 50, 40, "readings")
    os.kill(sim.pid, signal.SIGUSR2)
    sim.wait_for("swapped plc-1 and plc-2")

    def both_quarantined() -> bool:
        return {e["device"] for e in read_events(state) if e["kind"] == "device-quarantined"} == {
            "plc-1",
            "plc-2",
        }

    wait_until(both_quarantined, 20, "both swapped devices to be quarantined")
    before_stop = readings()
    wait_until(lambda: readings()["plc-3"] > before_stop["plc-3"] + 20, 20, "plc-3 goes on")
    assert gateway.stop() == 0, gateway.output()[-2000:]

    # The events name what was expected and what was seen: each device's own serial (in its
    # model name) against the other's.
    quarantined = {e["device"]: e for e in read_events(state) if e["kind"] == "device-quarantined"}
    for device, other in (("plc-1", "plc-2"), ("plc-2", "plc-1")):
        reason = quarantined[device]["reason"]
        assert reason.startswith("identity mismatch: "), reason
        assert f"expected 'FGS-100 SN {default_serial(device)}'" in reason, reason
        assert f"seen 'FGS-100 SN {default_serial(other)}'" in reason, reason

    # Every reading at the hub is its own device's value: none of the swapped values arrived.
    cfg = config_mod.load(config)
    points = {
        d.id: {
            sp.point.name: (sp.point, sp.seed)
            for sp in make_points(len(d.points), period=d.points[0].period, seed=i)
        }
        for i, d in enumerate(cfg.devices)
    }
    swapped = own = 0
    for o in opened_from(record, keyring)[0]:
        other = {"plc-1": "plc-2", "plc-2": "plc-1"}.get(o.device_id)
        for r in o.readings:
            if r.value is None:
                continue
            step = r.ts_ms // 1000
            point, seed = points[o.device_id][r.point]
            mine = any(_same(r.value, held_value(point, seed, s)) for s in (step, step + 1))
            if other is not None:
                point2, seed2 = points[other][r.point]
                theirs = any(_same(r.value, held_value(point2, seed2, s)) for s in (step, step + 1))
                if theirs and not mine:
                    swapped += 1
            assert mine, (o.device_id, r)
            own += 1
    assert swapped == 0 and own > 0
