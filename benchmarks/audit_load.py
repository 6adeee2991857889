"""The audit log's cost in a running gateway at about 1,000 security events a second.

The events come from the product's own path: every simulated device has a coil that flips on
two of every three value steps (0.1 s), and in the "audit" phase that coil is configured as a
tamper input, so each flip the gateway reads is a ``tamper-input`` record: chained, group
committed, streamed to the hub under the gateway's identity. The "quiet" phase runs the same
fleet without the tamper inputs. Phases alternate for ``--rounds``; one JSON document:

- gateway CPU seconds per 1M points in each phase (medians), and their ratio;
- audit events per second and the gateway CPU per event (the phases' CPU difference per event);
- telemetry's read-to-hub latency (p50, p99) in each phase;
- every record at the hub (the stream keeps up) and the chain verified there.

    python benchmarks/audit_load.py [--devices 150 --points 10 --rate 10 --duration 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from gateway.audit import files
from gateway.config import render_toml
from gateway.consumer import SequenceTracker, open_all, read_record
from gateway.core import audit
from gateway.events import read_events
from gateway.identity import pki as pki_mod
from gateway.identity.auditkeys import load_verifier
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
from gateway.testbed.loadtest.stats import percentile

STOP_GRACE = 30.0


def phase(args: argparse.Namespace, tampers: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fieldgate-audit-bench-"))
    pki_dir = work / "pki"
    pki_mod.init(pki_dir)
    hub_port = free_ports(1)
    record = work / "record.jsonl"
    procs: list[Proc] = []

    def start(name: str, argv: list[str], ready: str | None = None) -> Proc:
        return start_logged(procs, work, name, argv, ready, timeout=90)

    state = work / "state"
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
                state_dir=state,
                points=args.points,
                types="float32,bool",
                rate=args.rate,
            ),
            MODBUS_READY,
        )
        doc = tomllib.loads(config.read_text())
        if tampers:
            for device in doc["devices"]:
                device["tamper"] = [{"point": "bool_1", "normal": False}]
        config.write_text(render_toml(doc))
        gateway = start("gateway", ["--log-level", "error", "run", "--config", str(config)])
        time.sleep(args.warmup)
        t0, (cpu0, _, _) = time.time(), usage(gateway.pid)
        time.sleep(args.duration)
        t1, (cpu1, rss, _) = time.time(), usage(gateway.pid)
        code = gateway.stop(STOP_GRACE)
        time.sleep(1.0)
    finally:
        for proc in reversed(procs):
            proc.stop(STOP_GRACE)
    p = pki_mod.Pki(pki_dir)
    messages = read_record(record)
    opened, errors = open_all(messages, load_keyring(p.keyring, p.passphrase()), SequenceTracker())
    window = [o for o in opened if t0 <= o.received < t1]
    points = sum(len(o.readings) for o in window)
    # Telemetry's own measure beside CPU: read-to-hub latency, one reading in ten.
    latencies = [o.received * 1000 - r.ts_ms for o in window for r in o.readings[::10]]
    events = [e for e in read_events(state) if t0 <= e["ts"] < t1 and e["kind"] == "tamper-input"]
    hub = files.read(record)
    local = files.read(state / "audit.db")
    verdict = audit.verify(
        hub.records, hub.heads, load_verifier(p.gateway_cert, certificate=True), "fieldgate"
    )
    seconds = t1 - t0
    cpu = cpu1 - cpu0
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "tampers": tampers,
        "seconds": round(seconds, 1),
        "points_per_s": round(points / seconds),
        "gateway_cpu_fraction": round(cpu / seconds, 3),
        "gateway_cpu_s_per_1M_points": round(cpu / points * 1e6, 3) if points else None,
        "audit_events_per_s": round(len(events) / seconds, 1),
        "records_local": len(local.records),
        "records_at_hub": len({r.seq for r in hub.records}),
        "hub_chain": verdict.reason,
        "latency_ms": {
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
        },
        "gateway_rss_mb": round(rss, 1),
        "refused_envelopes": len(errors),
        "gateway_exit_code": code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=150)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"quiet": [], "audit": []}
    for _ in range(args.rounds):
        runs["quiet"].append(phase(args, False))
        runs["audit"].append(phase(args, True))

    def median(name: str, key: str) -> float:
        return float(statistics.median(float(r[key]) for r in runs[name]))

    per_point = {k: median(k, "gateway_cpu_s_per_1M_points") for k in runs}
    cpu = {k: median(k, "gateway_cpu_fraction") for k in runs}
    rate = median("audit", "audit_events_per_s")
    ratio = round(per_point["audit"] / per_point["quiet"], 3)
    per_event = round((cpu["audit"] - cpu["quiet"]) / rate * 1e6, 1) if rate else None
    p99 = {k: statistics.median(float(r["latency_ms"]["p99"]) for r in runs[k]) for k in runs}
    print(
        json.dumps(
            {
                "profile": {
                    "devices": args.devices,
                    "points": args.points,
                    "rate_hz": args.rate,
                    "duration_s": args.duration,
                    "rounds": args.rounds,
                },
                "machine": machine(),
                "median_cpu_s_per_1M_points": per_point,
                "cpu_per_point_ratio_audit_to_quiet": ratio,
                "median_audit_events_per_s": rate,
                "gateway_cpu_us_per_audit_event": per_event,
                "median_latency_p99_ms": p99,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
