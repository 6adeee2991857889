"""One gateway per state folder, sequence numbers that never go back, and private files."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from gateway.keyring import Keyring

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
