"""One gateway per state folder, sequence numbers that never go back, and private files."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from gateway.events import read_events
from gateway.identity.keyring import Keyring

from conftest import Proc, edit_config, fieldgate, start_simulator


def test_a_second_gateway_on_one_state_dir_is_refused_and_a_dead_holder_frees_it(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    from conftest import free_ports

    silent = free_ports(1)  # no hub needed: the lock is taken before any session starts
    config, _ = start_simulator(procs, tmp_path, pki_dir, silent, 1, "--period", "0.2")
    edit_config(config, gateway={"shutdown_grace": 0.3})
    first = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway-1.log")
    procs.append(first)
    first.wait_for("gateway boot")
    second = subprocess.run(
        fieldgate("run", "--config", str(config)), capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 2
    assert f"state dir {tmp_path / 'state'} is in use by pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    # The parent of `--workers` holds the main state dir as well.
    workers = subprocess.run(
        fieldgate("run", "--config", str(config), "--workers", "2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert workers.returncode == 2 and f"in use by pid {first.pid}" in workers.stderr
    # A holder that dies without cleaning up leaves no stale lock: the kernel drops a flock.
    os.kill(first.pid, signal.SIGKILL)
    first.popen.wait()
    third = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway-3.log")
    procs.append(third)
    third.wait_for("gateway boot")
    assert third.stop() == 0


def test_a_rewound_sequence_counter_moves_to_a_new_boot_and_no_reading_is_lost(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    import apsw

    from gateway.events import read_events

    from conftest import opened_from, start_hub, wait_until

    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 2, "--period", "0.1", "--max-age", "0.3"
    )
    state = tmp_path / "state"
    first = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway-1.log")
    procs.append(first)
    wait_until(lambda: len(opened_from(record, keyring)[0]) >= 6, 30, "envelopes at the hub")
    assert first.stop() == 0
    # Anyone who can write the file winds a counter back by 40 readings.
    conn = apsw.Connection(str(state / "store.db"))
    conn.execute("UPDATE sequences SET next_seq = next_seq - 40 WHERE device='plc-1'")
    conn.close()
    verify = subprocess.run(
        fieldgate("store", "verify", "--config", str(config)), capture_output=True, text=True
    )
    assert verify.returncode == 1
    assert "plc-1: sequence state went backwards" in verify.stderr
    # A mark edited to match the rewound counter does not authenticate with the keyring.
    conn = apsw.Connection(str(state / "store.db"))
    [(mark,)] = conn.execute("SELECT value FROM meta WHERE key='seqmark:plc-1'").fetchall()
    forged = f"{int(mark.split(':')[0]) - 40}:{mark.split(':', 1)[1]}"
    conn.execute("UPDATE meta SET value=? WHERE key='seqmark:plc-1'", (forged,))
    conn.close()
    env = {**os.environ, "FIELDGATE_KEY_PASSPHRASE": (pki_dir / "passphrase").read_text().strip()}
    verify = subprocess.run(
        fieldgate("store", "verify", "--config", str(config)),
        capture_output=True,
        text=True,
        env=env,
    )
    assert verify.returncode == 1
    assert "plc-1: sequence state went backwards: its sequence mark does not authenticate" in (
        verify.stderr
    )
    before = len(opened_from(record, keyring)[0])
    second = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway-2.log")
    procs.append(second)
    wait_until(lambda: len(opened_from(record, keyring)[0]) >= before + 6, 30, "new envelopes")
    assert second.stop() == 0
    events = [e for e in read_events(state) if e["kind"] == "sequence-rewound"]
    assert [e["device"] for e in events] == ["plc-1"]
    assert events[0]["old_boot"] != events[0]["new_boot"]
    opened, errors, tracker = opened_from(record, keyring)
    assert errors == []
    assert tracker.conflicts == []  # no number was used twice
    assert tracker.gaps() == {}
    assert len({o.header.boot_id for o in opened}) == 2
    assert {o.header.boot_id for o in opened[before:]} == {events[0]["new_boot"]}


def test_envelopes_left_by_another_layout_are_drained_single_to_workers_and_back(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    from gateway.store import accepted, waiting

    from conftest import free_ports, opened_from, start_hub, wait_until

    hub_port = free_ports(1)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 4, "--period", "0.1", "--max-age", "0.3"
    )
    edit_config(config, gateway={"shutdown_grace": 0.5})
    state = tmp_path / "state"
    stores = [state / "store.db", state / "worker-0" / "store.db", state / "worker-1" / "store.db"]

    def held() -> int:
        return sum(sum(waiting(p).values()) for p in stores)

    def promised() -> dict[tuple[str, str], int]:
        """Per (device, boot), the readings every store has accepted."""
        out = {}
        for path in stores:
            if path.exists():
                from gateway.store import status

                boot = status(path)["boot_id"]
                out.update({(d, boot): n for d, n in accepted(path).items() if n})
        return out

    def run(*extra: str, name: str, until: object) -> Proc:
        gateway = Proc(fieldgate("run", "--config", str(config), *extra), tmp_path / name)
        procs.append(gateway)
        wait_until(until, 30, f"progress of {name}")
        assert gateway.stop() == 0
        return gateway

    # A single process with the hub away leaves its backlog in state/store.db.
    run(name="single-1.log", until=lambda: sum(waiting(stores[0]).values()) >= 8)
    left = held()
    assert left >= 8
    _, record = start_hub(procs, tmp_path, pki_dir, port=hub_port)
    workers = run(
        "--workers",
        "2",
        name="workers-1.log",
        until=lambda: len(opened_from(record, keyring)[0]) >= left + 8,
    )
    assert held() == 0  # nothing stranded: the single store's envelopes were delivered
    assert "(an earlier layout)" in workers.output()
    # The reverse: workers with the hub away, then a single process.
    hub = procs[-2]
    assert hub.stop() == 0
    run(
        "--workers",
        "2",
        name="workers-2.log",
        until=lambda: sum(sum(waiting(p).values()) for p in stores[1:]) >= 8,
    )
    left = held()
    start_hub(procs, tmp_path, pki_dir, port=hub_port)
    before = len(opened_from(record, keyring)[0])
    single = run(
        name="single-2.log",
        until=lambda: len(opened_from(record, keyring)[0]) >= before + left + 4,
    )
    assert held() == 0
    assert "(an earlier layout)" in single.output()
    # Every reading any store accepted arrived, under its original boot and numbers.
    _, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.conflicts == [] and tracker.gaps() == {}
    arrived = {key: stream.count() for key, stream in tracker.streams.items()}
    assert arrived == promised()


def test_state_files_are_0600_and_state_folders_0700_even_if_they_were_wider(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    import stat

    from adapters.ble.bonds import BondBook

    from conftest import free_ports, wait_until

    config, _ = start_simulator(procs, tmp_path, pki_dir, free_ports(1), 2, "--period", "0.1")
    edit_config(config, gateway={"shutdown_grace": 0.3})
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # as an older fieldgate left it
    (state / "audit.db").touch(mode=0o644)
    os.chmod(state / "audit.db", 0o644)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    files = [
        "store.db",
        "store.db-wal",
        "store.db-shm",
        "audit.db",
        "audit.db-wal",
        "fieldgate.lock",
    ]

    def opened(folder: Path) -> bool:
        # The audit log's file existed before (0644): it counts once the gateway wrote to it.
        return all((folder / n).exists() for n in files) and any(
            e["kind"] == "device-admitted" for e in read_events(folder)
        )

    wait_until(lambda: opened(state), 20, "the state files")
    assert {name: mode(state / name) for name in files} == {name: 0o600 for name in files}
    assert mode(state) == 0o700
    assert gateway.stop() == 0
    workers = Proc(
        fieldgate("run", "--config", str(config), "--workers", "2"), tmp_path / "workers.log"
    )
    procs.append(workers)
    wait_until(lambda: all(opened(state / f"worker-{i}") for i in range(2)), 30, "both workers")
    for i in range(2):
        folder = state / f"worker-{i}"
        assert mode(folder) == 0o700
        assert {n: mode(folder / n) for n in files} == {n: 0o600 for n in files}
    assert workers.stop() == 0
    # The BLE bond book (it names the paired devices) is written 0600 too.
    bonds = BondBook(tmp_path / "ble-state")
    bonds.record("AA:BB:CC:DD:EE:FF", "just-works")
    assert mode(bonds.path) == 0o600 and mode(bonds.path.parent) == 0o700


def test_a_store_kept_outside_the_state_dir_is_locked_too(tmp_path: Path) -> None:
    import pytest

    from gateway.statelock import StateInUse, lock_state, release_all

    shared = tmp_path / "disk" / "store.db"
    held = lock_state(tmp_path / "state-a", shared)
    try:
        # Another state folder, the same store file: refused, and nothing of it stays locked.
        with pytest.raises(StateInUse, match=rf"store {shared} is in use by pid {os.getpid()}"):
            lock_state(tmp_path / "state-b", shared)
        release_all(lock_state(tmp_path / "state-b"))
    finally:
        release_all(held)
    release_all(lock_state(tmp_path / "state-b", shared))  # free once the holder lets go
