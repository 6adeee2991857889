"""Cloud commands under load: method round trips, and what they cost telemetry.

Runs `fieldgate localhub`, a simulated Modbus fleet and `fieldgate run` as separate processes,
then alternates two phases of ``--phase`` seconds each, ``--rounds`` times:

- quiet: telemetry only;
- commands: telemetry plus ``--calls`` direct method ``write`` calls per second (hub -> gateway
  -> simulated Modbus write -> read back -> answer), spread over the devices.

It prints one JSON document: method round trip p50/p99 (measured at the service side, as a
cloud caller sees it), telemetry latency p50/p99 (the gateway's read timestamp to arrival at the
hub) per phase kind, their ratio, and the gateway's CPU per phase. Medians over the rounds.

    python benchmarks/commands.py --devices 100 --points 60 --rate 10
    python benchmarks/commands.py --rtu 8 --baud 19200 --points 10 --rate 2   # a serial bus
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from gateway.config import render_toml
from gateway.consumer import SequenceTracker, open_all, read_record
from gateway.identity import pki as pki_mod
from gateway.identity.keyring import load as load_keyring
from gateway.testbed.harness import (
    HUB_READY,
    MODBUS_READY,
    Proc,
    free_ports,
    hub_argv,
    machine,
    modbus_load_argv,
    start_logged,
)
from gateway.testbed.loadtest.procstat import usage
from gateway.testbed.loadtest.stats import percentile as nearest_rank
from gateway.testbed.localhub.control import HubControl

STOP_GRACE = 30.0
POINT = "float32_0"  # the simulated map's first point: a float32 holding register


def percentile(values: list[float], q: float) -> float | None:
    found = nearest_rank(values, q)
    return None if found is None else round(found, 2)


async def is_up(hub: HubControl, device: str) -> bool:
    status, body = await hub.invoke(device, "status", None, timeout=30)
    return status == 200 and body.get("state") == "up"


async def drive(
    pki: pki_mod.Pki, port: int, devices: list[str], args: argparse.Namespace, cpu: Any
) -> list[dict[str, Any]]:
    phases: list[dict[str, Any]] = []
    async with HubControl(pki, "127.0.0.1", port) as hub:
        async with asyncio.timeout(120):
            # Other processes' state: nothing here to wait on but asking again.
            while not all(hub.connected(d) for d in devices):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            for device in devices:  # every device polled: a write now reaches it
                while not await is_up(hub, device):  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
        await asyncio.sleep(args.warmup)
        for _ in range(args.rounds):
            for kind in ("quiet", "commands"):
                phases.append(await phase(hub, kind, devices, args, cpu))
    return phases


async def phase(
    hub: HubControl, kind: str, devices: list[str], args: argparse.Namespace, cpu: Any
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    t0, cpu0 = time.time(), cpu()
    trips: list[float] = []
    statuses: dict[int, int] = {}
    calls: list[asyncio.Task[None]] = []

    async def call(device: str) -> None:
        start = time.perf_counter()
        value = round(random.uniform(-100, 100), 2)
        status, _ = await hub.invoke(device, "write", {"point": POINT, "value": value}, timeout=30)
        trips.append((time.perf_counter() - start) * 1000)
        statuses[status] = statuses.get(status, 0) + 1

    end = loop.time() + args.phase
    if kind == "commands":
        interval = 1 / args.calls
        next_at = loop.time()
        i = 0
        while next_at < end:
            calls.append(asyncio.create_task(call(devices[i % len(devices)])))
            i += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await asyncio.gather(*calls)
    await asyncio.sleep(max(0.0, end - loop.time()))
    return {
        "kind": kind,
        "t0": t0,
        "t1": time.time(),
        "cpu_s": cpu() - cpu0,
        "trips_ms": trips,
        "statuses": statuses,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fieldgate-bench-commands-"))
    pki_dir = work / "pki"
    pki_mod.init(pki_dir)
    hub_port = free_ports(1)
    record = work / "record.jsonl"
    procs: list[Proc] = []

    def start(name: str, argv: list[str], ready: str | None = None) -> Proc:
        return start_logged(procs, work, name, argv, ready, timeout=120)

    try:
        start("hub", hub_argv(pki_dir, hub_port, record), HUB_READY)
        config = work / "gateway.toml"
        argv = modbus_load_argv(
            devices=args.rtu or args.devices,
            config=config,
            pki=pki_dir,
            hub_port=hub_port,
            state_dir=work / "state",
            points=args.points,
            types="float32",
            rate=args.rate,
            max_age=args.max_age,
        )
        if args.rtu:
            argv += ["--rtu", "--units", str(args.rtu), "--baud", str(args.baud)]
        start("sim", argv, MODBUS_READY)
        doc = tomllib.loads(config.read_text())
        for device in doc["devices"]:
            device["control"] = {
                "channels": ["method"],
                "max_writes_per_minute": 6000,
                "writes": {POINT: {}},
            }
        config.write_text(render_toml(doc))
        devices = [d["id"] for d in doc["devices"]]
        gateway = start("gateway", ["--log-level", "warning", "run", "--config", str(config)])
        pki = pki_mod.Pki(pki_dir)
        phases = asyncio.run(drive(pki, hub_port, devices, args, lambda: usage(gateway.pid)[0]))
        code = gateway.stop(STOP_GRACE)
        time.sleep(1.0)
    finally:
        for proc in reversed(procs):
            proc.stop(STOP_GRACE)

    p = pki_mod.Pki(pki_dir)
    ring = load_keyring(p.keyring, p.passphrase())
    tracker = SequenceTracker()
    opened, errors = open_all(read_record(record), ring, tracker)
    for ph in phases:
        window = [o for o in opened if ph["t0"] <= o.received < ph["t1"]]
        latencies = [o.received * 1000 - r.ts_ms for o in window for r in o.readings[::10]]
        points = sum(len(o.readings) for o in window)
        ph["telemetry_p50_ms"] = percentile(latencies, 0.5)
        ph["telemetry_p99_ms"] = percentile(latencies, 0.99)
        ph["points_per_s"] = round(points / (ph["t1"] - ph["t0"]))
        ph["cpu_s_per_1M_points"] = round(ph["cpu_s"] / points * 1e6, 2) if points else None
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    def median(kind: str, key: str) -> float | None:
        values = [ph[key] for ph in phases if ph["kind"] == kind and ph[key] is not None]
        return round(statistics.median(values), 2) if values else None

    trips = [t for ph in phases for t in ph["trips_ms"]]
    statuses: dict[str, int] = {}
    for ph in phases:
        for status, n in ph["statuses"].items():
            statuses[str(status)] = statuses.get(str(status), 0) + n
    quiet_p99 = median("quiet", "telemetry_p99_ms")
    busy_p99 = median("commands", "telemetry_p99_ms")
    return {
        "profile": {
            "devices": len(devices),
            "link": f"rtu {args.baud} baud, {args.rtu} units"
            if args.rtu
            else "tcp, one per device",
            "points": args.points,
            "rate_hz": args.rate,
            "calls_per_s": args.calls,
            "phase_s": args.phase,
            "rounds": args.rounds,
        },
        "machine": machine(),
        "method_round_trip_ms": {
            "calls": len(trips),
            "p50": percentile(trips, 0.5),
            "p99": percentile(trips, 0.99),
            "statuses": statuses,
        },
        "telemetry_latency_ms": {
            "quiet_p50": median("quiet", "telemetry_p50_ms"),
            "quiet_p99": quiet_p99,
            "commands_p50": median("commands", "telemetry_p50_ms"),
            "commands_p99": busy_p99,
            "p99_ratio_commands_to_quiet": round(busy_p99 / quiet_p99, 3)
            if quiet_p99 and busy_p99
            else None,
        },
        "delivered_points_per_s": {
            "quiet": median("quiet", "points_per_s"),
            "commands": median("commands", "points_per_s"),
        },
        "gateway_cpu_s_per_1M_points": {
            "quiet": median("quiet", "cpu_s_per_1M_points"),
            "commands": median("commands", "cpu_s_per_1M_points"),
        },
        "sequence_gaps": sum(len(g) for g in tracker.gaps().values()),
        "refused_envelopes": len(errors),
        "gateway_exit_code": code,
        "work_dir": str(work) if args.keep else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--points", type=int, default=60)
    parser.add_argument("--rate", type=float, default=10.0, help="polls per second per device")
    parser.add_argument("--calls", type=float, default=10.0, help="method calls per second")
    parser.add_argument("--phase", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--max-age", type=float, default=1.0)
    parser.add_argument("--rtu", type=int, default=0, metavar="UNITS", help="a serial bus")
    parser.add_argument("--baud", type=int, default=19200)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, record)")
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()
