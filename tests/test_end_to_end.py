"""The whole path with real parts: simulator processes, mosquitto, `fieldgate run`."""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from adapters.modbus.sim.devices import held_value, make_points
from gateway import config as config_mod
from gateway.identity.keyring import Keyring
from gateway.testbed.ports import free_ports

from conftest import (
    Proc,
    edit_config,
    fieldgate,
    opened_from,
    start_hub,
    start_simulator,
    wait_until,
)

DEVICE_COUNT = 6


def _points_by_name(config_path: Path) -> dict[str, dict[str, tuple[object, int]]]:
    """device -> point name -> (Point, seed), rebuilt the way the simulator built them."""
    cfg = config_mod.load(config_path)
    out = {}
    for index, device in enumerate(cfg.devices):
        sim_points = make_points(len(device.points), period=device.points[0].period, seed=index)
        out[device.id] = {sp.point.name: (sp.point, sp.seed) for sp in sim_points}
    return out


def test_every_device_arrives_on_its_own_identity_with_true_values_and_no_gaps(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, DEVICE_COUNT, "--period", "0.2", "--max-age", "0.5"
    )
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)

    def enough() -> bool:
        opened, _, _ = opened_from(record, keyring)
        per_device: dict[str, int] = defaultdict(int)
        for o in opened:
            per_device[o.device_id] += len(o.readings)
        return len(per_device) == DEVICE_COUNT and min(per_device.values()) >= 200

    wait_until(enough, 40, "every device to deliver 200 readings")
    assert gateway.stop() == 0, gateway.output()[-2000:]

    opened, errors, tracker = opened_from(record, keyring)
    assert errors == []
    devices = {o.device_id for o in opened}
    assert devices == {f"plc-{i}" for i in range(1, DEVICE_COUNT + 1)}

    # Each device's envelopes carry exactly one boot, and its sequence numbers start at 0 and
    # have no holes; nothing arrived twice on a healthy run.
    assert tracker.gaps() == {}
    assert len({(o.device_id, o.header.boot_id) for o in opened}) == DEVICE_COUNT
    for device in devices:
        firsts = sorted(o.header.first_seq for o in opened if o.device_id == device)
        assert firsts[0] == 0
    assert tracker.duplicates == 0

    # Values are what the simulated device held at the time of the read.
    points = _points_by_name(config)
    checked = 0
    for o in opened:
        for r in o.readings:
            point, seed = points[o.device_id][r.point]
            step = r.ts_ms // 1000
            candidates = [held_value(point, seed, s) for s in (step, step + 1)]
            assert any(_same(r.value, c) for c in candidates), (o.device_id, r, candidates)
            checked += 1
    assert checked >= 200 * DEVICE_COUNT

    # Every device connected under its own certificate: the broker saw each CN as identity.
    broker_log = (tmp_path / "broker.log").read_text()
    for device in devices:
        # The gateway sent the IoT Hub username "localhost/plc-1/?api-version=..."; mosquitto
        # replaced it with the certificate's CN (use_identity_as_username) and logged it.
        assert re.search(rf"as {device} \(p\d, c\d, k\d+, u'{device}'\)", broker_log), device
    gw_log = gateway.output()
    assert "every envelope was delivered" in gw_log


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


@pytest.mark.slow
def test_two_workers_share_the_devices_and_deliver_them_all(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    from gateway.store import status

    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 6, "--period", "0.2", "--max-age", "0.5"
    )
    gateway = Proc(
        fieldgate("run", "--config", str(config), "--workers", "2"), tmp_path / "gateway.log"
    )
    procs.append(gateway)

    def all_arrive() -> bool:
        opened, _, _ = opened_from(record, keyring)
        return len({o.device_id for o in opened}) == 6

    wait_until(all_arrive, 40, "every device through one of the workers")
    assert gateway.stop() == 0, gateway.output()[-2000:]
    stores = [status(tmp_path / "state" / f"worker-{i}" / "store.db") for i in (0, 1)]
    shares = [set(s["devices"]) for s in stores]
    assert shares == [{"plc-1", "plc-3", "plc-5"}, {"plc-2", "plc-4", "plc-6"}]
    assert stores[0]["boot_id"] != stores[1]["boot_id"]
    promised = {d: row["next_seq"] for s in stores for d, row in s["devices"].items()}
    wait_until(
        lambda: (
            {
                d: n
                for (d, _), n in (
                    (k, st.count()) for k, st in opened_from(record, keyring)[2].streams.items()
                )
            }
            == promised
        ),
        10,
        "every accepted reading",
    )
    shown = subprocess.run(
        fieldgate("store", "status", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0
    assert "worker-0/store.db" in shown.stdout and "worker-1/store.db" in shown.stdout
    output = gateway.output()
    assert "[worker 0/2]" in output and "[worker 1/2]" in output
    assert output.count("every envelope was delivered") == 2


def test_a_stop_with_nothing_left_to_send_does_not_wait_the_grace(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 3, "--period", "0.2", "--max-age", "0.5"
    )
    edit_config(config, gateway={"shutdown_grace": 30.0})
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    wait_until(lambda: len(opened_from(record, keyring)[0]) >= 6, 40, "the first envelopes")
    started = time.monotonic()
    # A generous bound, as a behavioural check: the flush has 3 devices' batches to send.
    assert gateway.stop(timeout=60) == 0, gateway.output()[-2000:]
    assert time.monotonic() - started < 15, gateway.output()[-2000:]
    assert "every envelope was delivered" in gateway.output()


def test_a_session_waiting_to_reconnect_with_nothing_to_send_does_not_hold_up_the_stop(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    # No hub listens (its sessions back off and retry), and the devices never answer (nothing
    # is queued): the stop has nothing to wait for.
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, free_ports(1), 2, "--fault", "plc-1=down", "--fault", "plc-2=dead"
    )
    edit_config(config, gateway={"shutdown_grace": 30.0}, hub={"backoff_min": 5.0})
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    gateway.wait_for(r"plc-2: uplink down")
    started = time.monotonic()
    assert gateway.stop(timeout=60) == 0, gateway.output()[-2000:]
    assert time.monotonic() - started < 15, gateway.output()[-2000:]
    assert "every envelope was delivered" in gateway.output()
