"""`fieldgate status` asks the running gateway over its state folder's status.sock, and
`fieldgate run --log-format json` writes one JSON object per line; both against a real run
with a quarantined device (an identity mismatch) and a down one."""

from __future__ import annotations

import json
import stat
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.enroll import registry_path
from gateway.events import read_events
from gateway.identity.keyring import Keyring
from gateway.ops.status import table
from gateway.testbed.ports import free_ports

from conftest import (
    Proc,
    add_modbus_device,
    edit_config,
    fieldgate,
    opened_from,
    start_hub,
    start_simulator,
    wait_until,
)


def status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fieldgate("status", "--config", str(config), *extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


def document(config: Path) -> dict[str, Any]:
    run = status(config, "--json")
    assert run.returncode == 0, run.stderr
    doc: dict[str, Any] = json.loads(run.stdout)
    return doc


def by_device(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["device"]: d for d in doc["devices"]}


def test_status_shows_a_quarantined_and_a_down_device_and_logs_are_json_lines(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 2, "--identity", "fc43", "--period", "0.2"
    )
    enrolled = subprocess.run(
        fieldgate("enroll", "--config", str(config), "--yes"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    # plc-2's pinned serial is not the one the device tells: an identity mismatch.
    registry = json.loads(registry_path(config).read_text())
    pinned = registry["devices"]["plc-2"]["fingerprint"]
    name = next(iter(pinned))
    pinned[name] = "not-" + pinned[name]
    registry_path(config).write_text(json.dumps(registry))
    points = tomllib.loads(config.read_text())["devices"][0]["points"]
    add_modbus_device(config, pki_dir, "plc-3", free_ports(1), points, timeout=0.3)

    # No gateway yet: a clear message, exit 1.
    before = status(config)
    assert before.returncode == 1
    assert "no gateway runs for this config" in before.stderr
    assert str(tmp_path / "state" / "status.sock") in before.stderr

    gateway = Proc(
        fieldgate("run", "--config", str(config), "--log-format", "json"),
        tmp_path / "gateway.log",
    )
    procs.append(gateway)
    state = tmp_path / "state"
    wait_until(
        lambda: any(e["kind"] == "device-quarantined" for e in read_events(state)),
        20,
        "plc-2 quarantined",
    )
    wait_until(lambda: bool(opened_from(record, keyring)[0]), 20, "plc-1's readings")

    def settled() -> bool:
        devices = by_device(document(config))
        return devices["plc-1"]["state"] == "up" and devices["plc-3"]["state"] == "down"

    wait_until(settled, 20, "plc-1 up and plc-3 down")
    sock = state / "status.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    doc = document(config)
    devices = by_device(doc)
    assert set(devices) == {"plc-1", "plc-2", "plc-3"}
    assert devices["plc-1"]["identity"] == {"state": "admitted", "verified": True}
    assert devices["plc-1"]["uplink"]["connected"] is True
    assert devices["plc-1"]["reads_ok"] > 0
    assert time.time() - 30 < devices["plc-1"]["last_read"] <= time.time()
    assert devices["plc-1"]["uplink"]["disconnects"] == {}
    quarantined = devices["plc-2"]
    assert quarantined["state"] == "quarantined"
    assert quarantined["identity"]["state"] == "quarantined"
    assert quarantined["identity"]["reason"].startswith(f"identity mismatch: {name} expected")
    down = devices["plc-3"]
    assert down["reads_ok"] == 0 and down["last_error"] and down["last_read"] is None
    assert doc["sessions"] == {"total": 3, "connected": 3}
    assert doc["store"]["kind"] == "sqlite" and doc["store"]["disk_full"] is False
    assert doc["boot_id"] and doc["stopping"] is False
    assert {link["link"] for link in doc["links"]} == {"plc-1", "plc-2", "plc-3"}

    shown = status(config)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("DEVICE ")))
    device_rows = lines[first + 1 : lines.index("", first)]
    rows = {line.split()[0]: line for line in device_rows}
    assert rows["plc-1"].split()[1] == "up"
    assert rows["plc-2"].split()[1] == "quarantined"
    assert "identity mismatch" in rows["plc-2"]
    assert rows["plc-3"].split()[1] == "down"
    assert "sessions: 3 of 3 connected" in shown.stdout

    assert gateway.stop() == 0, gateway.output()[-2000:]
    assert not sock.exists()
    after = status(config)
    assert after.returncode == 1 and "no gateway runs for this config" in after.stderr

    # Every line the gateway wrote is one JSON object; security events carry kind and device.
    lines = [json.loads(line) for line in gateway.output().splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    events = [line for line in lines if line["logger"] == "fieldgate.security"]
    # A gateway-level event (gateway-started, config-loaded) has no device field.
    assert {(e["kind"], e.get("device")) for e in events} >= {
        ("device-admitted", "plc-1"),
        ("device-quarantined", "plc-2"),
    }
    [mismatch] = [e for e in events if e["kind"] == "device-quarantined"]
    assert mismatch["level"] == "warning" and "identity mismatch" in mismatch["msg"]
    assert lines[-1]["msg"].startswith("readings: ")


def test_the_table_names_what_is_wrong() -> None:
    doc: dict[str, Any] = {
        "boot_id": "b1",
        "pid": 7,
        "config_hash": None,
        "stopping": False,
        "ready": {"ready": False, "reasons": ["uplink: 1 of 1 sessions not connected (a)"]},
        "devices": [
            {
                "device": "a",
                "state": "down",
                "since": 0,
                "last_error": "timed out",
                "reads_ok": 1,
                "reads_failed": 9,
                "malformed": 0,
                "identity": {"state": "admitted", "verified": False},
                "store": {"queued": 3, "leased": 1, "bytes": 10, "oldest_age_s": 4.0},
                "uplink": {"connected": False, "connects": 1, "readings_acked": 0},
            }
        ],
        "links": [{"link": "bus", "devices": ["a"], "backed_off": ["a"], "connect_attempt": 2}],
        "sessions": {"total": 1, "connected": 0},
        "store": {
            "kind": "sqlite",
            "envelopes": 4,
            "bytes": 10,
            "max_bytes": 100,
            "policy": "drop-oldest",
            "disk_full": True,
            "dropped_readings": 5,
        },
        "audit": {
            "chain": "gw-1",
            "last_seq": 41,
            "streaming": True,
            "lost": 0,
            "pending": 2,
            "oldest_age_s": 1.5,
            "tamper": {"signals": {"tamper-input": {}}, "inputs_tripped": ["a.door"]},
        },
    }
    text = table(doc)
    assert "ready: no (uplink: 1 of 1 sessions not connected (a))" in text
    assert "DISK FULL, 5 readings dropped" in text
    assert (
        "audit: chain gw-1 at seq 41; 2 items to send, oldest 1.5 s; TAMPER INPUTS: a.door; "
        "tamper signals: tamper-input" in text
    )
    row = next(line for line in text.splitlines() if line.startswith("a "))
    assert row.split()[:2] == ["a", "down"]
    assert "admitted (unverified)" in row and "1/9" in row and "timed out" in row
    assert any(line.split()[:4] == ["bus", "1", "a", "2"] for line in text.splitlines())


@pytest.mark.slow
def test_status_gathers_the_workers_of_a_gateway_run_with_workers(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 2, "--period", "0.2")
    gateway = Proc(
        fieldgate("run", "--config", str(config), "--workers", "2"), tmp_path / "gateway.log"
    )
    procs.append(gateway)

    def both() -> bool:
        run = status(config, "--json")
        return run.returncode == 0 and len(json.loads(run.stdout).get("workers", [])) == 2

    wait_until(both, 30, "both workers to answer")
    workers = json.loads(status(config, "--json").stdout)["workers"]
    assert sorted(d["device"] for w in workers for d in w["devices"]) == ["plc-1", "plc-2"]
    assert len({w["pid"] for w in workers}) == 2
    shown = status(config)
    assert shown.returncode == 0 and "worker 0\n" in shown.stdout and "worker 1\n" in shown.stdout
    assert gateway.stop() == 0, gateway.output()[-2000:]
    assert status(config).returncode == 1


def test_a_state_folder_too_deep_for_a_unix_socket_runs_without_status(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 1, "--period", "0.5")
    deep = tmp_path / ("d" * 110) / "state"  # a unix socket's path holds 107 bytes
    edit_config(config, gateway={"state_dir": str(deep)})
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    gateway.wait_for("status socket .* `fieldgate status` cannot reach this gateway")
    gateway.wait_for("plc-1: connected to localhost")
    run = status(config)
    assert run.returncode == 1 and "no gateway runs for this config" in run.stderr
    assert gateway.stop() == 0, gateway.output()[-2000:]
