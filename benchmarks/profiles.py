"""The fixed load-test profiles, run through `fieldgate loadtest`, with the baseline beside.

(a) wide Modbus: 100 devices x 60 float32 points (120 coalesced registers) x 10 Hz, with one
    and with two gateway workers;
(b) many identities: 1,000 devices x 5 points x 1 Hz, one process;
(c) a BLE fleet: 1,000 simulated peripherals x 10 Hz notifications (4 points each), one process
    (benchmarks/ble.py runs the same fleet and compares AcquireNotify with D-Bus signals);
(d) the baseline: a per-reading azure-iot-device publisher (benchmarks/baseline.py) against
    fieldgate on the same fleet, in the same run.

Prints JSON and writes each loadtest's report under --out.

    python benchmarks/profiles.py --duration 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway.testbed.harness import fieldgate

HERE = Path(__file__).resolve().parent


def _wide_modbus(workers: int) -> list[str]:
    """Profile (a): 100 devices x 60 points x 10 Hz over ``workers`` gateway processes."""
    wide = ["--modbus", "100", "--points", "60", "--rate", "10", "--ramp", "8"]
    return [*wide, "--workers", str(workers)]


PROFILES: dict[str, list[str]] = {
    "a_wide_modbus_1_worker": _wide_modbus(1),
    "a_wide_modbus_2_workers": _wide_modbus(2),
    "b_many_identities": ["--modbus", "1000", "--points", "5", "--rate", "1", "--ramp", "15"],
    # Connecting and bonding 1,000 peripherals, one connect at a time, takes about 40 s here.
    "c_ble_fleet": ["--modbus", "0", "--ble", "1000", "--rate", "10", "--ramp", "90"],
    "d_fieldgate_side": ["--modbus", "20", "--points", "10", "--rate", "2", "--ramp", "6"],
}
BASELINE = ["--devices", "20", "--points", "10", "--rate", "2", "--warmup", "6"]
KEEP = (
    "offered_points_per_s",
    "points_per_s",
    "latency_ms",
    "loss",
    "readings",
    "messages_per_1k_points",
    "units_4k_per_1k_points",
    "packing_min_units_per_1k_points",
    "gateway",
    "result",
)


def loadtest(name: str, args: list[str], duration: float, out: Path) -> dict[str, Any]:
    report = run_loadtest(args, duration, out / name)
    return {k: report[k] for k in (*KEEP, "ble_peripherals") if k in report}


def run_loadtest(args: list[str], duration: float, folder: Path) -> dict[str, Any]:
    """`fieldgate loadtest ARGS --duration D --out FOLDER`; its whole report."""
    subprocess.run(
        fieldgate(
            "loadtest", *args, "--duration", str(duration), "--out", str(folder), "--no-live"
        ),
        stdout=subprocess.DEVNULL,
        check=False,
    )
    report: dict[str, Any] = json.loads((folder / "report.json").read_text())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--out", default="loadtest-profiles")
    parser.add_argument("--only", nargs="*", default=None, help="profile names to run")
    args = parser.parse_args()
    out = Path(args.out)
    results: dict[str, Any] = {}
    for name, profile in PROFILES.items():
        if args.only is None or name in args.only:
            results[name] = loadtest(name, profile, args.duration, out)
    if args.only is None or "d_baseline" in args.only:
        run = subprocess.run(
            [
                sys.executable,
                str(HERE / "baseline.py"),
                *BASELINE,
                "--duration",
                str(args.duration),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        results["d_baseline"] = (
            json.loads(run.stdout) if run.returncode == 0 else {"error": run.stderr[-2000:]}
        )
    ratios: dict[str, Any] = {}
    one, two = results.get("a_wide_modbus_1_worker"), results.get("a_wide_modbus_2_workers")
    if one and two:
        ratios["a_2_workers_vs_1_points_per_s"] = round(
            two["points_per_s"] / max(1, one["points_per_s"]), 2
        )
    fg, base = results.get("d_fieldgate_side"), results.get("d_baseline")
    if fg and base and "error" not in base:
        ratios["d_fieldgate_vs_baseline_points_per_s"] = round(
            fg["points_per_s"] / max(1, base["points_per_s"]), 2
        )
        ratios["d_baseline_vs_fieldgate_cpu_per_point"] = round(
            base["cpu_s_per_1M_points"] / fg["gateway"]["cpu_s_per_1M_points"], 1
        )
        ratios["d_messages_per_1k_points"] = {
            "fieldgate": fg["messages_per_1k_points"],
            "baseline": base["messages_per_1k_points"],
        }
    print(json.dumps({"ratios": ratios, "profiles": results}, indent=2))


if __name__ == "__main__":
    main()
