"""End-to-end throughput: simulated Modbus fleet -> `fieldgate run` -> local hub stand-in.

Runs the simulator, the hub stand-in and the gateway as separate processes on loopback, holds a
fixed profile, and prints one JSON document measured at the hub side:

- points/s delivered and opened at the hub (steady window, after warm-up);
- gateway CPU seconds per 1M points and points per gateway CPU-second (one core's capacity);
- gateway RSS (current and peak);
- p50/p99 latency from the gateway's read timestamp to arrival at the hub;
- MQTT messages and 4 KB units per 1,000 points, and the packing minimum for comparison;
- sequence gaps and duplicates (must be 0).

    python benchmarks/e2e.py --devices 100 --points 60 --rate 10 --duration 30
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

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

UNIT = 4096
# Seconds a child has to stop after SIGTERM before it is killed.
STOP_GRACE = 30.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="fieldgate-bench-"))
    pki_dir = work / "pki"
    pki_mod.init(pki_dir)
    hub_port = free_ports(1)
    record = work / "record.jsonl"
    procs: list[Proc] = []

    def start(name: str, argv: list[str], ready: str | None = None) -> Proc:
        return start_logged(procs, work, name, argv, ready, timeout=60)

    try:
        start("hub", hub_argv(pki_dir, hub_port, record), HUB_READY)
        config = work / "gateway.toml"
        start(
            "sim",
            modbus_load_argv(
                devices=args.devices,
                config=config,
                pki=pki_dir,
                hub_port=hub_port,
                state_dir=work / "state",
                points=args.points,
                types=args.types,
                rate=args.rate,
                max_age=args.max_age,
            ),
            MODBUS_READY,
        )
        doc = tomllib.loads(config.read_text())
        doc["store"] = {"kind": args.store}
        config.write_text(render_toml(doc))
        gateway = start("gateway", ["--log-level", "warning", "run", "--config", str(config)])
        time.sleep(args.warmup)
        t0, (cpu0, _, _) = time.time(), usage(gateway.pid)
        time.sleep(args.duration)
        t1, (cpu1, rss_now, rss_peak) = time.time(), usage(gateway.pid)
        code = gateway.stop(STOP_GRACE)
        time.sleep(1.0)
    finally:
        for proc in reversed(procs):
            proc.stop(STOP_GRACE)

    p = pki_mod.Pki(pki_dir)
    ring = load_keyring(p.keyring, p.passphrase())
    tracker = SequenceTracker()
    messages = read_record(record)
    opened, errors = open_all(messages, ring, tracker)
    window = [o for o in opened if t0 <= o.received < t1]
    points = sum(len(o.readings) for o in window)
    body_bytes = [len(body) for topic, body, received in messages if t0 <= received < t1]
    sizes = [
        len(body) + len(topic.split("/", 4)[4])
        for topic, body, received in messages
        if t0 <= received < t1
    ]
    latencies = [o.received * 1000 - r.ts_ms for o in window for r in o.readings[::10]]
    units = sum(math.ceil(s / UNIT) for s in sizes)
    seconds = t1 - t0
    cpu = cpu1 - cpu0
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "store": args.store,
        "profile": {
            "devices": args.devices,
            "points": args.points,
            "rate_hz": args.rate,
            "types": args.types,
            "max_age_s": args.max_age,
            "offered_points_per_s": args.devices * args.points * args.rate,
            "duration_s": round(seconds, 1),
            "warmup_s": args.warmup,
        },
        "machine": machine(),
        "delivered_points_per_s": round(points / seconds),
        "gateway_cpu_fraction": round(cpu / seconds, 3),
        "gateway_cpu_s_per_1M_points": round(cpu / points * 1e6, 2) if points else None,
        "points_per_gateway_cpu_s": round(points / cpu) if cpu else None,
        "gateway_rss_mb": round(rss_now, 1),
        "gateway_peak_rss_mb": round(rss_peak, 1),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.5), 1),
            "p99": round(percentile(latencies, 0.99), 1),
        }
        if latencies
        else None,
        "messages_per_1k_points": round(len(sizes) / points * 1000, 3) if points else None,
        "units_4k_per_1k_points": round(units / points * 1000, 3) if points else None,
        "packing_min_units_per_1k_points": round(sum(sizes) / UNIT / points * 1000, 3)
        if points
        else None,
        "mean_message_bytes": round(statistics.mean(sizes)) if sizes else None,
        "mean_body_bytes": round(statistics.mean(body_bytes)) if body_bytes else None,
        "sequence_gaps": sum(len(g) for g in tracker.gaps().values()),
        "duplicates": tracker.duplicates,
        "refused_envelopes": len(errors),
        "gateway_exit_code": code,
        "work_dir": str(work) if args.keep else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--points", type=int, default=60)
    parser.add_argument("--rate", type=float, default=10.0, help="polls per second per device")
    parser.add_argument("--types", default="float32")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--max-age", type=float, default=1.0)
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument(
        "--compare",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="alternate memory and sqlite runs ROUNDS times; print the ratio of "
        "their median gateway CPU per point",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, record)")
    args = parser.parse_args()
    if not args.compare:
        print(json.dumps(run(args), indent=2))
        return
    runs: dict[str, list[dict[str, object]]] = {"memory": [], "sqlite": []}
    for _ in range(args.compare):
        for kind in ("memory", "sqlite"):
            args.store = kind
            runs[kind].append(run(args))
    cost = {
        k: statistics.median(float(r["gateway_cpu_s_per_1M_points"]) for r in v)  # type: ignore[arg-type]
        for k, v in runs.items()
    }
    rate = {
        k: statistics.median(float(r["delivered_points_per_s"]) for r in v)  # type: ignore[arg-type]
        for k, v in runs.items()
    }
    print(
        json.dumps(
            {
                "rounds": args.compare,
                "median_cpu_s_per_1M_points": cost,
                "median_delivered_points_per_s": rate,
                "store_cpu_cost_ratio": round(cost["sqlite"] / cost["memory"], 3),
                "store_capacity_ratio": round(cost["memory"] / cost["sqlite"], 3),
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
