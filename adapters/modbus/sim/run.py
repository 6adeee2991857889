"""``fieldgate simulate modbus``: start simulated devices, optionally write a matching config."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from adapters.modbus.sim.devices import (
    DeviceSpec,
    SimTls,
    SimulatedFleet,
    gateway_config,
    make_points,
)
from gateway.core.errors import ConfigError
from gateway.testbed import simconfig

FAULT_KINDS = ("dead", "slow:", "exception:", "down")


def build_specs(args: argparse.Namespace) -> list[DeviceSpec]:
    types = [t.strip() for t in args.types.split(",")] if args.types else None
    specs = [
        DeviceSpec(
            f"{args.prefix}{i + 1}",
            args.port + i,
            points=make_points(args.points, types=types, period=args.period, seed=i),
        )
        for i in range(args.devices)
    ]
    by_id = {s.device_id: s for s in specs}
    for item in args.fault:
        device_id, _, kind = item.partition("=")
        if device_id not in by_id:
            raise ConfigError("--fault", [f"{item}: no simulated device {device_id!r}"])
        if not kind.startswith(FAULT_KINDS):
            raise ConfigError(
                "--fault",
                [f"{item}: fault must be one of dead, slow:SECONDS, exception:CODE[:N], down"],
            )
        by_id[device_id].fault = kind
    for item in getattr(args, "holes", ()):
        device_id, _, where = item.partition("=")
        if device_id not in by_id:
            raise ConfigError("--holes", [f"{item}: no simulated device {device_id!r}"])
        try:
            holes = frozenset(_hole(a) for a in where.split(","))
        except ValueError:
            raise ConfigError(
                "--holes", [f"{item}: each hole is ADDRESS (holding) or TABLE:ADDRESS"]
            ) from None
        by_id[device_id].holes |= holes
    for spec in specs:
        spec.max_registers = getattr(args, "max_registers", None)
        spec.busy_every = getattr(args, "busy_every", None)
    for device_id in getattr(args, "no_fc43", ()):
        if device_id not in by_id:
            raise ConfigError("--no-fc43", [f"no simulated device {device_id!r}"])
        by_id[device_id].fc43_exception = True
    swap = getattr(args, "swap", None)
    if swap:
        pair = swap.split(",")
        if len(pair) != 2 or any(p not in by_id for p in pair) or pair[0] == pair[1]:
            raise ConfigError("--swap", [f"{swap}: name two different simulated devices, ID,ID"])
    roles = getattr(args, "tls_roles", None)
    if roles:
        tls_identities(specs, Path(args.pki), args.host, roles)
    return specs


GATEWAY_MODBUS_CLIENT = "fieldgate-modbus"


def tls_identities(specs: list[DeviceSpec], pki_dir: Path, host: str, roles: str) -> None:
    """Modbus/TCP Security for every device: a server certificate each (issued by the PKI's
    intermediate, naming ``host``; kept in ``PKI/modbus-sim/``), clients' certificates
    required from the PKI's root, ``roles`` (comma-separated) served; the gateway's client
    identity ``fieldgate-modbus`` issued with the first role if the PKI lacks it."""
    from gateway.identity import pki as pki_mod
    from gateway.testbed.certs import issue_leaf

    allowed = [r.strip() for r in roles.split(",") if r.strip()]
    if not allowed:
        raise ConfigError("--tls-roles", ["name at least one role"])
    pki = pki_mod.Pki(pki_dir)
    if not pki_mod.existing(pki_dir, [GATEWAY_MODBUS_CLIENT]):
        pki_mod.issue(pki_dir, [GATEWAY_MODBUS_CLIENT], modbus_role=allowed[0])
    for spec in specs:
        cert = pki_dir / "modbus-sim" / f"{spec.device_id}.pem"
        key = cert.with_suffix(".key")
        if not cert.exists():
            names, ips = ([], [host]) if _is_ip(host) else ([host], [])
            issue_leaf(
                pki_dir, cert, key, cn=spec.device_id, server=True, names=names, ips=ips,
                encrypt=False,
            )  # fmt: skip
        spec.tls = SimTls(
            cert,
            key,
            pki.root_cert,
            frozenset(allowed),
            pki.device_cert(GATEWAY_MODBUS_CLIENT),
            pki.device_key(GATEWAY_MODBUS_CLIENT),
        )


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _swap(fleet: SimulatedFleet, first: str, second: str) -> None:
    fleet.swap(first, second)
    print(f"swapped {first} and {second}", flush=True)


def _hole(text: str) -> tuple[str, int]:
    table, _, address = text.rpartition(":")
    if table not in ("", "holding", "input", "coil", "discrete"):
        raise ValueError(text)
    return table or "holding", int(address)


def write_config(args: argparse.Namespace, specs: list[DeviceSpec]) -> Path:
    doc = gateway_config(
        specs,
        host=args.host,
        pki_dir=Path(args.pki),
        hub_port=args.hub_port,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        max_age=args.max_age,
        identity=getattr(args, "identity", "none"),
    )
    return simconfig.write(doc, Path(args.write_config), Path(args.pki))


def run_simulator(args: argparse.Namespace) -> int:
    specs = build_specs(args)

    async def main(stop: asyncio.Event) -> None:
        async with SimulatedFleet(specs, host=args.host, step=args.step) as fleet:
            swap = getattr(args, "swap", None)
            if swap:
                first, second = swap.split(",")
                asyncio.get_running_loop().add_signal_handler(
                    signal.SIGUSR2, _swap, fleet, first, second
                )
            # Written once every device listens: a simulator that cannot start leaves no
            # config behind for devices that are not there.
            if args.write_config:
                path = write_config(args, specs)
                print(f"wrote {path} for {len(specs)} devices", flush=True)
            last = specs[-1].port
            secure = "" if specs[0].tls is None else " (Modbus/TCP Security)"
            print(
                f"{len(specs)} simulated Modbus devices on {args.host}:{args.port}-{last}"
                f"{secure}, {args.points} points each; Ctrl-C stops",
                flush=True,
            )
            await stop.wait()

    return simconfig.serve(main, "cannot listen")


def simulator_argv(
    *,
    devices: int,
    port: int,
    config: Path,
    pki: Path,
    hub_port: int,
    state_dir: Path,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """``fieldgate`` arguments that start ``devices`` simulated devices from ``port`` on and
    write the matching gateway config (used by the demo, the tests and the benchmarks)."""
    return simconfig.argv(
        "modbus", devices, config, pki, hub_port, state_dir, ("--port", str(port), *extra)
    )
