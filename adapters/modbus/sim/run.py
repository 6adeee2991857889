"""``fieldgate simulate modbus``: start simulated devices, optionally write a matching config.

Four ways to put them on the wire:

- default: Modbus TCP, one port per device (``--devices N --port FIRST``);
- ``--rtu``: units 1..N on one paced RTU serial line, a socat pty pair (``--baud``,
  ``--parity``, ``--stopbits``, ``--serial-dir``); the gateway opens the printed path;
- ``--rtu-over-tcp``: the same line behind a TCP listener (RTU frames with CRC, no MBAP);
- ``--gateway``: a serial-to-Ethernet gateway: Modbus TCP on one port, units behind it, one
  request at a time, ``--max-connections`` (default 1).

In the three bus modes ``--units N`` sets how many units (default ``--devices``), ``--fault``
takes a device id or a unit number (``--fault 3=dead``), and ``--stats FILE`` keeps a JSON
file with where to connect and the line's counters (requests per unit, overlaps, bad frames),
rewritten while it runs and once more at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from adapters.modbus.sim.devices import (
    DeviceSpec,
    SimTls,
    SimulatedFleet,
    gateway_config,
    make_points,
)
from adapters.modbus.sim.rtuframe import LineTiming
from gateway.core.errors import ConfigError
from gateway.testbed import simconfig

FAULT_KINDS = ("dead", "slow:", "exception:", "down", "crc:")
BUS_MODES = ("rtu", "rtu_over_tcp", "gateway")
# Options that mean nothing to the TCP devices (one port each): given without a bus mode, an error.
BUS_ONLY = ("--units", "--baud", "--serial-dir", "--max-connections", "--answer-timeout")
DEFAULT_BAUD = 19200
STATS_EVERY = 0.25  # seconds between rewrites of --stats FILE while the counters change


def bus_mode(args: argparse.Namespace) -> str | None:
    """Which bus mode the arguments ask for (``rtu``, ``rtu_over_tcp``, ``gateway``), if any."""
    chosen = [m for m in BUS_MODES if getattr(args, m, False)]
    return chosen[0] if chosen else None


def build_specs(args: argparse.Namespace) -> list[DeviceSpec]:
    types = [t.strip() for t in args.types.split(",")] if args.types else None
    mode = bus_mode(args)
    count = args.devices
    if mode is None:
        for flag in BUS_ONLY:
            if getattr(args, flag.lstrip("-").replace("-", "_"), None) not in (None, False):
                raise ConfigError(
                    flag, [f"{flag} is for a bus: add --rtu, --rtu-over-tcp or --gateway"]
                )
    else:
        if mode == "rtu" and args.max_connections is not None:
            raise ConfigError("--max-connections", ["a serial line has no connections to limit"])
        count = args.units if getattr(args, "units", None) is not None else args.devices
        if not 1 <= count <= 247:
            raise ConfigError("--units", [f"{count}: a bus carries 1 to 247 units"])
    specs = [
        DeviceSpec(
            f"{args.prefix}{i + 1}",
            args.port + i if mode is None else args.port,
            unit=1 if mode is None else i + 1,
            points=make_points(args.points, types=types, period=args.period, seed=i),
        )
        for i in range(count)
    ]
    by_id = {s.device_id: s for s in specs}
    if mode is not None:  # on a bus a unit number names a device too
        by_id.update({str(s.unit): s for s in specs})
    for item in args.fault:
        device_id, _, kind = item.partition("=")
        if device_id not in by_id:
            raise ConfigError("--fault", [f"{item}: no simulated device {device_id!r}"])
        if not kind.startswith(FAULT_KINDS) or not _fault_ok(kind):
            raise ConfigError(
                "--fault",
                [
                    f"{item}: fault must be one of dead, slow:SECONDS, exception:CODE[:N], down, "
                    "crc:N (every Nth RTU answer with a bad CRC)"
                ],
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


def _fault_ok(kind: str) -> bool:
    """The numbers in a fault parse (``crc:N`` needs N >= 1)."""
    try:
        if kind.startswith("crc:"):
            return int(kind[4:]) >= 1
        if kind.startswith("slow:"):
            return float(kind[5:]) >= 0
        if kind.startswith("exception:"):
            return all(int(p) >= 0 for p in kind.split(":")[1:])
    except ValueError:
        return False
    return kind in ("dead", "down")


def _hole(text: str) -> tuple[str, int]:
    table, _, address = text.rpartition(":")
    if table not in ("", "holding", "input", "coil", "discrete"):
        raise ValueError(text)
    return table or "holding", int(address)


def write_config(
    args: argparse.Namespace, specs: list[DeviceSpec], link: dict[str, Any] | None = None
) -> Path:
    doc = gateway_config(
        specs,
        host=args.host,
        pki_dir=Path(args.pki),
        hub_port=args.hub_port,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        max_age=args.max_age,
        identity=getattr(args, "identity", "none"),
        link=link,
    )
    return simconfig.write(doc, Path(args.write_config), Path(args.pki))


def link_entry(mode: str, where: dict[str, Any], name: str = "sim-bus") -> dict[str, Any]:
    """The gateway's ``[[links]]`` entry for a running bus (its config schema: branch links)."""
    if mode == "rtu":
        return {
            "name": name,
            "type": "rtu",
            "port": where["port"],
            "baud": where["baud"],
            # A pty cannot be opened with parity on Linux (EINVAL): the gateway opens it 8N1
            # and the parity asked for is the simulated line's timing only.
            "parity": "N",
            "stop_bits": where["stopbits"],
        }
    kind = "rtu-over-tcp" if mode == "rtu_over_tcp" else "tcp"
    return {"name": name, "type": kind, "host": where["host"], "port": where["tcp_port"]}


