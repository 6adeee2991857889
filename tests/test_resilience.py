"""A dead or slow device delays nobody else; a stop flushes every open batch to the hub."""

from __future__ import annotations

import itertools
import os
import re
import signal
from collections import defaultdict
from pathlib import Path

import pytest

from gateway.events import read_events
from gateway.identity.keyring import Keyring

from conftest import Proc, fieldgate, opened_from, start_hub, start_simulator, wait_until

PERIOD = 0.2


def test_dead_and_slow_devices_do_not_delay_the_others(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs,
        tmp_path,
        pki_dir,
        hub_port,
        6,
        "--period",
        str(PERIOD),
        "--max-age",
        "0.3",
        "--points",
        "4",
        "--fault",
        "plc-5=dead",
        "--fault",
        "plc-6=slow:0.7",
    )
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)

    def healthy_have_data() -> bool:
        opened, _, _ = opened_from(record, keyring)
        seen: dict[str, int] = defaultdict(int)
        for o in opened:
            seen[o.device_id] += len(o.readings)
        return all(seen[f"plc-{i}"] >= 100 for i in range(1, 5)) and seen["plc-6"] > 0

    wait_until(healthy_have_data, 40, "healthy devices and the slow one to deliver")
    assert gateway.stop() == 0
    opened, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.gaps() == {}

    scan_times: dict[str, list[int]] = defaultdict(list)
    for o in opened:
        for r in o.readings:
            if r.point == "float32_0":  # one point per scan of the holding block
                scan_times[o.device_id].append(r.ts_ms)
    assert "plc-5" not in scan_times  # the dead device never answered
    for device in ("plc-1", "plc-2", "plc-3", "plc-4"):
        times = sorted(scan_times[device])
        worst = max(b - a for a, b in itertools.pairwise(times))
        # Polled every 200 ms; had the dead device's 1 s timeouts or the slow device's 700 ms
        # answers been in their way, gaps of a second or more would show.
        assert worst < 600, (device, worst)
    slow = sorted(scan_times["plc-6"])
    assert min(b - a for a, b in itertools.pairwise(slow)) >= 600
    assert "plc-5: unavailable: read holding@0: no response within 1.0 s" in gateway.output()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_stop_flushes_open_batches_and_every_reading_read_reaches_the_hub(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc], stop_signal: int
) -> None:
    """SIGTERM and SIGINT stop alike: flushed. (SIGHUP reloads the config: test_reload.py.)"""
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    # Batches may stay open for a minute: only the stop can have delivered them.
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 5, "--period", "0.1", "--max-age", "60"
    )
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    gateway.wait_for(r"plc-5: connected")
    wait_until(
        lambda: sum(e["kind"] == "device-admitted" for e in read_events(tmp_path / "state")) == 5,
        20,
        "all devices admitted",
    )
    opened, _, _ = opened_from(record, keyring)
    assert opened == []  # nothing was due yet
    os.kill(gateway.pid, stop_signal)
    assert gateway.popen.wait(30) == 0, gateway.output()[-2000:]
    assert gateway.stop() == 0
    summary = re.search(r"readings: (\d+) read, (\d+) delivered, 0 dropped", gateway.output())
    assert summary, gateway.output()[-2000:]
    read, delivered = int(summary[1]), int(summary[2])
    assert read > 0 and read == delivered

    def arrived() -> bool:
        return opened_from(record, keyring)[2].unique_readings() == read

    wait_until(arrived, 10, "the flushed readings at the hub")
    opened, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.gaps() == {} and tracker.duplicates == 0
    assert {o.device_id for o in opened} == {f"plc-{i}" for i in range(1, 6)}
    events = read_events(tmp_path / "state")
    assert sorted(e["device"] for e in events if e["kind"] == "device-admitted") == [
        f"plc-{i}" for i in range(1, 6)
    ]
