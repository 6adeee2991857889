"""`fieldgate reload` on `fieldgate run --workers 2`: the parent forwards SIGHUP, each worker
reloads its share of the file, and the parent writes their outcome together."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest

from gateway.config import render_toml
from gateway.identity.keyring import Keyring

from conftest import Proc, fieldgate, opened_from, start_hub, start_simulator, wait_until


@pytest.mark.slow
def test_workers_reload_their_shares_and_the_parent_reports_them_together(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 5, "--period", "0.2", "--max-age", "0.4"
    )
    full = tomllib.loads(config.read_text())
    first = dict(full, devices=full["devices"][:4])
    config.write_text(render_toml(first))
    gateway = Proc(
        fieldgate("run", "--config", str(config), "--workers", "2"), tmp_path / "gateway.log"
    )
    procs.append(gateway)
    for i in range(1, 5):
        gateway.wait_for(rf"plc-{i}: connected")

    # plc-5 is the fifth device with its own host: worker 0's share (devices 0, 2, 4).
    config.write_text(render_toml(full))
    done = subprocess.run(
        fieldgate("reload", "--config", str(config)), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("applied "), done.stdout
    worker0 = json.loads((tmp_path / "state" / "worker-0" / "config-status.json").read_text())
    worker1 = json.loads((tmp_path / "state" / "worker-1" / "config-status.json").read_text())
    assert worker0["plan"]["added"] == ["plc-5"] and worker0["plan"]["unchanged"] == 2
    assert worker1["plan"] == {"added": [], "removed": [], "changed": [], "unchanged": 2}

    def arrived() -> bool:
        opened, _, _ = opened_from(record, keyring)
        return "plc-5" in {o.device_id for o in opened}

    wait_until(arrived, 30, "plc-5 through worker 0")
    # A refusal in the workers is the parent's answer too, naming the worker and the field.
    bad = dict(full, hub=dict(full["hub"], port=1))
    config.write_text(render_toml(bad))
    done = subprocess.run(
        fieldgate("reload", "--config", str(config)), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 1
    assert "worker 0/2: needs a restart: field hub.port" in done.stdout, done.stdout
    assert gateway.stop() == 0, gateway.output()[-2000:]
    assert gateway.output().count("every envelope was delivered") == 2
