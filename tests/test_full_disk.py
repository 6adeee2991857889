"""A full disk under the real gateway, on a real small tmpfs: it keeps running and delivering."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.events import read_events
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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "state"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    except (OSError, subprocess.CalledProcessError):
        if os.environ.get("CI"):
            raise  # CI runs as root: a full disk is tested there, never skipped silently
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, name: str = "filler") -> None:
    """Write until the file system says ENOSPC."""
    with open(disk / name, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\xff" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        try:
            while True:
                f.write(b"\xff" * 64)
        except OSError as err:
            assert err.errno == errno.ENOSPC


def kinds(state: Path, kind: str) -> list[dict[str, object]]:
    return [e for e in read_events(state) if e["kind"] == kind]


def test_a_full_disk_refuses_new_readings_keeps_delivering_and_resumes(
    tmp_path: Path, small_disk: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    from conftest import free_ports

    hub_port = free_ports(1)  # the hub comes later: a backlog builds up first
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 2, "--period", "0.1", "--max-age", "0.3"
    )
    edit_config(
        config,
        gateway={"shutdown_grace": 3.0},
        hub={"backoff_min": 0.2, "backoff_max": 0.5},
    )
    state = small_disk
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway-1.log")
    procs.append(gateway)
    gateway.wait_for("gateway boot")
    wait_until(lambda: store_report(state)["envelopes"] >= 20, 30, "a backlog")  # type: ignore[operator]
    fill(state)
    gateway.wait_for("the disk is full: new readings are refused")
    assert gateway.popen.poll() is None
    wait_until(lambda: kinds(state, "store-disk-full") != [], 10, "the full-disk event")
    assert [e["path"] for e in kinds(state, "store-disk-full")] == [str(state / "store.db")]
    # The hub returns: what the store holds is delivered (and deleted) on the full disk.
    _, record = start_hub(procs, tmp_path, pki_dir, port=hub_port)
    wait_until(lambda: len(opened_from(record, keyring)[0]) >= 10, 30, "the backlog at the hub")
    # Space returns: intake resumes by itself, and the refusals are counted per device.
    (state / "filler").unlink()
    found = gateway.wait_for(r"disk writable again: intake resumes \((\d+) envelopes, (\d+) read")
    assert int(found.group(2)) > 0
    # Logged when recorded; committed to the audit log within its retry interval (1 s) of the
    # disk taking writes again.
    wait_until(lambda: kinds(state, "store-disk-writable") != [], 10, "the writable event")
    [back] = kinds(state, "store-disk-writable")
    assert back["refused_readings"] == int(found.group(2))
    assert set(back["refused"]) == {"plc-1", "plc-2"}  # type: ignore[arg-type]
    delivered = len(opened_from(record, keyring)[0])
    wait_until(lambda: len(opened_from(record, keyring)[0]) > delivered + 4, 30, "new readings")
    # Full again, and stopped: exit 0, and the summary counts the refusals as dropped.
    fill(state)
    gateway.wait_for(r"(?s)intake resumes.*the disk is full: new readings are refused")
    assert gateway.stop() == 0
    assert re.search(r"readings: \d+ read, \d+ delivered, [1-9]\d* dropped", gateway.output())
    # Stopped while still full: the spell's refusals are recorded as such, not as "writable".
    assert len(kinds(state, "store-intake-refused")) == 1
    assert len(kinds(state, "store-disk-writable")) == 1
    # A restart on the full disk starts, delivers what is stored and refuses new readings.
    fill(state, "filler-2")
    again = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway-2.log")
    procs.append(again)
    again.wait_for("gateway boot")
    again.wait_for("disk full at start")
    again.wait_for("first envelope refused for want of disk space")
    (state / "filler-2").unlink()
    (state / "filler").unlink()
    found = again.wait_for(r"disk writable again: intake resumes \(\d+ envelopes, (\d+) read")
    assert int(found.group(1)) > 0
    assert again.stop() == 0
    assert "Traceback" not in gateway.output() + again.output()
    _, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.conflicts == []


def test_security_events_on_a_full_disk_wait_in_memory_and_are_written_after(
    small_disk: Path,
) -> None:
    from gateway.events import SecurityEvents

    events = SecurityEvents(small_disk)
    events.record("first", None, "written")
    reserve = small_disk / "audit.db.reserve"
    assert reserve.stat().st_size > 0  # made at the first commit
    fill(small_disk)
    # The first full commit gives up the reserve and is written in its room.
    events.record("on-the-reserve", None, "written")
    assert not reserve.exists() and events.unwritten == 0
    fill(small_disk, "filler-2")  # and now that room is taken too
    for _ in range(3):
        events.record("store-disk-full", None, "x" * 9000)  # no exception
    # Not committed, so not counted as recorded; kept in order, in memory.
    assert events.unwritten == 3 and "store-disk-full" not in events.counts
    assert [e["kind"] for e in read_events(small_disk)] == ["first", "on-the-reserve"]
    (small_disk / "filler").unlink()
    (small_disk / "filler-2").unlink()
    events.record("after", None, "written again")
    assert events.unwritten == 0 and events.counts["store-disk-full"] == 3
    events.close()
    kinds = [e["kind"] for e in read_events(small_disk)]
    assert kinds == ["first", "on-the-reserve", *["store-disk-full"] * 3, "after"]
    assert [e["seq"] for e in read_events(small_disk)] == [0, 1, 2, 3, 4, 5]
