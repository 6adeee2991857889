"""Shared fixtures: a development PKI, free loopback ports, and processes stopped by PID."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.modbus.sim.run import simulator_argv
from gateway.consumer import Opened, SequenceTracker, open_all, read_record
from gateway.identity import pki as pki_mod
from gateway.identity.keyring import Keyring
from gateway.identity.keyring import load as load_keyring
from gateway.testbed.ports import free_ports

DEVICES = [f"plc-{i}" for i in range(1, 13)]


def fieldgate(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


class Proc:
    """A child process whose output goes to a file; stopped by its PID."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "wb")
        self.popen = subprocess.Popen(
            args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{pattern!r} not seen (exit {self.popen.poll()}):\n{self.output()[-3000:]}"
        )

    def stop(self, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                # Ask it where it is stuck before killing it, so the failure explains itself.
                os.kill(self.pid, signal.SIGUSR1)
                time.sleep(1)
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()
        self._out.close()
        return self.popen.returncode


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; whatever is still running at the end is stopped."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki") / "pki"
    pki_mod.init(root)
    pki_mod.issue(root, DEVICES)
    return root


@pytest.fixture(scope="session")
def keyring(pki_dir: Path) -> Keyring:
    p = pki_mod.Pki(pki_dir)
    return load_keyring(p.keyring, p.passphrase())


def start_hub(
    procs: list[Proc], tmp: Path, pki_dir: Path, *extra: str, port: int | None = None
) -> tuple[int, Path]:
    port = port or free_ports(1)
    record = tmp / "hub-record.jsonl"
    hub = Proc(
        fieldgate(
            "localhub",
            "--pki",
            str(pki_dir),
            "--port",
            str(port),
            "--record",
            str(record),
            "--broker-log",
            str(tmp / "broker.log"),
            "--quiet",
            *extra,
        ),
        tmp / f"hub-{len(procs)}.log",
    )
    procs.append(hub)
    hub.wait_for("local hub listening")
    return port, record


def start_simulator(
    procs: list[Proc], tmp: Path, pki_dir: Path, hub_port: int, devices: int, *extra: str
) -> tuple[Path, Proc]:
    base = free_ports(devices)
    config = tmp / "gateway.toml"
    sim = Proc(
        fieldgate(
            *simulator_argv(
                devices=devices,
                port=base,
                config=config,
                pki=pki_dir,
                hub_port=hub_port,
                state_dir=tmp / "state",
                extra=extra,
            )
        ),
        tmp / "sim.log",
    )
    procs.append(sim)
    sim.wait_for("simulated Modbus devices on")
    return config, sim


def start_ble_simulator(
    procs: list[Proc], tmp: Path, pki_dir: Path, hub_port: int, devices: int, *extra: str
) -> tuple[Path, Proc, str]:
    """Simulated peripherals behind a simulated bluetoothd; returns (config, process, bus)."""
    from adapters.ble.sim.bus import bus_address
    from adapters.ble.sim.run import simulator_argv as ble_argv

    config = tmp / "gateway.toml"
    bus_dir = tmp / "bus"
    sim = Proc(
        fieldgate(
            *ble_argv(
                devices=devices,
                bus_dir=bus_dir,
                config=config,
                pki=pki_dir,
                hub_port=hub_port,
                state_dir=tmp / "state",
                extra=extra,
            )
        ),
        tmp / "ble-sim.log",
    )
    procs.append(sim)
    sim.wait_for("simulated BLE peripherals")
    return config, sim, bus_address(bus_dir)


def ble_sim(address: str, call: str, *args: object) -> object:
    """Call the running BLE simulator's control interface (stats, set, drop_link, set_slots)."""
    import asyncio

    from adapters.ble.sim.control import SimControl

    async def go() -> object:
        async with SimControl(address) as control:
            return await getattr(control, call)(*args)

    return asyncio.run(go())


def wait_until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def opened_from(record: Path, keyring: Keyring) -> tuple[list[Opened], list[str], SequenceTracker]:
    tracker = SequenceTracker()
    opened, errors = open_all(read_record(record) if record.exists() else [], keyring, tracker)
    return opened, errors, tracker


def edit_config(path: Path, **sections: dict[str, object]) -> None:
    """Merge ``section={key: value}`` into a gateway config file."""
    import tomllib

    from gateway.config import render_toml

    doc = tomllib.loads(path.read_text())
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    path.write_text(render_toml(doc))


def store_report(state: Path) -> dict[str, object]:
    from gateway.store import status

    return status(state / "store.db")
