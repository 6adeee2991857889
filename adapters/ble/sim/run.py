"""``fieldgate simulate ble``: a private D-Bus, a simulated bluetoothd and N peripherals;
optionally a matching gateway config."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.ble import gatt
from gateway.testbed import simconfig

if TYPE_CHECKING:
    from adapters.ble.sim.fleet import PeripheralSpec
from gateway.core.errors import ConfigError

SECRET_FILE = "ble-fleet.secret"
KEYS_DIR = "ble-keys"
CONFIG_BOND = {"passkey": "authenticated", "just-works": "just-works", "none": "none"}


def fleet_secret(pki_dir: Path) -> bytes:
    """The secret the simulated peripherals' challenge keys derive from (made once, 0600)."""
    path = pki_dir / SECRET_FILE
    if not path.exists():
        pki_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


def build_specs(args: argparse.Namespace) -> list[PeripheralSpec]:
    from adapters.ble.sim.fleet import apply_setting, make_specs

    specs = make_specs(
        args.devices,
        prefix=args.prefix,
        rate=args.rate,
        bond=args.bond,
        challenge=not args.no_challenge,
        rpa=args.rpa,
        unknown=args.unknown,
        secret=fleet_secret(Path(args.pki)),
    )
    by_id = {s.device_id: s for s in specs}
    for item in args.set:
        target, _, setting = item.partition(":")
        key, _, value = setting.partition("=")
        if target not in by_id:
            raise ConfigError("--set", [f"{item}: no simulated peripheral {target!r}"])
        try:
            apply_setting(by_id[target], key, value)
        except ValueError as err:
            raise ConfigError("--set", [f"{item}: {err}"]) from err
    return specs


def device_entry(
    spec: PeripheralSpec, bond: str, pki_dir: Path, poll_period: float, *, writable: bool = False
) -> dict[str, Any]:
    """The config of one allow-listed peripheral: identity, bond, challenge, decode table
    (``writable``: with the setpoint, polled and marked writable)."""
    ble: dict[str, Any] = {"bond": CONFIG_BOND[bond]}
    if spec.app_id is not None:
        ble["app_id"] = spec.app_id
    else:
        ble["address"] = spec.identity
    if bond == "passkey":
        ble["passkey"] = spec.passkey
    if spec.key is not None:
        key_file = pki_dir.resolve() / KEYS_DIR / f"{spec.device_id}.key"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(spec.key.hex() + "\n")
        ble["challenge"] = {"characteristic": gatt.CHALLENGE, "key_file": str(key_file)}
    ble["characteristics"] = [
        {
            "uuid": gatt.MEASUREMENT,
            "mode": "notify",
            "format": gatt.MEASUREMENT_FORMAT,
            "values": [
                {"name": "counter"},
                {"name": "temperature", "scale": 0.01, "unit": "degC"},
                {"name": "humidity", "scale": 0.01, "unit": "%RH"},
                {"name": "battery", "unit": "%"},
            ],
        },
        {
            "uuid": gatt.STATUS,
            "mode": "poll",
            "period": poll_period,
            "format": gatt.STATUS_FORMAT,
            "values": [
                {"name": "supply", "scale": 0.001, "unit": "V"},
                {"name": "uptime", "unit": "s"},
            ],
        },
    ]
    if writable:
        ble["characteristics"].append(
            {
                "uuid": gatt.SETPOINT,
                "mode": "poll",
                "period": poll_period,
                "format": gatt.SETPOINT_FORMAT,
                "values": [{"name": "setpoint", "scale": 0.01, "unit": "degC"}],
                "writable": True,
            }
        )
    return {"id": spec.device_id, **simconfig.device_files(pki_dir, spec.device_id), "ble": ble}


