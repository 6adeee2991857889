"""SIGHUP (a closed terminal) stops the long-running helper verbs (the hub stand-in, the demo)
as gracefully as SIGTERM does; `fieldgate run` reloads its config on SIGHUP instead and goes on
(tests/test_reload.py: a reload that changes nothing here)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Proc, fieldgate, start_hub


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, with their command lines."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int, cmdline: str) -> bool:
    """Whether the process ``pid`` still runs the same command (PIDs are reused)."""
    try:
        now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return now == cmdline


def test_sighup_stops_the_local_hub_and_its_broker(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    start_hub(procs, tmp_path, pki_dir)
    hub = procs[-1]
    brokers = {p: c for p, c in _children(hub.pid).items() if "mosquitto" in c}
    assert len(brokers) == 1, _children(hub.pid)
    os.kill(hub.pid, signal.SIGHUP)
    assert hub.popen.wait(20) == 0, hub.output()[-2000:]
    # The owner stopped its broker before it exited: no orphan is left behind.
    assert [p for p, c in brokers.items() if _alive(p, c)] == []


@pytest.mark.slow
def test_closing_the_demos_terminal_stops_it_and_everything_it_started(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        # A session of its own, like a terminal: the hangup reaches the whole process group.
        demo = subprocess.Popen(
            fieldgate("demo", "--state", str(state), "--devices", "2", "--ble", "0"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "160"},
        )
        try:
            record = state / "hub-record.jsonl"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (
                not record.exists() or len(record.read_bytes().splitlines()) < 4
            ):
                # Another process's file: nothing to wait on but the file itself.
                time.sleep(0.2)
            helpers = _children(demo.pid)
            assert any("mosquitto" in c for c in helpers.values()), helpers
            assert any(" run " in c for c in helpers.values()), helpers
            os.killpg(demo.pid, signal.SIGHUP)
            code = demo.wait(60)
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert "gateway exit code 0" in output
    assert [c for p, c in helpers.items() if _alive(p, c)] == []
    gateway_log = (state / "logs" / "gateway.log").read_text()
    assert re.search(r"readings: (\d+) read, \1 delivered, 0 dropped", gateway_log)


def test_sighup_reloads_fieldgate_run_and_does_not_stop_it(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    """Once this stopped the gateway; now SIGHUP reloads the same file: nothing changes, the
    gateway runs on and says so in config-status.json."""
    import json

    from conftest import start_simulator

    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(procs, tmp_path, pki_dir, hub_port, 2)
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    gateway.wait_for(r"plc-2: connected")
    os.kill(gateway.pid, signal.SIGHUP)
    gateway.wait_for(r"security event config-loaded device=None: applied as a diff")
    status = json.loads((tmp_path / "state" / "config-status.json").read_text())
    assert status["status"] == "applied" and status["source"] == "SIGHUP"
    assert status["plan"] == {"added": [], "removed": [], "changed": [], "unchanged": 2}
    assert gateway.popen.poll() is None
    assert gateway.stop() == 0
    assert "every envelope was delivered" in gateway.output()
