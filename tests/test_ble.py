"""BLE with real parts: bleak's own BlueZ backend in `fieldgate run`, against the simulated
bluetoothd of `fieldgate simulate ble` on a private D-Bus, through mosquitto to the hub."""

from __future__ import annotations

import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.ble.sim.fleet import MEASUREMENT_DECODER, measurement_raw
from gateway.config import render_toml
from gateway.consumer import Opened
from gateway.events import read_events
from gateway.identity.keyring import Keyring

from conftest import (
    Proc,
    ble_sim,
    edit_config,
    fieldgate,
    opened_from,
    start_ble_simulator,
    start_hub,
    wait_until,
)

pytestmark = pytest.mark.slow

IDENTITY = "C0:FE:00:00:00:{:02X}"  # the simulator's identity address of peripheral index i


def by_seq(opened: list[Opened]) -> dict[str, dict[int, Any]]:
    """device -> seq -> reading."""
    out: dict[str, dict[int, Any]] = defaultdict(dict)
    for o in opened:
        for r in o.readings:
            out[r.device_id][r.seq] = r
    return out


def counters(record: Path, keyring: Keyring) -> dict[str, list[int]]:
    opened, _, _ = opened_from(record, keyring)
    out: dict[str, list[int]] = defaultdict(list)
    for o in opened:
        for r in o.readings:
            if r.point == "counter":
                out[r.device_id].append(r.value)
    return out


def start_gateway(procs: list[Proc], tmp: Path, config: Path) -> Proc:
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp / "gateway.log")
    procs.append(gateway)
    return gateway


