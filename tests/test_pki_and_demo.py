"""The development PKI, and the demo a new user runs first."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.consumer import Opened, SequenceTracker
from gateway.core.readings import CODEC, Header
from gateway.events import read_events
from gateway.testbed.demo import Admissions, hub_missing

from conftest import fieldgate


def test_pki_init_and_issue_make_encrypted_keys_and_verifiable_chains(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    env = {**os.environ, "FIELDGATE_KEY_PASSPHRASE": "correct horse battery"}
    assert (
        subprocess.run(
            fieldgate("pki", "init", "--dir", str(root)), env=env, capture_output=True, timeout=60
        ).returncode
        == 0
    )
    done = subprocess.run(
        fieldgate("pki", "issue", "--dir", str(root), "boiler-7", "pump-2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert not (root / "passphrase").exists()  # the environment variable was used

    for key in root.rglob("*.key"):
        assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----"), key
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key

    chain = x509.load_pem_x509_certificates((root / "devices" / "boiler-7.pem").read_bytes())
    leaf, intermediate = chain
    rootcert = x509.load_pem_x509_certificate((root / "root.pem").read_bytes())
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "boiler-7"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(rootcert)

    again = subprocess.run(
        fieldgate("pki", "init", "--dir", str(root)),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "refusing to replace" in again.stderr

    bad = subprocess.run(
        fieldgate("pki", "issue", "--dir", str(root), "bad/id"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "not a valid device id" in bad.stderr


@pytest.mark.slow
def test_demo_shows_the_devices_and_ctrl_c_leaves_nothing_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    output = _demo_until_ctrl_c(
        state, tmp_path / "demo.out", records=12, events=("device-quarantined", "device-unknown")
    )
    for device in ("plc-1", "plc-2", "plc-3"):
        assert device in output
    # Security, not only delivery: how each device was admitted, one quarantined and why, one
    # unknown advertiser, and the hub's own refusals named as such.
    # The demo enrolls its Modbus devices (fieldgate enroll --yes): each is verified by FC 43.
    assert "enrolled the Modbus devices' FC 43 fingerprints" in output
    assert "FC 43 enrolled (127.0.0.1:" in output
    assert "bond authenticated + challenge passed" in output
    assert "quarantined: ble-3: challenge answer does not match the device key" in output
    assert "unknown device at hci0/" in output
    assert "refused at hub" in output
    assert "gateway exit code 0" in output
    opened = _open_summary(state)
    assert opened.returncode == 0, opened.stderr
    assert " 0 refused" in opened.stderr and " 0 gaps" in opened.stderr
    gateway_log = (state / "logs" / "gateway.log").read_text()
    assert re.search(r"readings: (\d+) read, \1 delivered, 0 dropped", gateway_log)
    # Nothing the demo started survives it: no process of its state folder, and nothing
    # listens any more on the port its broker had (other brokers on this machine, of other
    # tests or users, are none of this test's business).
    assert _pids("-f", str(state)) == set()
    broker_log = (state / "logs" / "mosquitto.log").read_text()
    ports = set(re.findall(r"New connection from \S+ on port (\d+)\.", broker_log))
    assert ports
    for port in ports:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", int(port))) != 0, f"port {port} still served"


@pytest.mark.slow
def test_demo_ctrl_c_the_hub_gets_every_delivered_reading_run_after_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for run, records in enumerate((12, 0)):
        # The second run is stopped as soon as the hub opened anything of its own.
        _demo_until_ctrl_c(state, tmp_path / f"demo-{run}.out", records=records)
        delivered = re.findall(
            r"readings: (\d+) read, (\d+) delivered, 0 dropped",
            (state / "logs" / "gateway.log").read_text(),
        )
        assert len(delivered) == run + 1
        opened = _open_summary(state)
        assert opened.returncode == 0, opened.stderr
        # Everything the gateway delivered, in this run and the ones before, is in the record.
        total = re.search(r"(\d+) readings, (\d+) duplicates dropped, (\d+) gaps", opened.stderr)
        assert total, opened.stderr
        assert int(total[1]) == sum(int(d) for _, d in delivered), (delivered, opened.stderr)
        assert total[3] == "0", opened.stderr


def _demo_until_ctrl_c(
    state: Path, log: Path, *, records: int, events: tuple[str, ...] = ()
) -> str:
    """Run the demo until the hub's record grew by ``records`` lines (or, with 0, until the
    gateway of this run delivered something) and the gateway recorded security events of each
    kind in ``events``; Ctrl-C it, return what it printed."""

    def seen_events() -> bool:
        seen = {e["kind"] for e in read_events(state / "gateway")}
        return all(kind in seen for kind in events)

    record = state / "hub-record.jsonl"
    before = len(record.read_bytes().splitlines()) if record.exists() else 0
    with open(log, "wb") as out:
        # A session of its own, like a terminal: Ctrl-C reaches the whole process group.
        demo = subprocess.Popen(
            fieldgate("demo", "--state", str(state), "--devices", "3"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "160"},
        )
        try:
            # The live table reaches a pipe only at the end; the hub's record shows progress.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                not record.exists()
                or len(record.read_bytes().splitlines()) < before + max(records, 1)
                or not seen_events()
            ):
                time.sleep(0.2)
            os.killpg(demo.pid, signal.SIGINT)
            code = demo.wait(60)
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    return output


def _open_summary(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fieldgate(
            "open", str(state / "hub-record.jsonl"), "--pki", str(state / "pki"), "--summary"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _pids(*pattern: str) -> set[str]:
    found = subprocess.run(["pgrep", *pattern], capture_output=True, text=True)
    return set(found.stdout.split())


@pytest.mark.slow
def test_demo_without_ble_says_that_no_quarantine_is_shown(tmp_path: Path) -> None:
    done = subprocess.run(
        fieldgate(
            "demo",
            "--state",
            str(tmp_path / "state"),
            "--devices",
            "1",
            "--ble",
            "0",
            "--duration",
            "2",
        ),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "No quarantined device is shown" in done.stdout
    assert "FC 43 enrolled (127.0.0.1:" in done.stdout


def test_the_demo_names_how_each_device_was_admitted_from_this_runs_events(
    tmp_path: Path,
) -> None:
    from gateway.events import SecurityEvents

    events = SecurityEvents(tmp_path)
    events.record("device-quarantined", "plc-1", "an earlier run")
    admissions = Admissions(events.path)
    now = [
        {
            "kind": "device-admitted",
            "device": "plc-1",
            "transport": "modbus-tcp",
            "endpoint": "127.0.0.1:502/unit 1",
        },
        {
            "kind": "device-admitted",
            "device": "plc-2",
            "transport": "modbus-tcp",
            "endpoint": "127.0.0.1:503/unit 1",
            "verified": "yes",
            "identity_source": "fc43",
        },
        {
            "kind": "device-admitted",
            "device": "plc-3",
            "transport": "modbus-tcp",
            "endpoint": "127.0.0.1:504/unit 1",
            "verified": "no",
        },
        {
            "kind": "device-admitted",
            "device": "ble-1",
            "transport": "ble",
            "identity": "C0:FE:00:00:00:00",
            "bond": "authenticated",
            "challenge": "passed",
        },
        {"kind": "device-admitted", "device": "ble-2", "transport": "ble", "bond": "just-works"},
        {
            "kind": "device-quarantined",
            "device": "ble-3",
            "transport": "ble",
            "reason": "challenge answer does not match the device key",
        },
        {
            "kind": "device-unknown",
            "device": None,
            "transport": "ble",
            "endpoint": "hci0/C0:FE:00:00:00:03",
            "reason": "not in the registry: address C0",
        },
    ]

    def record(event: dict[str, object]) -> None:
        fields = {k: v for k, v in event.items() if k not in ("kind", "device", "reason")}
        reason = str(event.get("reason", "-"))
        events.record(str(event["kind"]), event["device"], reason, **fields)  # type: ignore[arg-type]

    for event in now[:5]:
        record(event)
    admissions.poll()
    for event in now[5:]:
        record(event)
    admissions.poll()
    events.close()
    assert admissions.devices == {
        "plc-1": "registry binding (127.0.0.1:502/unit 1)",
        "plc-2": "FC 43 enrolled (127.0.0.1:503/unit 1)",
        "plc-3": "UNVERIFIED: identity none (127.0.0.1:504/unit 1)",
        "ble-1": "bond authenticated + challenge passed",
        "ble-2": "bond just-works + no challenge",
        "ble-3": "QUARANTINED: challenge answer does not match the device key",
    }
    assert admissions.quarantined == {"ble-3": "challenge answer does not match the device key"}
    assert admissions.unknown == {"hci0/C0:FE:00:00:00:03": "not in the registry: address C0"}


def test_the_hub_is_caught_up_only_when_every_accepted_reading_of_the_boot_was_opened() -> None:
    tracker = SequenceTracker()
    for first, count in ((0, 10), (20, 10)):  # 10..19 still on its way
        header = Header(1, "k1", "b1", first, count, CODEC)
        tracker.add(Opened("plc-1", header, [], 0.0))
    assert hub_missing({"plc-1": 30, "plc-2": 5}, "b1", tracker) == 10 + 5
    # Readings the store's policy dropped will never come: they are not waited for.
    assert hub_missing({"plc-1": 30, "plc-2": 5}, "b1", tracker, {"plc-1": 10}) == 5
    assert hub_missing({"plc-1": 30}, "another boot", tracker) == 30
    tracker.add(Opened("plc-1", Header(1, "k1", "b1", 10, 10, CODEC), [], 0.0))
    assert hub_missing({"plc-1": 30}, "b1", tracker) == 0
    assert hub_missing({"plc-1": 25}, "b1", tracker) == 0  # more arrived than was read back
