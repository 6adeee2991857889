"""The auth gate decides every admission over the evidence adapters collect, and records it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.ble import admission, gatt
from adapters.ble.admission import BleRequirements
from gateway.core.auth import UNKNOWN_LIMIT, AuthGate, Evidence, Registration
from gateway.events import SecurityEvents, read_events

KEY = os.urandom(32)
ADDRESS = "C0:FE:00:00:00:01"
ENDPOINT = f"hci0/{ADDRESS}"


@pytest.fixture(autouse=True)
def _close_events() -> Iterator[None]:
    yield
    for events in OPENED:
        events.close()
    OPENED.clear()


OPENED: list[SecurityEvents] = []


def gate(tmp: Path, *registrations: Registration) -> AuthGate:
    events = SecurityEvents(tmp)
    OPENED.append(events)
    return AuthGate(list(registrations), events.record)


def ble(
    requirements: BleRequirements, *, endpoint: str = ENDPOINT, device: str = "ble-1"
) -> Registration:
    return Registration(device, "ble", endpoint, requirements=requirements)


def evidence(
    identity: str = ADDRESS,
    bond: str = "authenticated",
    *,
    answer: bytes | None = None,
    nonce: bytes = b"n" * 16,
    bound: str | None = None,
    endpoint: str = ENDPOINT,
    refusal: str | None = None,
) -> Evidence:
    fingerprint = {admission.IDENTITY: identity, admission.BOND: bond}
    if bound is not None:
        fingerprint[admission.BOUND] = bound
    proofs = {} if answer is None else {admission.NONCE: nonce, admission.ANSWER: answer}
    return Evidence("ble-1", "ble", endpoint, fingerprint, proofs, refusal)


def answer(nonce: bytes = b"n" * 16, identity: str = ADDRESS) -> bytes:
    return gatt.challenge_response(KEY, nonce, identity)


def test_the_registry_decides_unknown_disabled_and_misplaced_devices(tmp_path: Path) -> None:
    plc = Registration("plc-1", "modbus-tcp", "10.0.0.5:502/unit 1")
    off = Registration("plc-2", "modbus-tcp", "10.0.0.6:502/unit 1", enabled=False)
    g = gate(tmp_path, plc, off)
    assert g.admit(Evidence("ghost", "modbus-tcp", "x")) == "not in the registry"
    assert g.admit(Evidence("plc-2", "modbus-tcp", off.endpoint)) == "disabled in the registry"
    assert g.admit(Evidence("plc-1", "ble", plc.endpoint)) == (
        "registered for modbus-tcp, seen on ble"
    )
    assert g.admit(Evidence("plc-1", "modbus-tcp", "10.0.0.9:502/unit 1")) == (
        "bound to 10.0.0.5:502/unit 1, seen at 10.0.0.9:502/unit 1"
    )
    assert not g.admitted("plc-1")
    assert g.admit(Evidence("plc-1", "modbus-tcp", plc.endpoint)) is None
    assert g.admitted("plc-1")
    kinds = [(e["kind"], e["device"]) for e in read_events(tmp_path)]
    assert kinds == [
        ("device-quarantined", "ghost"),
        ("device-quarantined", "plc-2"),
        ("device-quarantined", "plc-1"),
        ("device-quarantined", "plc-1"),
        ("device-admitted", "plc-1"),
    ]


def test_ble_identity_bond_and_challenge_are_judged_in_order(tmp_path: Path) -> None:
    g = gate(tmp_path, ble(BleRequirements(ADDRESS, None, "authenticated", KEY)))
    other = "C0:FE:00:00:00:09"
    assert g.admit(evidence(other, answer=answer(identity=other))) == (
        f"identity address is {other}, the config names {ADDRESS}"
    )
    assert g.admit(evidence(bond="just-works", answer=answer())) == (
        "bond is just-works, the config requires authenticated"
    )
    assert g.admit(evidence()) == "challenge not answered"
    assert g.admit(evidence(answer=b"\0" * 32)) == "challenge answer does not match the device key"
    assert g.admit(evidence(refusal="pairing failed: Rejected")) == "pairing failed: Rejected"
    assert g.admit(evidence(answer=answer())) is None
    events = read_events(tmp_path)
    admitted = [e for e in events if e["kind"] == "device-admitted"]
    assert admitted[0]["challenge"] == "passed" and admitted[0]["bond"] == "authenticated"
    wrong = [e for e in events if e["reason"].startswith("challenge answer does not")]
    assert wrong[0]["challenge"] == "failed"
    # Proofs are checked, never recorded.
    assert not any("answer" in e or "nonce" in e for e in events)


def test_an_accepted_answer_given_again_to_a_new_nonce_is_named_a_replay(tmp_path: Path) -> None:
    g = gate(tmp_path, ble(BleRequirements(ADDRESS, None, "none", KEY)))
    first = answer(b"a" * 16)
    assert g.admit(evidence(bond="none", nonce=b"a" * 16, answer=first)) is None
    assert g.admit(evidence(bond="none", nonce=b"b" * 16, answer=first)) == (
        "challenge answer is a replay of an earlier one"
    )
    assert not g.admitted("ble-1")


def test_an_app_id_stays_bound_to_the_identity_it_was_admitted_with(tmp_path: Path) -> None:
    endpoint = "hci0/app-id tank-7"
    reg = ble(BleRequirements(None, "tank-7", "just-works", KEY), endpoint=endpoint)
    g = gate(tmp_path, reg)
    other = "C0:FE:00:00:00:09"
    assert (
        g.admit(
            evidence(
                other, "just-works", answer=answer(identity=other), bound=ADDRESS, endpoint=endpoint
            )
        )
        == f"app id tank-7 is bound to {ADDRESS}, this device is {other}"
    )
    assert (
        g.admit(evidence(ADDRESS, "just-works", answer=answer(), bound=ADDRESS, endpoint=endpoint))
        is None
    )


def test_unknown_devices_are_recorded_once_each_and_capped(tmp_path: Path) -> None:
    g = gate(tmp_path)
    g.unknown("ble", "hci0/AA", "address AA")
    g.unknown("ble", "hci0/AA", "address AA")
    for i in range(UNKNOWN_LIMIT + 10):
        g.unknown("ble", f"hci0/{i}", f"address {i}")
    events = read_events(tmp_path)
    assert len(events) == UNKNOWN_LIMIT + 1
    assert events[-1]["reason"].startswith(f"more than {UNKNOWN_LIMIT} unknown devices")