def test_ble_devices_arrive_under_their_own_identity_with_true_values_through_link_loss(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _, bus = start_ble_simulator(
        procs,
        tmp_path,
        pki_dir,
        hub_port,
        3,
        "--rate",
        "5",
        "--rpa",
        "1",
        "--poll-period",
        "1",
        "--set",
        "ble-3:connect-aborts=2",
    )
    gateway = start_gateway(procs, tmp_path, config)

    wait_until(
        lambda: (
            (c := counters(record, keyring)) and all(len(c[f"ble-{i}"]) >= 10 for i in (1, 2, 3))
        ),
        40,
        "every BLE device to deliver 10 notifications",
    )
    before = max(counters(record, keyring)["ble-2"])
    ble_sim(bus, "drop_link", "ble-2")
    wait_until(
        lambda: max(counters(record, keyring)["ble-2"]) > before + 10,
        30,
        "ble-2 to reconnect and deliver again",
    )
    stats: Any = ble_sim(bus, "stats")
    assert gateway.stop() == 0, gateway.output()[-3000:]

    # Link loss cost a reconnect, no data; bleak retried the aborted connects by itself.
    assert stats["devices"]["ble-2"]["connects"] == 2
    assert stats["adapter"]["aborts"] == 2
    assert stats["adapter"]["connect_in_progress"] == 0
    assert "ble-2: unavailable: link lost" in gateway.output()
    assert "ble-2: recovered" in gateway.output()

    opened, errors, tracker = opened_from(record, keyring)
    assert errors == []
    assert tracker.gaps() == {}
    # Each device's envelopes were published on its own identity (the hub refuses any other).
    assert {o.device_id for o in opened} == {"ble-1", "ble-2", "ble-3"}
    readings = by_seq(opened)
    for index in range(3):
        device = f"ble-{index + 1}"
        seen = 0
        for seq, r in readings[device].items():
            if r.point != "counter":
                continue
            # A scan's values have consecutive seqs: counter, temperature, humidity, battery.
            expected = MEASUREMENT_DECODER.decode(
                MEASUREMENT_DECODER.encode(measurement_raw(index, r.value))
            )
            got = [readings[device][seq + k].value for k in range(4)]
            assert got == expected, (device, seq)
            seen += 1
        assert seen >= 10
        polled = [r for r in readings[device].values() if r.point == "supply"]
        assert polled, f"{device}: the status characteristic was never polled"
        values = counters(record, keyring)[device]
        assert values == sorted(values)

    # The private-address device was found by its app id, bonded (authenticated, through
    # fieldgate's agent), and admitted under its identity address after a passed challenge.
    admitted = {
        e["device"]: e for e in read_events(tmp_path / "state") if e["kind"] == "device-admitted"
    }
    assert admitted["ble-1"]["identity"] == IDENTITY.format(0)
    assert admitted["ble-1"]["endpoint"] == "hci0/app-id ble-1"
    assert all(admitted[d]["bond"] == "authenticated" for d in ("ble-1", "ble-2", "ble-3"))
    assert all(admitted[d]["challenge"] == "passed" for d in ("ble-1", "ble-2", "ble-3"))
    bonds = orjson.loads((tmp_path / "state" / "ble-bonds.json").read_bytes())
    assert bonds[IDENTITY.format(0)]["app_id"] == "ble-1"


def test_ble_devices_that_fail_admission_forward_nothing_and_leave_security_events(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _, bus = start_ble_simulator(
        procs,
        tmp_path,
        pki_dir,
        hub_port,
        5,
        "--unknown",
        "1",
        "--rate",
        "5",
        "--set",
        "ble-2:bond=none",  # cannot bond at all; the config requires an authenticated bond
        "--set",
        "ble-3:bond=just-works",  # bonds, but without MITM protection
        "--set",
        "ble-4:hmac=wrong",  # answers the challenge with the wrong key
    )
    edit_config(config, ble={"scan_window": 4.0})  # long enough to hear the unknown one
    gateway = start_gateway(procs, tmp_path, config)
    state = tmp_path / "state"

    def refused() -> dict[str, str]:
        return {
            e["device"]: e["reason"]
            for e in read_events(state)
            if e["kind"] == "device-quarantined"
        }

    wait_until(
        lambda: (
            {"ble-2", "ble-3", "ble-4"} <= set(refused())
            and any(e["kind"] == "device-unknown" for e in read_events(state))
            and len(counters(record, keyring)["ble-5"]) >= 5
        ),
        40,
        "three refusals, one unknown device, and ble-5 delivering",
    )
    # ble-5 passed its challenge; now it answers every nonce with that earlier answer.
    ble_sim(bus, "set", "ble-5", "hmac", "replay")
    ble_sim(bus, "drop_link", "ble-5")
    wait_until(lambda: "ble-5" in refused(), 20, "the replayed answer to be refused")
    stats: Any = ble_sim(bus, "stats")
    wait_until(lambda: gateway.output().count("quarantined") >= 4, 5, "the log")
    assert gateway.stop() == 0, gateway.output()[-3000:]

    reasons = refused()
    assert reasons["ble-2"].startswith("pairing failed: org.bluez.Error.AuthenticationFailed")
    assert reasons["ble-3"] == "bond is just-works, the config requires authenticated"
    assert reasons["ble-4"] == "challenge answer does not match the device key"
    assert reasons["ble-5"] == "challenge answer is a replay of an earlier one"
    events = read_events(state)
    unknown = [e for e in events if e["kind"] == "device-unknown"]
    assert len(unknown) == 1
    assert unknown[0]["endpoint"] == f"hci0/{IDENTITY.format(5)}"
    # A refused device is held off, not retried in a loop.
    assert stats["devices"]["ble-4"]["connects"] == 1
    replay_at = next(
        e["ts"] for e in events if e["device"] == "ble-5" and e["kind"] == "device-quarantined"
    )

    opened, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.gaps() == {}
    sent = {o.device_id for o in opened}
    assert sent == {"ble-1", "ble-5"}
    late = [
        r
        for o in opened
        if o.device_id == "ble-5"
        for r in o.readings
        if r.ts_ms > replay_at * 1000
    ]
    assert late == []


def test_malformed_notifications_are_counted_and_dropped_and_the_link_stays_up(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _, bus = start_ble_simulator(procs, tmp_path, pki_dir, hub_port, 1, "--rate", "10")
    gateway = start_gateway(procs, tmp_path, config)
    wait_until(lambda: len(counters(record, keyring)["ble-1"]) >= 10, 30, "notifications")

    ble_sim(bus, "set", "ble-1", "notify", "garbage")
    wait_until(lambda: "malformed value (1 so far)" in gateway.output(), 10, "a malformed value")
    ble_sim(bus, "set", "ble-1", "notify", "short")
    garbage_counter = ble_sim(bus, "stats")["devices"]["ble-1"]["counter"]  # type: ignore[index]
    ble_sim(bus, "set", "ble-1", "notify", "good")
    wait_until(
        lambda: max(counters(record, keyring)["ble-1"]) > garbage_counter + 10,
        20,
        "good notifications again",
    )
    stats: Any = ble_sim(bus, "stats")
    assert gateway.stop() == 0, gateway.output()[-3000:]

    device = stats["devices"]["ble-1"]
    assert (device["connects"], device["disconnects"]) == (1, 0), "the link must stay up"
    assert "unavailable" not in gateway.output()
    opened, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.gaps() == {}
    values = counters(record, keyring)["ble-1"]
    assert values == sorted(values)
    missing = set(range(values[0], values[-1] + 1)) - set(values)
    assert missing, "the malformed notifications were dropped"
    assert all(
        r.point in {"counter", "temperature", "humidity", "battery", "supply", "uptime"}
        for o in opened
        for r in o.readings
    )


def test_poll_devices_rotate_through_the_slot_limit_while_notifying_devices_keep_theirs(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _, bus = start_ble_simulator(
        procs,
        tmp_path,
        pki_dir,
        hub_port,
        4,
        "--slots",
        "2",
        "--bond",
        "just-works",
        "--no-challenge",
        "--poll-period",
        "0.5",
    )
    doc = tomllib.loads(config.read_text())
    for device in doc["devices"][1:]:  # ble-2..4 only poll: they give their slot back
        chars = device["ble"]["characteristics"]
        device["ble"]["characteristics"] = [c for c in chars if c["mode"] == "poll"]
    config.write_text(render_toml(doc))
    gateway = start_gateway(procs, tmp_path, config)

    def supplies() -> dict[str, int]:
        opened, _, _ = opened_from(record, keyring)
        out: dict[str, int] = defaultdict(int)
        for o in opened:
            out[o.device_id] += sum(r.point == "supply" for r in o.readings)
        return out

    wait_until(
        lambda: (
            all(supplies()[f"ble-{i}"] >= 4 for i in (2, 3, 4))
            and len(counters(record, keyring)["ble-1"]) >= 10
        ),
        40,
        "every polled device to be read 4 times while ble-1 notifies",
    )
    stats: Any = ble_sim(bus, "stats")
    assert gateway.stop() == 0, gateway.output()[-3000:]

    adapter = stats["adapter"]
    assert adapter["max_connected"] <= 2
    assert adapter["slot_refusals"] == 0
    assert adapter["connect_in_progress"] == 0
    assert stats["devices"]["ble-1"]["connects"] == 1
    assert all(stats["devices"][f"ble-{i}"]["connects"] >= 4 for i in (2, 3, 4))
    _, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.gaps() == {}


def test_a_ble_link_reads_named_values_on_request_and_refuses_writes(
    tmp_path: Path, pki_dir: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """read() and write() of a BLE link in this process, against the simulated bluetoothd."""
    import asyncio

    from adapters.base import DeviceHealth, NotWritable
    from adapters.ble.adapter import BleAdapter
    from gateway.config import load
    from gateway.core.errors import DeviceUnavailable
    from gateway.core.readings import GOOD, Scan

    config_path, _, bus = start_ble_simulator(
        procs, tmp_path, pki_dir, 1, 1, "--rate", "5", "--poll-period", "1"
    )
    config = load(config_path, check_files=False)
    assert config.ble.dbus_address == bus
    # The adapter points bleak at the simulator's bus through the environment: undone after.
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus)
    devices = {d.id: d.ble for d in config.devices if d.ble is not None}

    async def scenario() -> tuple[Scan, str, str]:
        first = asyncio.Event()

        def sink(_scan: Scan) -> None:
            first.set()

        adapter = BleAdapter(
            "hci0",
            config.ble,
            devices,
            sink=sink,
            admit=lambda _e: None,
            unknown=lambda *_a: None,
            health={d: DeviceHealth(d) for d in devices},
            state_dir=tmp_path / "in-process-state",
        )
        link = adapter.links[0]
        with pytest.raises(DeviceUnavailable, match="not connected"):
            await link.read([])
        task = asyncio.create_task(adapter.run(), name="ble[hci0]")
        try:
            await asyncio.wait_for(first.wait(), 30)
            names = list(devices[link.device_id].characteristics[0].values)
            wanted = [names[0].name, names[-1].name]
            scan = await asyncio.wait_for(link.read(wanted), 10)
            with pytest.raises(NotWritable) as refused:
                await link.write(wanted[0], 1)
            with pytest.raises(KeyError) as unknown:
                await link.read(["nonesuch"])
        finally:
            task.cancel("the test is over")
            with pytest.raises(asyncio.CancelledError):
                await task
        return scan, str(refused.value), str(unknown.value)

    scan, refused, unknown = asyncio.run(scenario())
    assert scan.quality == GOOD and len(scan.names) == 2
    assert all(v is not None for v in scan.values)
    assert "not writable: the decode table marks no writable characteristic" in refused
    assert "nonesuch" in unknown
