"""The audit log end to end, with real parts: `fieldgate run` with simulated Modbus devices,
the hub stand-in (mosquitto behind its TLS front), the gateway's own identity from `pki init`.
Every record reaches the hub as its own stream, in order, across an outage, kill -9s and a full
store, and `fieldgate audit verify` holds it with only the gateway's certificate."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from gateway.audit import files
from gateway.config import Config
from gateway.consumer import AuditConsumer, read_record
from gateway.core import audit
from gateway.events import read_events
from gateway.identity import pki as pki_mod
from gateway.identity.auditkeys import load_verifier
from gateway.testbed.ports import free_ports

from conftest import Proc, edit_config, fieldgate, start_hub, start_simulator, wait_until


def _gateway_id(config: Path) -> str:
    return str(tomllib.loads(config.read_text())["gateway"]["id"])


def _verify(path: Path, pki_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cert = pki_mod.Pki(pki_dir).gateway_cert
    return subprocess.run(
        fieldgate("audit", "verify", str(path), "--cert", str(cert), *extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _hub_items(record: Path) -> files.AuditFile:
    return files.read(record) if record.exists() else files.AuditFile()


def _local_lines(state: Path) -> set[str]:
    from gateway.store import auditdb

    items, _ = auditdb.read_items(state / auditdb.FILE_NAME)
    return {line for _, line in items}


def _all_records_at_hub(record: Path, state: Path) -> bool:
    """Every record the gateway committed is at the hub, line for line."""
    at_hub = {files.line(r) for r in _hub_items(record).records}
    return at_hub >= {line for line in _local_lines(state) if line.startswith('{"record"')}


def _run(config: Path, log: Path, procs: list[Proc]) -> Proc:
    gateway = Proc(fieldgate("run", "--config", str(config)), log)
    procs.append(gateway)
    return gateway


def test_the_audit_stream_reaches_the_hub_under_the_gateways_identity_and_verifies(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 2, "--period", "0.2")
    gateway_id = _gateway_id(config)
    state = tmp_path / "state"
    gateway = _run(config, tmp_path / "gateway.log", procs)
    wait_until(
        lambda: sum(1 for r in _hub_items(record).records if r.kind == "device-admitted") == 2,
        30,
        "both admissions at the hub",
    )
    # The running gateway's status names its chain, what is left to send and the tamper state.
    shown = subprocess.run(
        fieldgate("status", "--config", str(config), "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)["audit"]
    assert doc["chain"] == gateway_id and doc["streaming"] and doc["connected"]
    assert doc["last_seq"] >= 2 and doc["pending"] >= 0 and doc["tamper"]["inputs_tripped"] == []
    assert gateway.stop() == 0, gateway.output()[-2000:]

    hub = _hub_items(record)
    assert {r.chain_id for r in hub.records} == {gateway_id}
    kinds = [r.kind for r in hub.records]
    assert kinds[0] == "gateway-started" and kinds[-1] == "gateway-stopped"
    # Sent on the gateway's own topic, marked as audit: never opened as telemetry.
    topics = {t for t, _, _ in read_record(record) if "fg-stream=audit" in t}
    assert topics and all(t.startswith(f"devices/{gateway_id}/messages/events/") for t in topics)
    # What the hub holds is what the gateway committed, line for line; both verify.
    assert {files.line(r) for r in hub.records} <= _local_lines(state)
    for path in (record, state / "audit.db"):
        checked = _verify(path, pki_dir)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "holds" in checked.stdout
    # The consumer's library check, as a cloud service runs it on arrival.
    verifier = load_verifier(pki_mod.Pki(pki_dir).gateway_cert, certificate=True)
    consumer = AuditConsumer(lambda _: verifier)
    assert [consumer.add(t, b) for t, b, _ in read_record(record)].count(None) == len(
        read_record(record)
    )
    assert consumer.verifiers[gateway_id].verdict().ok
    # Another gateway's certificate does not verify this stream.
    stranger = pki_mod.Pki(pki_dir).device_cert("gw-stranger")
    if not stranger.exists():
        pki_mod.issue(pki_dir, ["gw-stranger"])
    forged = subprocess.run(
        fieldgate("audit", "verify", str(record), "--cert", str(stranger)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert forged.returncode == 1 and "signature" in forged.stdout


def test_every_audit_record_of_an_outage_arrives_after_it_in_order(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    """The hub is down for a minute while tamper signals happen: all arrive after, in order."""
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    hub = procs[-1]
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 1, "--period", "0.5")
    switch = tmp_path / "enclosure"
    switch.write_text("closed\n")
    edit_config(
        config,
        hub={"backoff_min": 0.2, "backoff_max": 1.0},
        audit={
            "tamper_interval": 0.1,
            "tamper_files": [{"name": "enclosure", "path": str(switch), "normal": "closed"}],
        },
    )
    state = tmp_path / "state"
    gateway = _run(config, tmp_path / "gateway.log", procs)
    wait_until(
        lambda: any(r.kind == "device-admitted" for r in _hub_items(record).records),
        30,
        "the admission at the hub",
    )
    assert hub.stop() == 0
    outage_end = time.monotonic() + 60
    flips = 0
    while time.monotonic() < outage_end:
        switch.write_text("open\n" if flips % 2 == 0 else "closed\n")
        flips += 1
        time.sleep(1.0)
    during = [e for e in read_events(state) if e["kind"] == "tamper-input"]
    assert len(during) >= flips - 2  # recorded locally while the hub was away
    start_hub(procs, tmp_path, pki_dir, port=hub_port)

    def arrived() -> bool:
        return _all_records_at_hub(record, state)

    wait_until(arrived, 60, "every committed record at the hub after the outage")
    assert gateway.stop() == 0, gateway.output()[-2000:]
    wait_until(arrived, 30, "the stop's records at the hub")
    received = _hub_items(record).records
    # In order: the hub's arrival order is the chain's order (duplicates aside).
    seqs = [r.seq for r in received]
    assert sorted(set(seqs)) == list(range(max(seqs) + 1))
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == sorted(first_seen)
    tampers = [r for r in received if r.kind == "tamper-input"]
    assert len({r.seq for r in tampers}) == len(
        [e for e in read_events(state) if e["kind"] == "tamper-input"]
    )
    checked = _verify(record, pki_dir)
    assert checked.returncode == 0, checked.stdout


def test_kill_9_under_load_loses_no_committed_audit_record(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    """20 kill -9s while tamper signals arrive ten times a second: every record the hub got is
    in the gateway's log, and the one chain verifies across the restarts."""
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 4, "--period", "0.1")
    switch = tmp_path / "switch"
    switch.write_text("0")
    edit_config(
        config,
        hub={"backoff_min": 0.1, "backoff_max": 0.5},
        audit={
            "head_every": 7,
            "tamper_interval": 0.05,
            "tamper_files": [{"name": "switch", "path": str(switch), "normal": "0"}],
        },
    )
    state = tmp_path / "state"
    for cycle in range(20):
        gateway = _run(config, tmp_path / f"gateway-{cycle}.log", procs)
        gateway.wait_for("gateway boot", 30)
        for n in range(5):
            switch.write_text(str((n + cycle) % 2))
            time.sleep(0.1)
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.popen.wait(10)
    gateway = _run(config, tmp_path / "gateway-last.log", procs)
    gateway.wait_for("gateway boot", 30)
    local = _local_lines(state)

    def delivered() -> bool:
        return _all_records_at_hub(record, state)

    wait_until(delivered, 60, "the backlog of every run at the hub")
    assert gateway.stop() == 0, gateway.output()[-2000:]
    hub_records = _hub_items(record).records
    local = _local_lines(state)
    # No record the hub received (so committed) is missing from the gateway's log.
    assert {files.line(r) for r in hub_records} <= local
    starts = [r for r in hub_records if r.kind == "gateway-started"]
    assert len({r.seq for r in starts}) == 21
    for path in (state / "audit.db", record):
        checked = _verify(path, pki_dir)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_full_store_drops_readings_by_policy_but_the_audit_stream_keeps_every_record(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    hub_port = free_ports(1)  # the hub comes later: readings pile up and are dropped
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 3, "--period", "0.05", "--points", "120"
    )
    edit_config(
        config,
        store={"max_bytes": 64 * 1024, "policy": "drop-oldest"},
        hub={"backoff_min": 0.2, "backoff_max": 0.5},
    )
    state = tmp_path / "state"
    gateway = _run(config, tmp_path / "gateway.log", procs)
    wait_until(
        lambda: len([e for e in read_events(state) if e["kind"] == "envelopes-dropped"]) >= 3,
        60,
        "the store to drop readings by its policy",
    )
    _, record = start_hub(procs, tmp_path, pki_dir, port=hub_port)

    def delivered() -> bool:
        return _all_records_at_hub(record, state)

    wait_until(delivered, 60, "every audit record at the hub")
    assert gateway.stop() == 0, gateway.output()[-2000:]
    wait_until(delivered, 30, "the stop's records at the hub")
    hub = _hub_items(record)
    assert any(r.kind == "envelopes-dropped" for r in hub.records)
    verdict = audit.verify(
        hub.records,
        hub.heads,
        load_verifier(pki_mod.Pki(pki_dir).gateway_cert, certificate=True),
        _gateway_id(config),
    )
    assert verdict.ok and verdict.lost == 0, verdict.message


