"""A reload on BLE devices: the simulated peripherals behind the simulated bluetoothd, the hub
stand-in and `fieldgate run`; a device added on an adapter restarts that adapter's task, and the
other devices keep their uplink sessions."""

from __future__ import annotations

import asyncio
import subprocess
import time
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from gateway.config import render_toml
from gateway.identity import pki as pki_mod
from gateway.identity.keyring import Keyring
from gateway.testbed.localhub.control import HubControl

from conftest import Proc, fieldgate, opened_from, start_ble_simulator, start_hub, wait_until

pytestmark = pytest.mark.slow


def test_a_ble_device_added_by_a_reload_delivers_and_the_others_keep_their_sessions(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _, _ = start_ble_simulator(procs, tmp_path, pki_dir, hub_port, 3, "--rate", "5")
    full = tomllib.loads(config.read_text())
    config.write_text(render_toml(dict(full, devices=full["devices"][:2])))
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)

    def latest() -> dict[str, float]:
        opened, _, _ = opened_from(record, keyring)
        out: dict[str, float] = defaultdict(float)
        for o in opened:
            for r in o.readings:
                out[o.device_id] = max(out[o.device_id], r.ts_ms / 1000)
        return out

    wait_until(lambda: {"ble-1", "ble-2"} <= set(latest()), 40, "ble-1 and ble-2 delivering")
    config.write_text(render_toml(full))
    asked = time.time()
    done = subprocess.run(
        fieldgate("reload", "--config", str(config)), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 added, 0 removed, 0 changed, 2 unchanged" in done.stdout

    def all_after() -> bool:
        seen = latest()
        return all(seen.get(f"ble-{i}", 0) > asked + 1 for i in (1, 2, 3))

    wait_until(all_after, 60, "every BLE device delivering after the reload")

    async def connects(device: str) -> Any:
        async with HubControl(pki_mod.Pki(pki_dir), "127.0.0.1", hub_port) as hub:
            code, body = await hub.invoke(device, "status", None, timeout=10)
            assert code == 200, (code, body)
            return body["uplink"]["connects"]

    assert [asyncio.run(connects(f"ble-{i}")) for i in (1, 2)] == [1, 1]
    assert gateway.stop() == 0, gateway.output()[-2000:]
    _, _, tracker = opened_from(record, keyring)
    assert tracker.gaps() == {}
