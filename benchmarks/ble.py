"""BLE fleet benchmark: 1,000 simulated peripherals x 10 Hz notifications through the gateway to
the hub, with notifications over AcquireNotify sockets and, in the same run, over D-Bus signals
(the peripherals then offer StartNotify only). Each notification carries 4 points.

Runs `fieldgate loadtest --modbus 0 --ble N` twice and prints JSON: notifications and points
delivered per second, sequence gaps (must be 0), notifications the peripherals numbered but the
hub never saw, latency, gateway CPU and peak RSS, and the signals/AcquireNotify ratios.

    python benchmarks/ble.py --peripherals 1000 --rate 10 --duration 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from profiles import run_loadtest  # this folder is on sys.path when a script here runs

from gateway.testbed.loadtest.run import BLE_POINTS, BLE_POLL_PERIOD, BLE_STATUS_POINTS


def run(name: str, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    report = run_loadtest(
        [
            "--modbus",
            "0",
            "--ble",
            str(args.peripherals),
            "--rate",
            str(args.rate),
            "--ramp",
            str(args.ramp),
            *extra,
        ],
        args.duration,
        Path(args.out) / name,
    )
    hold = report["hold_s"]
    polled = args.peripherals * BLE_STATUS_POINTS / BLE_POLL_PERIOD
    notify_points = report["points_per_s"] - polled
    return {
        "result": report["result"],
        "problems": report["problems"],
        "offered_notifications_per_s": args.peripherals * args.rate,
        "notifications_per_s": round(notify_points / BLE_POINTS),
        "points_per_s": report["points_per_s"],
        "sequence_gaps": report["loss"]["sequence_gaps"],
        "accepted_not_delivered": report["loss"]["accepted_not_delivered"],
        "notification_gaps": report["loss"]["notification_gaps"],
        "peripherals": report.get("ble_peripherals"),
        "latency_ms": report["latency_ms"],
        "gateway": report["gateway"],
        "hold_s": hold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peripherals", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10.0, help="notifications/s per device")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--ramp", type=float, default=90.0, help="seconds to connect and bond")
    parser.add_argument("--out", default="ble-benchmark")
    parser.add_argument("--skip-signals", action="store_true", help="AcquireNotify run only")
    args = parser.parse_args()
    results = {"acquire_notify": run("acquire-notify", args)}
    if not args.skip_signals:
        results["dbus_signals"] = run("dbus-signals", args, "--ble-signals")
    ratios: dict[str, Any] = {}
    if "dbus_signals" in results:
        fd, sig = results["acquire_notify"], results["dbus_signals"]
        ratios["signals_vs_acquire_delivered"] = round(
            sig["notifications_per_s"] / max(1, fd["notifications_per_s"]), 3
        )
        ratios["signals_vs_acquire_cpu_per_point"] = round(
            sig["gateway"]["cpu_s_per_1M_points"] / fd["gateway"]["cpu_s_per_1M_points"], 2
        )
    print(json.dumps({"ratios": ratios, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