def test_each_tamper_signal_is_recorded_when_its_cause_happens(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    """A config edit, a replaced store, an enclosure switch on a Modbus coil: each leaves its
    record, and the status method shows the tripped input."""
    from pymodbus.client import ModbusTcpClient

    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 1, "--period", "0.1")
    doc = tomllib.loads(config.read_text())
    port = doc["devices"][0]["modbus"]["port"]
    # The simulated coil 0 follows its signal until written: hold it at "closed" first.
    client = ModbusTcpClient("127.0.0.1", port=port)
    assert client.connect()
    try:
        assert not client.write_coil(0, False, device_id=1).isError()
        state = tmp_path / "state"

        def kinds() -> list[str]:
            return [e["kind"] for e in read_events(state)]

        gateway = _run(config, tmp_path / "gateway-1.log", procs)
        gateway.wait_for("gateway boot", 30)
        assert gateway.stop() == 0
        # 1. The config changed between runs.
        edit_config(config, batching={"max_age": 0.7})
        # 2. The store was replaced (moved aside, a new one made).
        (state / "store.db").rename(tmp_path / "old-store.db")
        for suffix in ("-wal", "-shm"):
            Path(str(state / "store.db") + suffix).unlink(missing_ok=True)
        # 3. The device's coil is a tamper input.
        docs = tomllib.loads(config.read_text())
        docs["devices"][0]["tamper"] = [{"point": "bool_6", "normal": False}]
        from gateway.config import render_toml

        config.write_text(render_toml(docs))
        gateway = _run(config, tmp_path / "gateway-2.log", procs)
        gateway.wait_for("gateway boot", 30)
        assert "tamper-config-changed" in kinds()
        assert "tamper-store-reset" in kinds()
        assert "tamper-input" not in kinds()
        wait_until(
            lambda: any(e["kind"] == "device-admitted" for e in read_events(state)[-5:]),
            30,
            "the device's admission",
        )
        assert not client.write_coil(0, True, device_id=1).isError()  # the enclosure opens
        wait_until(
            lambda: any(
                e["kind"] == "tamper-input" and e.get("state") == "tripped"
                for e in read_events(state)
            ),
            20,
            "the tripped tamper input",
        )
        assert not client.write_coil(0, False, device_id=1).isError()
        wait_until(
            lambda: any(
                e["kind"] == "tamper-input" and e.get("state") == "normal"
                for e in read_events(state)
            ),
            20,
            "the input back to normal",
        )
        assert gateway.stop() == 0, gateway.output()[-2000:]
    finally:
        client.close()
    tripped = [e for e in read_events(state) if e["kind"] == "tamper-input"]
    assert [e["state"] for e in tripped] == ["tripped", "normal"]
    assert tripped[0]["device"] == "plc-1" and tripped[0]["input"] == "bool_6"


