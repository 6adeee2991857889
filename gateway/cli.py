"""The ``fieldgate`` command. Each verb parses its arguments and calls one function elsewhere.

Exit codes: 0 done, 1 failed while running, 2 refused before starting (bad config or usage).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import runtime
from gateway.core.errors import EXIT_FAILED, EXIT_REFUSED, ConfigError, FieldgateError

if TYPE_CHECKING:
    from gateway.store import SeqMarks


def _setup_logging(level: str, worker: str | None = None) -> None:
    where = f"[worker {worker}] " if worker else ""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)-7s {where}%(name)s: %(message)s",
        stream=sys.stderr,
    )


# -- verbs ------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from gateway import config as config_mod
    from gateway.app import Gateway

    cfg = config_mod.load(args.config)
    os.umask(0o077)  # state files 0600, state folders 0700, whoever creates them
    if args.worker:
        from gateway.workers import parse_worker, worker_config

        cfg = worker_config(cfg, *parse_worker(args.worker))
    elif args.workers > 1:
        from gateway.workers import run_workers

        return run_workers(Path(args.config), args.workers, cfg)
    gateway = Gateway(cfg, adopt_stranded=not args.worker)

    async def main(stop: asyncio.Event) -> None:
        await gateway.run(stop)

    runtime.run(main)
    return 0


def cmd_pki_init(args: argparse.Namespace) -> int:
    from gateway.identity import pki

    root_key = Path(args.root_key) if args.root_key else None
    made = pki.init(Path(args.dir), root_key=root_key)
    print(f"DEVELOPMENT PKI created in {made.root}: for development and tests, not production")
    print(f"  trust root for the hub side: {made.root_cert}")
    print(f"  sealing keyring:             {made.keyring}")
    if made.passphrase_file.exists():
        print(f"  key passphrase (0600):       {made.passphrase_file} (beside the keys it unlocks)")
    if root_key is not None:
        print(f"  root key (0600, encrypted):  {root_key}")
    else:
        print("  root key:                    not kept (pass --root-key PATH to keep it elsewhere)")
    return 0


def cmd_pki_issue(args: argparse.Namespace) -> int:
    from gateway.identity import pki

    renewed = set(pki.existing(Path(args.dir), args.device_ids))
    for device_id in pki.issue(Path(args.dir), args.device_ids, days=args.days, renew=args.renew):
        p = pki.Pki(Path(args.dir))
        what = "renewed (new key: re-register a thumbprint) " if device_id in renewed else ""
        print(f"{device_id}: {what}{p.device_cert(device_id)} {p.device_key(device_id)}")
    return 0


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
    )


def cmd_simulate_modbus(args: argparse.Namespace) -> int:
    from adapters.modbus.sim.run import run_simulator

    return run_simulator(args)


def cmd_simulate_ble(args: argparse.Namespace) -> int:
    from adapters.ble.sim.run import run_simulator

    return run_simulator(args)


def cmd_open(args: argparse.Namespace) -> int:
    from gateway.open_cli import open_record

    return open_record(
        Path(args.record),
        pki_dir=Path(args.pki) if args.pki else None,
        keyring_path=Path(args.keyring) if args.keyring else None,
        as_json=args.json,
        summary=args.summary,
    )


def _store_paths(args: argparse.Namespace) -> list[Path]:
    """The store file given, or every store a config's gateway keeps (one per worker)."""
    if args.path:
        return [Path(args.path)]
    from gateway import config as config_mod
    from gateway.store.paths import stores_left

    return stores_left(config_mod.load(args.config, check_files=False))


def cmd_store_status(args: argparse.Namespace) -> int:
    import json

    from gateway import store

    reports = [store.status(path) for path in _store_paths(args)]
    if args.json:
        print(json.dumps(reports[0] if args.path else reports, indent=2))
        return 0
    for report in reports:
        print(
            f"{report['path']}: boot {report['boot_id']}, {report['envelopes']} envelopes, "
            f"{report['bytes']} bytes"
        )
        for device, row in report["devices"].items():
            dropped = row.get("dropped")
            age = row.get("oldest_age_s")
            print(
                f"  {device}: {row.get('envelopes', 0)} envelopes, {row.get('bytes', 0)} "
                f"bytes, oldest {'-' if age is None else f'{age} s'}, next seq "
                f"{row.get('next_seq', 0)}"
                + (
                    f", dropped {dropped['envelopes']} envelopes / {dropped['readings']} readings"
                    if dropped
                    else ""
                )
            )
    return 0


