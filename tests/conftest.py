"""Shared fixtures: a development PKI, free loopback ports, and processes stopped by PID (the
testbed's harness, ``gateway/testbed/harness.py``)."""

from __future__ import annotations

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
from gateway.testbed.harness import (  # Proc, fieldgate: test modules import them from here
    BLE_READY,
    HUB_READY,
    MODBUS_READY,
    Proc,
    fieldgate,
    free_ports,
    hub_argv,
)

DEVICES = [f"plc-{i}" for i in range(1, 13)]


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
    argv = hub_argv(pki_dir, port, record, *extra, broker_log=tmp / "broker.log")
    _start(procs, argv, tmp / f"hub-{len(procs)}.log", HUB_READY)
    return port, record


def _start(procs: list[Proc], argv: list[str], log: Path, ready: str) -> Proc:
    """``fieldgate ARGV`` in the test's processes, once its output says ``ready``."""
    proc = Proc(fieldgate(*argv), log)
    procs.append(proc)
    proc.wait_for(ready)
    return proc


def start_simulator(
    procs: list[Proc], tmp: Path, pki_dir: Path, hub_port: int, devices: int, *extra: str
) -> tuple[Path, Proc]:
    config = tmp / "gateway.toml"
    argv = simulator_argv(
        devices=devices,
        port=free_ports(devices),
        config=config,
        pki=pki_dir,
        hub_port=hub_port,
        state_dir=tmp / "state",
        extra=extra,
    )
    return config, _start(procs, argv, tmp / "sim.log", MODBUS_READY)


def start_hostile(
    procs: list[Proc], tmp: Path, port: int, plan: str, stats: Path, *extra: str
) -> Proc:
    """The raw hostile Modbus device (:mod:`adapters.modbus.sim.hostile`) on ``port``, playing
    ``plan`` and keeping its counts in ``stats``, once it listens."""
    argv = [sys.executable, "-m", "adapters.modbus.sim.hostile", "--port", str(port)]
    argv += ["--plan", plan, "--stats", str(stats), *extra]
    proc = Proc(argv, tmp / "hostile.log")
    procs.append(proc)
    proc.wait_for("hostile Modbus device on")
    return proc


def add_modbus_device(
    config: Path,
    pki_dir: Path,
    device_id: str,
    port: int,
    points: list[dict[str, object]],
    *,
    timeout: float,
) -> None:
    """Append a Modbus device on its own loopback port (``identity = "none"``) to a gateway
    config file."""
    import tomllib

    from gateway.config import render_toml
    from gateway.testbed.simconfig import device_files

    doc = tomllib.loads(config.read_text())
    doc["devices"].append(
        {
            "id": device_id,
            **device_files(pki_dir, device_id),
            "modbus": {"host": "127.0.0.1", "port": port, "unit": 1, "timeout": timeout},
            "identity": "none",
            "points": points,
        }
    )
    config.write_text(render_toml(doc))


def start_ble_simulator(
    procs: list[Proc], tmp: Path, pki_dir: Path, hub_port: int, devices: int, *extra: str
) -> tuple[Path, Proc, str]:
    """Simulated peripherals behind a simulated bluetoothd; returns (config, process, bus)."""
    from adapters.ble.sim.bus import bus_address
    from adapters.ble.sim.run import simulator_argv as ble_argv

    config = tmp / "gateway.toml"
    bus_dir = tmp / "bus"
    argv = ble_argv(
        devices=devices,
        bus_dir=bus_dir,
        config=config,
        pki=pki_dir,
        hub_port=hub_port,
        state_dir=tmp / "state",
        extra=extra,
    )
    return config, _start(procs, argv, tmp / "ble-sim.log", BLE_READY), bus_address(bus_dir)


def ble_sim(address: str, call: str, *args: object) -> object:
    """Call the running BLE simulator's control interface (stats, set, drop_link, set_slots)."""
    import asyncio

    from adapters.ble.sim.control import SimControl

    async def go() -> object:
        async with SimControl(address) as control:
            return await getattr(control, call)(*args)

    return asyncio.run(go())


def wait_until(predicate: object, timeout: float, what: str) -> None:
    """Poll ``predicate`` until true. A store read between the gateway creating its file and
    writing its schema raises StoreNotReady: that is "not yet", not a failure."""
    from gateway.store.sqlite import StoreNotReady

    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except StoreNotReady:
            pass
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