def test_a_change_to_fieldgates_installed_files_is_a_tamper_signal_naming_the_file(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    """A scratch install (a copy of the package), run, edited, run again."""
    import shutil
    import sys

    import adapters
    import gateway as gateway_pkg

    site = tmp_path / "site"
    for package in (gateway_pkg, adapters):
        source = Path(package.__file__).parent
        shutil.copytree(source, site / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 1)
    state = tmp_path / "state"
    argv = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(site)!r}); from gateway.cli import main; "
        "sys.exit(main())",
        "run",
        "--config",
        str(config),
    ]
    for n in range(2):
        if n == 1:
            with open(site / "gateway" / "events.py", "a") as f:
                f.write("\n# changed by somebody with a shell on the box\n")
        run = Proc(argv, tmp_path / f"scratch-{n}.log")
        procs.append(run)
        run.wait_for("gateway boot", 30)
        assert run.stop() == 0, run.output()[-2000:]
    changed = [e for e in read_events(state) if e["kind"] == "tamper-code-changed"]
    assert len(changed) == 1
    assert changed[0]["changed"] == ["gateway/events.py"] and changed[0]["added"] == []
    started = [e for e in read_events(state) if e["kind"] == "gateway-started"]
    assert started[0]["code_digest"] != started[1]["code_digest"]