def _sequence_marks(args: argparse.Namespace) -> SeqMarks | None:
    """With --config and its passphrase at hand: the keys that authenticate sequence marks."""
    if not args.config:
        return None
    from gateway import config as config_mod
    from gateway.identity import keyring
    from gateway.store import SeqMarks

    try:
        cfg = config_mod.load(args.config, check_files=False)
        ring = keyring.load(cfg.sealing.keyring, cfg.secrets.passphrase())
    except (FieldgateError, OSError) as err:
        print(f"sequence marks not authenticated (no keyring: {err})", file=sys.stderr)
        return None
    return SeqMarks.from_sealing(cfg.sealing.key_id, ring.keys)


def cmd_store_verify(args: argparse.Namespace) -> int:
    from gateway import store

    marks = _sequence_marks(args)
    failed = False
    for path in _store_paths(args):
        problems = store.verify(path, marks)
        for line in problems:
            print(f"{path}: {line}", file=sys.stderr)
        print(f"{path}: {'sound' if not problems else f'{len(problems)} problems'}")
        failed = failed or bool(problems)
    return EXIT_FAILED if failed else 0


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


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldgate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", help="run the gateway from a config file")
    run.add_argument("--config", required=True, help="gateway TOML file")
    run.add_argument(
        "--workers", type=int, default=1, help="processes over disjoint device sets (one core each)"
    )
    run.add_argument("--worker", help=argparse.SUPPRESS)  # I/W: set by --workers
    run.set_defaults(func=cmd_run)

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

    pki = verbs.add_parser("pki", help="development PKI").add_subparsers(
        dest="pki_verb", required=True
    )
    init = pki.add_parser(
        "init", help="create a root, an intermediate, hub certificates and a sealing keyring"
    )
    init.add_argument("--dir", default="fieldgate-state/pki")
    init.add_argument(
        "--root-key",
        metavar="PATH",
        help="keep the root's key here, outside --dir (default: not kept)",
    )
    init.set_defaults(func=cmd_pki_init)
    issue = pki.add_parser("issue", help="issue device certificates (CN = device id)")
    issue.add_argument("--dir", default="fieldgate-state/pki")
    issue.add_argument("--days", type=int, default=365)
    issue.add_argument(
        "--renew", action="store_true", help="replace the certificate and key of existing ids"
    )
    issue.add_argument("device_ids", nargs="+")
    issue.set_defaults(func=cmd_pki_issue)

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
    hub.set_defaults(func=cmd_localhub)

    sim = verbs.add_parser("simulate", help="device simulators").add_subparsers(
        dest="sim_verb", required=True
    )
    modbus = sim.add_parser("modbus", help="simulated Modbus TCP devices, one port each")
    modbus.add_argument("--devices", type=int, default=5)
    modbus.add_argument("--host", default="127.0.0.1")
    modbus.add_argument("--port", type=int, default=15020, help="first device's port")
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
        help="dead | slow:SECONDS | exception:CODE | down",
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
    modbus.set_defaults(func=cmd_simulate_modbus)
    ble = sim.add_parser(
        "ble", help="simulated BLE peripherals behind a simulated bluetoothd on a private D-Bus"
    )
    from adapters.ble.sim.run import add_arguments

    add_arguments(ble)
    ble.set_defaults(func=cmd_simulate_ble)

    store = verbs.add_parser("store", help="inspect the durable store").add_subparsers(
        dest="store_verb", required=True
    )
    for name, func, text in (
        ("status", cmd_store_status, "depth per device, bytes, oldest age, drops"),
        ("verify", cmd_store_verify, "integrity check and envelope header sanity"),
    ):
        sub = store.add_parser(name, help=text)
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", help="the gateway config (its store)")
        where.add_argument("--path", help="a store file")
        if name == "status":
            sub.add_argument("--json", action="store_true")
        sub.set_defaults(func=func)

    opener = verbs.add_parser("open", help="open recorded envelopes and print the readings")
    opener.add_argument("record", help="a JSON-lines record written by `fieldgate localhub`")
    opener.add_argument("--pki", help="PKI folder holding keyring.json (and its passphrase)")
    opener.add_argument("--keyring", help="keyring file (passphrase from FIELDGATE_KEY_PASSPHRASE)")
    opener.add_argument("--json", action="store_true", help="one JSON reading per line")
    opener.add_argument(
        "--summary",
        action="store_true",
        help="no readings: one line per device (readings, duplicates, gaps, boots) and the "
        "total, on stdout",
    )
    opener.set_defaults(func=cmd_open)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, getattr(args, "worker", None))
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"fieldgate: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except FieldgateError as err:
        print(f"fieldgate: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:
        # A second SIGINT/SIGTERM/SIGHUP: stopped at once, without waiting for the flush.
        print("fieldgate: stopped without finishing (second signal)", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # `fieldgate open ... | head`: the reader left; that is not a failure.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
