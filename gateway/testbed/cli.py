"""The test tools' verbs: ``demo``, ``loadtest``, ``localhub``, ``hub`` and ``simulate modbus|ble``.

They plug into the one ``fieldgate`` command through the ``fieldgate.verbs`` entry-point group
(``pyproject.toml``); ``gateway/cli.py`` loads that group and never imports the testbed, so a
production install without the test tools simply lacks these verbs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_localhub(args: argparse.Namespace) -> int:
    from gateway.testbed.localhub.run import run_localhub

    return run_localhub(
        Path(args.pki),
        host=args.host,
        port=args.port,
        record=Path(args.record) if args.record else None,
        quiet=args.quiet,
        broker_log=Path(args.broker_log) if args.broker_log else None,
        persist=Path(args.persist) if args.persist else None,
        twins=Path(args.twins) if args.twins else None,
    )


def cmd_hub(args: argparse.Namespace) -> int:
    from gateway.testbed.localhub.tool import run_hub_tool

    return run_hub_tool(
        args.action,
        pki_dir=Path(args.pki),
        host=args.host,
        port=args.port,
        device=args.device,
        method=getattr(args, "method", None),
        payload=getattr(args, "payload", None),
        timeout=getattr(args, "timeout", 30.0),
        body=getattr(args, "body", None),
        message_id=getattr(args, "message_id", None),
        desired=getattr(args, "desired", None),
    )


def cmd_simulate_modbus(args: argparse.Namespace) -> int:
    from adapters.modbus.sim.run import run_simulator

    return run_simulator(args)


def cmd_simulate_ble(args: argparse.Namespace) -> int:
    from adapters.ble.sim.run import run_simulator

    return run_simulator(args)


def cmd_loadtest(args: argparse.Namespace) -> int:
    from gateway.testbed.loadtest.run import Plan, run_loadtest

    plan = Plan(
        modbus=args.modbus,
        ble=args.ble,
        ble_signals=args.ble_signals,
        points=args.points,
        rate=args.rate,
        duration=args.duration,
        ramp=args.ramp,
        workers=args.workers,
        types=args.types,
        max_age=args.max_age,
        out=Path(args.out),
        gateway_config=Path(args.gateway_config) if args.gateway_config else None,
        hub=args.hub,
        pki=Path(args.pki) if args.pki else None,
        stop_hub_after=args.stop_hub_after,
        live=not args.no_live,
    )
    return run_loadtest(plan)


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.testbed.demo import run_demo

    return run_demo(
        Path(args.state),
        devices=args.devices,
        points=args.points,
        ble=args.ble,
        duration=args.duration,
    )


# ``argparse._SubParsersAction`` is private; Any keeps the plug-in's signature honest about
# what it receives without naming it.
def add_verbs(verbs: Any) -> None:
    """Add the test tools' verbs to ``fieldgate``'s sub-command parsers."""
    demo = verbs.add_parser(
        "demo",
        help="PKI, local hub, simulated devices and the gateway, "
        "with a live view of what the hub receives",
    )
    demo.add_argument("--state", default="fieldgate-state", help="folder for PKI and config")
    demo.add_argument("--devices", type=int, default=5, help="simulated Modbus devices")
    demo.add_argument("--ble", type=int, default=3, help="simulated BLE peripherals")
    demo.add_argument("--points", type=int, default=9)
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    demo.set_defaults(func=cmd_demo)

    load = verbs.add_parser(
        "loadtest", help="measure a simulated fleet end to end: ramp, hold, stop, report"
    )
    load.add_argument("--modbus", type=int, default=10, help="simulated Modbus devices")
    load.add_argument(
        "--ble",
        type=int,
        default=0,
        help="simulated BLE peripherals (each notification carries 4 points)",
    )
    load.add_argument(
        "--ble-signals",
        action="store_true",
        help="the peripherals offer no AcquireNotify: notifications travel as D-Bus signals",
    )
    load.add_argument("--points", type=int, default=10, help="points per Modbus device")
    load.add_argument(
        "--rate",
        type=float,
        default=1.0,
        help="polls (Modbus) and notifications (BLE) per second per device",
    )
    load.add_argument("--duration", type=float, default=30.0, help="seconds to hold the load")
    load.add_argument("--ramp", type=float, default=5.0, help="seconds before the hold")
    load.add_argument("--workers", type=int, default=1, help="gateway processes")
    load.add_argument("--types", default="float32", help="point types of the simulated map")
    load.add_argument("--max-age", type=float, default=1.0, help="batching.max_age")
    load.add_argument("--out", default="loadtest-out", help="report folder")
    load.add_argument("--gateway-config", help="test this config instead of simulated devices")
    load.add_argument(
        "--hub",
        metavar="HOST:PORT",
        help="an existing stand-in (fieldgate localhub) instead of a new one",
    )
    load.add_argument("--pki", help="the PKI the hub and devices use (default: OUT/pki)")
    load.add_argument(
        "--stop-hub-after",
        type=float,
        metavar="SECONDS",
        help="fault injection: stop the hub for good after this long",
    )
    load.add_argument("--no-live", action="store_true", help="no live progress view")
    load.set_defaults(func=cmd_loadtest)

    hub = verbs.add_parser("localhub", help="run the local IoT Hub stand-in (mosquitto + consumer)")
    hub.add_argument("--pki", default="fieldgate-state/pki")
    hub.add_argument("--host", default="127.0.0.1")
    hub.add_argument("--port", type=int, default=8883)
    hub.add_argument("--record", help="append every message received to this JSON-lines file")
    hub.add_argument("--quiet", action="store_true", help="no periodic summary")
    hub.add_argument("--broker-log", help="write mosquitto's log (connections, refusals) here")
    hub.add_argument(
        "--persist",
        help="keep the broker's sessions and queued messages in this "
        "folder across restarts, as IoT Hub does",
    )
    hub.add_argument(
        "--twins",
        help="keep the device twins in this JSON file (default: the persist folder, else "
        "next to the record)",
    )
    hub.set_defaults(func=cmd_localhub)

    service = verbs.add_parser(
        "hub", help="the stand-in's service side: direct methods, C2D, twins"
    ).add_subparsers(dest="action", required=True)
    invoke = service.add_parser("invoke", help="call a direct method; prints status and body")
    invoke.add_argument("device")
    invoke.add_argument("method")
    invoke.add_argument("--payload", default="null", help="the method's JSON payload")
    invoke.add_argument("--timeout", type=float, default=30.0, help="seconds (504 after)")
    c2d = service.add_parser("c2d", help="send a cloud-to-device message")
    c2d.add_argument("device")
    c2d.add_argument("body", help="the message, JSON")
    c2d.add_argument("--message-id", help="reuse a message id (a redelivery)")
    twin = service.add_parser("twin", help="print a device's twin, after an optional update")
    twin.add_argument("device")
    twin.add_argument("--desired", help="a desired-properties patch, JSON (null deletes)")
    for sub in (invoke, c2d, twin):
        sub.add_argument("--pki", default="fieldgate-state/pki")
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=8883)
        sub.set_defaults(func=cmd_hub)

    sim = verbs.add_parser("simulate", help="device simulators").add_subparsers(
        dest="sim_verb", required=True
    )
    modbus = sim.add_parser("modbus", help="simulated Modbus TCP devices, one port each")
    modbus.add_argument("--devices", type=int, default=5)
    modbus.add_argument("--host", default="127.0.0.1")
    modbus.add_argument(
        "--port",
        type=int,
        default=15020,
        help="first device's port (--rtu-over-tcp, --gateway: the listener's port)",
    )
    modbus.add_argument("--points", type=int, default=9, help="points per device")
    modbus.add_argument(
        "--types", default=None, help="comma-separated point types (default: a mix of every type)"
    )
    modbus.add_argument("--period", type=float, default=1.0, help="poll period in the config")
    modbus.add_argument(
        "--step", type=float, default=1.0, help="seconds between value changes in the devices"
    )
    modbus.add_argument("--prefix", default="plc-", help="device id prefix")
    modbus.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="ID=KIND",
        help="dead | slow:SECONDS | exception:CODE[:N] (the first N requests) | down | crc:N "
        "(on a bus: every Nth answer with a bad CRC); on a bus ID may be a unit number",
    )
    modbus.add_argument(
        "--holes",
        action="append",
        default=[],
        metavar="ID=[TABLE:]ADDR[,...]",
        help="addresses (holding unless a table is named) that answer exception 02 to any read "
        "touching them",
    )
    modbus.add_argument(
        "--max-registers",
        type=int,
        default=None,
        help="every device answers exception 03 to a read of more registers (or bits)",
    )
    modbus.add_argument(
        "--busy-every",
        type=int,
        default=None,
        metavar="N",
        help="every device answers every Nth request with exception 06 (busy)",
    )
    modbus.add_argument(
        "--tls-roles",
        metavar="ROLE[,ROLE...]",
        default=None,
        help="serve Modbus/TCP Security: mutual TLS (client certificates from --pki's root), "
        "these roles served, others answered exception 01; issues the devices' certificates "
        "and the gateway's client identity fieldgate-modbus (the first role) in --pki",
    )
    modbus.add_argument(
        "--identity",
        choices=("none", "fc43", "registers", "both"),
        default="none",
        help="how the written config verifies each device: FC 43 objects, the serial in "
        "holding registers, both, or none (then run fieldgate enroll --config FILE)",
    )
    modbus.add_argument(
        "--no-fc43",
        action="append",
        default=[],
        metavar="ID",
        help="this device answers FC 43 (device identification) with exception 01",
    )
    modbus.add_argument(
        "--swap",
        metavar="ID,ID",
        help="on SIGUSR2 these two devices trade places (identity and values) and drop their "
        "connections, as when two units are swapped on site",
    )
    modbus.add_argument(
        "--write-config",
        metavar="FILE",
        help="also write a gateway config for these devices, once they listen; the devices "
        "keep serving until Ctrl-C or SIGTERM",
    )
    modbus.add_argument(
        "--pki", default="fieldgate-state/pki", help="PKI folder the written config points at"
    )
    modbus.add_argument("--hub-port", type=int, default=8883)
    modbus.add_argument("--max-age", type=float, default=1.0)
    modbus.add_argument("--state-dir", default=None)
    bus = modbus.add_argument_group(
        "serial buses",
        "units 1..N sharing one line instead of one TCP port per device; --fault then also "
        "takes a unit number (--fault 3=dead), and crc:N sends every Nth answer with a bad CRC",
    )
    where = bus.add_mutually_exclusive_group()
    where.add_argument(
        "--rtu",
        action="store_true",
        help="Modbus RTU on a serial line paced at --baud: a socat pty pair, the gateway opens "
        "the printed path",
    )
    where.add_argument(
        "--rtu-over-tcp",
        action="store_true",
        help="the same paced RTU line behind a TCP listener on --port (RTU frames, no MBAP)",
    )
    where.add_argument(
        "--gateway",
        action="store_true",
        help="a serial-to-Ethernet gateway: Modbus TCP on --port, the units behind it, one "
        "request at a time",
    )
    bus.add_argument("--units", type=int, default=None, help="units on the bus (default --devices)")
    bus.add_argument(
        "--baud",
        type=int,
        default=None,
        help="line speed (default 19200); with --gateway, pace answers as a bus behind it would",
    )
    bus.add_argument(
        "--parity",
        choices=("N", "E", "O"),
        default="N",
        help="the line's timing: 11 bits a character with parity, 10 without (default N: "
        "Linux refuses parity on a pty, so open it as 8N1 whatever this says)",
    )
    bus.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    bus.add_argument(
        "--serial-dir",
        default=None,
        help="--rtu: folder for the pty pair's links 'device' and 'gateway' (default: a temp "
        "folder)",
    )
    bus.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="TCP connections accepted at once; more are closed at once and counted (default: "
        "1 for --gateway, no limit for --rtu-over-tcp)",
    )
    bus.add_argument(
        "--target-timeout",
        type=float,
        default=0.5,
        help="--gateway: seconds it waits for a silent unit before the next request",
    )
    bus.add_argument(
        "--answer-timeout",
        action="store_true",
        help="--gateway: answer a silent unit with exception 0x0B after --target-timeout",
    )
    bus.add_argument(
        "--stats",
        metavar="FILE",
        help="keep FILE (JSON) with where to connect and the counters: requests per unit, "
        "overlaps, bad frames, refused connections",
    )
    modbus.set_defaults(func=cmd_simulate_modbus)
    ble = sim.add_parser(
        "ble", help="simulated BLE peripherals behind a simulated bluetoothd on a private D-Bus"
    )
    from adapters.ble.sim.run import add_arguments

    add_arguments(ble)
    ble.set_defaults(func=cmd_simulate_ble)