def run_simulator(args: argparse.Namespace) -> int:
    specs = build_specs(args)
    mode = bus_mode(args)
    if mode is not None:
        return _run_bus(args, mode, specs)

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
            await _keep_stats(Path(args.stats) if args.stats else None, fleet.stats, stop)

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


@contextlib.asynccontextmanager
async def _serve_bus(
    args: argparse.Namespace, mode: str, specs: list[DeviceSpec]
) -> AsyncIterator[tuple[dict[str, Any], Any]]:
    """Start the bus ``mode`` asks for; yields (where to connect, the thing with ``stats()``)."""
    from adapters.modbus.sim.bus import MbapGateway, RtuBus, RtuOverTcp, rtu_line

    timing = line_timing(args)
    line = {"baud": timing.baud, "parity": timing.parity, "stopbits": timing.stopbits}
    if mode == "rtu":
        with contextlib.ExitStack() as tmp:
            folder = (
                Path(args.serial_dir)
                if args.serial_dir
                else Path(tmp.enter_context(tempfile.TemporaryDirectory(prefix="fieldgate-rtu-")))
            )
            async with rtu_line(specs, folder, timing, step=args.step) as sim:
                yield {"mode": "rtu", "port": str(sim.path), **line}, sim.bus
        return
    if mode == "rtu_over_tcp":
        async with (
            RtuBus(specs, timing, step=args.step, mode="rtu-over-tcp") as bus,
            RtuOverTcp(bus, args.host, args.port, max_connections=args.max_connections) as srv,
        ):
            yield {"mode": "rtu-over-tcp", "host": args.host, "tcp_port": srv.port, **line}, bus
        return
    async with MbapGateway(
        specs,
        args.host,
        args.port,
        max_connections=args.max_connections or 1,
        timing=timing if args.baud is not None else None,
        target_timeout=args.target_timeout,
        answer_timeout=args.answer_timeout,
        step=args.step,
    ) as gw:
        where = {"mode": "gateway", "host": args.host, "tcp_port": gw.port}
        yield ({**where, **line} if args.baud is not None else where), gw


def line_timing(args: argparse.Namespace) -> LineTiming:
    """The line's timing from ``--baud`` (default 19,200), ``--parity``, ``--stopbits``."""
    from adapters.modbus.sim.rtuframe import LineTiming

    baud = args.baud if args.baud is not None else DEFAULT_BAUD
    try:
        return LineTiming(baud, args.parity, args.stopbits)
    except ValueError as err:
        raise ConfigError("--baud/--parity/--stopbits", [str(err)]) from None


def _describe(where: dict[str, Any], specs: list[DeviceSpec], args: argparse.Namespace) -> str:
    units = f"units {specs[0].unit}-{specs[-1].unit}" if len(specs) > 1 else f"unit {specs[0].unit}"
    line = f"{where.get('baud')} baud 8{where.get('parity')}{where.get('stopbits')}"
    if where["mode"] == "rtu":
        place = f"serial {where['port']} (RTU, {line}, {units})"
    elif where["mode"] == "rtu-over-tcp":
        place = f"rtu-over-tcp {where['host']}:{where['tcp_port']} (RTU frames, {line}, {units})"
    else:
        limit = args.max_connections or 1
        behind = f", {line} behind" if "baud" in where else ""
        place = (
            f"gateway {where['host']}:{where['tcp_port']} (Modbus TCP, {units}{behind}, "
            f"{limit} connection{'s' if limit > 1 else ''} at most)"
        )
    return (
        f"{len(specs)} simulated Modbus devices on {place}, {args.points} points each; Ctrl-C stops"
    )


async def _keep_stats(
    stats_file: Path | None, snapshot: Callable[[], dict[str, Any]], stop: asyncio.Event
) -> None:
    """Until ``stop``: rewrite ``stats_file`` (if any) whenever the counters changed, at most
    every STATS_EVERY, and once more at the end."""
    from adapters.modbus.sim.bus import write_stats

    if stats_file is None:
        await stop.wait()
        return
    last = snapshot()
    write_stats(stats_file, last)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATS_EVERY)
        now = snapshot()
        if now != last:
            write_stats(stats_file, now)
            last = now
    write_stats(stats_file, snapshot())


def _run_bus(args: argparse.Namespace, mode: str, specs: list[DeviceSpec]) -> int:
    from adapters.modbus.sim.bus import write_stats

    stats_file = Path(args.stats) if args.stats else None
    line_timing(args)  # a bad line setting is a usage error, before anything starts

    async def main(stop: asyncio.Event) -> None:
        async with _serve_bus(args, mode, specs) as (where, sim):

            def snapshot() -> dict[str, Any]:
                return {"endpoint": where, **sim.stats()}

            if stats_file is not None:
                write_stats(stats_file, snapshot())
            if args.write_config:
                path = write_config(args, specs, link_entry(mode, where))
                print(f"wrote {path} for {len(specs)} devices", flush=True)
            print(_describe(where, specs, args), flush=True)
            await _keep_stats(stats_file, snapshot, stop)

    return simconfig.serve(main, "cannot start the simulated bus")
