"""The store in the real gateway: kill -9, hub outages, and what sits on disk."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import apsw
import pytest

from adapters.modbus.sim.devices import held_value, make_points
from gateway.identity.keyring import Keyring

from conftest import (
    Proc,
    edit_config,
    fieldgate,
    opened_from,
    start_hub,
    start_simulator,
    store_report,
    wait_until,
)

DEVICES = 4


def accepted(state: Path) -> dict[str, int]:
    devices: Any = store_report(state)["devices"]
    return {d: row.get("next_seq", 0) for d, row in devices.items()}


def stored_envelopes(state: Path) -> int:
    """Envelopes in the store (0 before the gateway created it); read while it runs."""
    from gateway.store.sqlite import StoreNotReady

    if not (state / "store.db").exists():
        return 0
    try:
        report: Any = store_report(state)
    except StoreNotReady:  # the file is made, its schema not yet
        return 0
    return int(report["envelopes"])


def arrived(record: Path, keyring: Keyring, promised: dict[str, int]) -> bool:
    """The hub holds at least every reading of ``promised`` (readings accepted per device)."""
    got = delivered(record, keyring)
    return all(got.get(d, 0) >= n for d, n in promised.items())


def delivered(record: Path, keyring: Keyring) -> dict[str, int]:
    _, _, tracker = opened_from(record, keyring)
    out: dict[str, int] = defaultdict(int)
    for (device, _boot), stream in tracker.streams.items():
        out[device] += stream.count()
    return dict(out)


@pytest.mark.slow
def test_kill_9_twenty_times_under_load_loses_no_accepted_reading(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, DEVICES, "--period", "0.1", "--max-age", "0.3"
    )
    state = tmp_path / "state"
    rng = random.Random(23)
    for attempt in range(20):
        gateway = Proc(
            fieldgate("run", "--config", str(config)), tmp_path / f"gateway-{attempt}.log"
        )
        # A kill at a random moment under load, not a wait for a state.
        time.sleep(rng.uniform(0.6, 1.8))
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.popen.wait()
        gateway.stop()
    before = accepted(state)
    final = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway-final.log")
    procs.append(final)
    wait_until(
        lambda: (
            all(accepted(state).get(d, 0) > n for d, n in before.items())
            and arrived(record, keyring, before)
        ),
        20,
        "the last gateway accepting new readings, the backlog of the kills at the hub",
    )
    assert final.stop() == 0
    promised = accepted(state)
    assert set(promised) == {f"plc-{i}" for i in range(1, DEVICES + 1)}
    assert store_report(state)["envelopes"] == 0  # the clean stop delivered the backlog
    wait_until(
        lambda: delivered(record, keyring) == promised, 20, "every accepted reading at the hub"
    )
    opened, errors, tracker = opened_from(record, keyring)
    assert errors == []
    # One boot id for the whole test: sequence numbers continued across every kill.
    assert len({o.header.boot_id for o in opened}) == 1
    assert tracker.gaps() == {}
    print(
        f"accepted {sum(promised.values())} readings, duplicates after 20 kills: "
        f"{tracker.duplicates}"
    )


@pytest.mark.slow
def test_hub_outage_backlog_arrives_complete_and_in_order(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    persist = tmp_path / "broker-state"
    hub_port, record = start_hub(procs, tmp_path, pki_dir, "--persist", str(persist))
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, DEVICES, "--period", "0.1", "--max-age", "0.3"
    )
    edit_config(config, hub={"backoff_min": 0.2, "backoff_max": 1.0})
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    wait_until(lambda: sum(delivered(record, keyring).values()) > 200, 20, "data before")
    hub = procs[0]
    assert hub.stop() == 0  # the hub goes away under load
    wait_until(lambda: stored_envelopes(tmp_path / "state") > 10, 20, "a backlog in the store")
    backlog: Any = store_report(tmp_path / "state")
    assert backlog["envelopes"] > 10  # ingest went on into the store
    during = accepted(tmp_path / "state")
    start_hub(procs, tmp_path, pki_dir, "--persist", str(persist), port=hub_port)
    wait_until(lambda: arrived(record, keyring, during), 20, "the backlog delivered after it")
    assert gateway.stop() == 0
    promised = accepted(tmp_path / "state")
    wait_until(
        lambda: delivered(record, keyring) == promised,
        20,
        "the backlog and the live data at the hub",
    )
    opened, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.gaps() == {}
    # In order per device: in arrival order, every envelope is either a redelivery of one
    # already seen or exactly the next one.
    expected: dict[str, int] = defaultdict(int)
    for o in opened:
        if o.header.first_seq < expected[o.device_id]:
            continue  # at-least-once: re-sent after the reconnect
        assert o.header.first_seq == expected[o.device_id], (o.device_id, o.header.first_seq)
        expected[o.device_id] = o.header.first_seq + o.header.count
    assert "uplink down" in gateway.output()


@pytest.mark.slow
def test_store_holds_only_ciphertext_and_a_flipped_bit_is_refused(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    from conftest import free_ports

    silent_port = free_ports(1)  # nobody listens: everything stays in the store
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, silent_port, 2, "--period", "0.1", "--max-age", "0.3"
    )
    edit_config(config, gateway={"shutdown_grace": 0.5})
    started = time.time()
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)  # stopped by the fixture if the test fails before it does
    state = tmp_path / "state"
    wait_until(lambda: stored_envelopes(state) >= 10, 20, "envelopes in the store")
    assert gateway.stop() == 0
    stored: Any = store_report(state)
    assert stored["envelopes"] >= 10
    raw = b"".join(p.read_bytes() for p in state.glob("store.db*"))
    # Point names ride in every plaintext batch; the values the devices held are known.
    assert b"float32_0" not in raw and b"int16_1" not in raw
    points = {sp.point.name: sp for sp in make_points(9, period=0.1, seed=0)}
    sp = points["float32_0"]
    values = {
        repr(held_value(sp.point, sp.seed, step)).encode()
        for step in range(int(started) - 1, int(time.time()) + 2)
    }
    assert not any(v in raw for v in values)

    conn = apsw.Connection(str(state / "store.db"))
    (victim, device, first_seq, body), *_ = conn.execute(
        "SELECT id, device, first_seq, body FROM envelopes ORDER BY id LIMIT 1 OFFSET 3"
    )
    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0x10
    conn.execute("UPDATE envelopes SET body=? WHERE id=?", (bytes(flipped), victim))
    conn.close()

    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    edit_config(config, hub={"port": hub_port}, gateway={"shutdown_grace": 5.0})
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway-2.log")
    procs.append(gateway)
    wait_until(lambda: store_report(state)["envelopes"] == 0, 30, "the backlog to drain")
    assert gateway.stop() == 0
    wait_until(lambda: len(opened_from(record, keyring)[1]) == 1, 10, "the refusal")
    opened, errors, _ = opened_from(record, keyring)
    assert len(errors) == 1
    assert f"{device} seq {first_seq}: authentication failed" in errors[0]
    assert len(opened) >= stored["envelopes"] - 1


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["drop-oldest", "refuse-newest"])
def test_a_full_store_counts_every_drop_exactly_in_events_and_status(
    tmp_path: Path, pki_dir: Path, procs: list[Proc], policy: str
) -> None:
    from gateway.events import read_events

    from conftest import free_ports

    silent_port = free_ports(1)  # the hub never answers: the store fills up
    config, _ = start_simulator(
        procs,
        tmp_path,
        pki_dir,
        silent_port,
        3,
        "--period",
        "0.05",
        "--points",
        "60",
        "--max-age",
        "0.3",
    )
    edit_config(
        config, store={"max_bytes": 64 * 1024, "policy": policy}, gateway={"shutdown_grace": 0.5}
    )
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)  # stopped by the fixture if the test fails before it does
    state = tmp_path / "state"
    wait_until(
        lambda: any(e["kind"] == "envelopes-dropped" for e in read_events(state)),
        30,
        "the first drop",
    )
    # Every device has lost something (the checks below name each one's drops).
    wait_until(
        lambda: (
            {e["device"] for e in read_events(state) if e["kind"] == "envelopes-dropped"}
            == {f"plc-{i}" for i in range(1, 4)}
        ),
        30,
        "a drop of every device",
    )
    assert gateway.stop() == 0
    events = read_events(state)
    report: Any = store_report(state)
    assert report["bytes"] <= 64 * 1024
    assert [e for e in events if e["kind"] == "store-high-water"]
    for device, row in report["devices"].items():
        dropped = [e for e in events if e["kind"] == "envelopes-dropped" and e["device"] == device]
        assert all(e["policy"] == policy for e in dropped)
        assert sum(e["envelopes"] for e in dropped) == row["dropped"]["envelopes"] > 0
        assert sum(e["readings"] for e in dropped) == row["dropped"]["readings"]
        # Nothing was delivered: every accepted reading is either still stored or dropped.
        assert row["readings"] + row["dropped"]["readings"] == row["next_seq"]
    assert re.search(r"readings: (\d+) read, 0 delivered, (\d+) dropped", gateway.output())