def _offline_config(state: Path, cert: Path) -> Config:
    """A one-device config for the audit room in-process (its files are not opened)."""
    from gateway.config import validate

    device = {
        "id": "plc-1",
        "cert": str(cert),
        "key": __file__,
        "modbus": {"host": "127.0.0.1", "port": 5020},
        "identity": "none",
        "points": [{"name": "t", "address": 0}],
    }
    doc = {
        "hub": {"hostname": "localhost", "ca_file": __file__},
        "sealing": {"keyring": __file__, "key_id": "k1"},
        "gateway": {"state_dir": str(state)},
        "devices": [device],
    }
    return validate(doc, "test", check_files=False)


def test_a_clock_step_is_a_tamper_signal_and_shows_in_status(tmp_path: Path) -> None:
    """The watcher with a fake wall clock stepped by a minute (the monotonic one is real)."""
    from gateway.audit.room import AuditRoom
    from gateway.events import SecurityEvents

    offset = [0.0]
    cfg = _offline_config(tmp_path, Path(__file__))
    events = SecurityEvents(tmp_path)
    room = AuditRoom(cfg, events, wall=lambda: time.time() + offset[0])

    async def go() -> None:
        watcher = asyncio.create_task(room.watch())
        await asyncio.sleep(1.5)
        offset[0] = 60.0  # somebody sets the clock a minute ahead
        await asyncio.sleep(2.5)
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher

    asyncio.run(go())
    events.close()
    jumps = [e for e in read_events(tmp_path) if e["kind"] == "tamper-clock-jump"]
    assert len(jumps) == 1 and 59 < jumps[0]["jump"] < 61
    assert "tamper-clock-jump" in room.status()["tamper"]["signals"]


def test_a_replaced_certificate_is_recorded_at_the_next_start(tmp_path: Path) -> None:
    from gateway.audit.room import AuditRoom
    from gateway.events import SecurityEvents

    cert = tmp_path / "plc-1.pem"
    cert.write_text("first certificate\n")
    cfg = _offline_config(tmp_path, cert)
    for text in ("first certificate\n", "first certificate\n", "renewed certificate\n"):
        cert.write_text(text)
        events = SecurityEvents(tmp_path)
        AuditRoom(cfg, events).started("boot", None)
        events.close()
    changed = [e for e in read_events(tmp_path) if e["kind"] == "certificate-changed"]
    assert [(e["device"], e["identity"]) for e in changed] == [("plc-1", "plc-1")]
    assert changed[0]["old"] != changed[0]["new"]


def test_a_config_applied_by_a_reload_is_the_next_starts_baseline_not_tamper(
    tmp_path: Path,
) -> None:
    from gateway.audit.room import AuditRoom
    from gateway.events import SecurityEvents

    first = _offline_config(tmp_path, Path(__file__))
    reloaded = first.model_copy(
        update={"batching": first.batching.model_copy(update={"max_age": 3.0})}
    )
    events = SecurityEvents(tmp_path)
    room = AuditRoom(first, events)
    room.started("boot", None)
    room.reconfigured(reloaded)  # what a staged reload tells the room
    events.close()
    events = SecurityEvents(tmp_path)
    AuditRoom(reloaded, events).started("boot", None)  # restarted with the reloaded file
    AuditRoom(first, events).started("boot", None)  # and with the old one: that is a change
    events.close()
    changed = [e for e in read_events(tmp_path) if e["kind"] == "tamper-config-changed"]
    assert len(changed) == 1