def write_config(args: argparse.Namespace, specs: list[PeripheralSpec]) -> Path:
    from adapters.ble.sim.bus import bus_address

    pki_dir = Path(args.pki)
    doc = simconfig.skeleton(
        pki_dir=pki_dir,
        hub_port=args.hub_port,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        max_age=args.max_age,
    )
    doc["ble"] = {"dbus_address": bus_address(Path(args.bus_dir)), "max_connections": args.slots}
    doc["devices"] = [
        device_entry(s, args.bond, pki_dir, args.poll_period, writable=args.writable)
        for s in specs
        if s.allowed
    ]
    return simconfig.write(doc, Path(args.write_config), pki_dir, merge=args.merge)


def run_simulator(args: argparse.Namespace) -> int:
    # The simulator (and dbus-fast) load only for this verb, not for every fieldgate command.
    from adapters.ble.sim.bluetoothd import BlueZSimulator
    from adapters.ble.sim.bus import PrivateBus

    specs = build_specs(args)
    if args.write_config:
        path = write_config(args, specs)
        print(f"wrote {path} for {sum(s.allowed for s in specs)} BLE devices", flush=True)

    async def main(stop: asyncio.Event) -> None:
        with PrivateBus(Path(args.bus_dir)) as bus:
            async with BlueZSimulator(
                bus.address, specs, slots=args.slots, acquire_notify=not args.signals_only
            ):
                print(
                    f"{len(specs)} simulated BLE peripherals ({args.unknown} not allow-listed) "
                    f"behind a simulated bluetoothd on {bus.address}; Ctrl-C stops",
                    flush=True,
                )
                await stop.wait()

    return simconfig.serve(main, "cannot start the BLE simulator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=5, help="allow-listed peripherals")
    parser.add_argument(
        "--bus-dir", default="fieldgate-state/ble-bus", help="folder of the private D-Bus socket"
    )
    parser.add_argument("--rate", type=float, default=1.0, help="notifications per second")
    parser.add_argument(
        "--bond",
        choices=["passkey", "just-works", "none"],
        default="passkey",
        help="what the peripherals support (passkey: authenticated bonds); the config asks for it",
    )
    parser.add_argument("--no-challenge", action="store_true", help="no HMAC challenge")
    parser.add_argument(
        "--rpa", type=int, default=0, help="the first N use private addresses and app ids"
    )
    parser.add_argument(
        "--unknown", type=int, default=0, help="extra peripherals that are not allow-listed"
    )
    parser.add_argument("--slots", type=int, default=10, help="the adapter's connection slots")
    parser.add_argument("--prefix", default="ble-", help="device id prefix")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ID:KEY=VALUE",
        help="per peripheral: bond=none|just-works|passkey, hmac=good|wrong|replay, "
        "notify=good|garbage|short, rate=HZ, connect-aborts=N, connect-delay=SECONDS, "
        "write-error=ATT-CODE|none (the setpoint refuses writes), write-delay=SECONDS",
    )
    parser.add_argument("--poll-period", type=float, default=10.0, help="status poll period")
    parser.add_argument(
        "--writable",
        action="store_true",
        help="the config also polls each peripheral's setpoint and marks it writable",
    )
    parser.add_argument(
        "--signals-only",
        action="store_true",
        help="offer no AcquireNotify: every notification is a D-Bus signal",
    )
    parser.add_argument("--write-config", metavar="FILE", help="write a gateway config too")
    parser.add_argument(
        "--merge", action="store_true", help="add to the devices FILE already has (Modbus too)"
    )
    parser.add_argument("--pki", default="fieldgate-state/pki")
    parser.add_argument("--hub-port", type=int, default=8883)
    parser.add_argument("--max-age", type=float, default=1.0)
    parser.add_argument("--state-dir", default=None)


def simulator_argv(
    *,
    devices: int,
    bus_dir: Path,
    config: Path,
    pki: Path,
    hub_port: int,
    state_dir: Path,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``fieldgate`` arguments that start ``devices`` simulated peripherals and write the
    matching gateway config (used by the demo, the tests and the benchmarks)."""
    return simconfig.argv(
        "ble", devices, config, pki, hub_port, state_dir, ("--bus-dir", str(bus_dir), *extra)
    )
