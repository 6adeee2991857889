"""`fieldgate simulate modbus`: what its help says is what it does, and a busy port is one line."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from conftest import Proc, fieldgate


def test_write_config_writes_it_and_keeps_serving_as_the_help_says(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    helped = subprocess.run(
        fieldgate("simulate", "modbus", "--help"), capture_output=True, text=True, timeout=60
    )
    assert "keep serving" in " ".join(helped.stdout.split())
    config = tmp_path / "gateway.toml"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sim = Proc(
        fieldgate(
            "simulate",
            "modbus",
            "--devices",
            "1",
            "--port",
            str(port),
            "--write-config",
            str(config),
            "--pki",
            str(pki_dir),
        ),
        tmp_path / "sim.log",
    )
    procs.append(sim)
    sim.wait_for("simulated Modbus devices on")
    assert config.exists()
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass  # still serving after the config was written
    assert sim.popen.poll() is None


def test_a_busy_port_is_one_clear_line_and_exit_1_without_a_config(
    tmp_path: Path, pki_dir: Path
) -> None:
    config = tmp_path / "gateway.toml"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            fieldgate(
                "simulate",
                "modbus",
                "--devices",
                "1",
                "--port",
                str(port),
                "--write-config",
                str(config),
                "--pki",
                str(pki_dir),
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"fieldgate: cannot listen: plc-1: 127.0.0.1:{port} is in use, "
        "or not an address of this machine"
    )
    assert not config.exists()
