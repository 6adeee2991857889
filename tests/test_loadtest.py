"""`fieldgate loadtest` on a tiny fleet: a complete report, and a broken run that says so."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.consumer import Opened
from gateway.core.readings import CODEC, Header, Reading
from gateway.testbed.loadtest.stats import Collector, phase_label, summarize

from conftest import Proc, fieldgate, start_hub, start_simulator

# Three Modbus devices x 8 points and two BLE peripherals (4 points per notification), at 5 Hz:
# small enough for CI, large enough to batch and to measure.
TINY = [
    "--modbus",
    "3",
    "--ble",
    "2",
    "--points",
    "8",
    "--rate",
    "5",
    "--duration",
    "5",
    "--ramp",
    "2",
    "--max-age",
    "0.5",
]

FIELDS = {
    "result",
    "problems",
    "plan",
    "machine",
    "offered_points_per_s",
    "points_per_s",
    "latency_ms",
    "loss",
    "readings",
    "messages_per_1k_points",
    "units_4k_per_1k_points",
    "packing_min_units_per_1k_points",
    "gateway",
    "hold_s",
    "hold_window_s",
    "timeline",
}


def loadtest(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run `fieldgate loadtest ... --out OUT --no-live`; the result and its report."""
    run = subprocess.run(
        fieldgate("loadtest", *args, "--out", str(out), "--no-live"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return run, report


@pytest.mark.slow
def test_a_tiny_fleet_reports_every_field_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run, report = loadtest(out, *TINY)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert FIELDS <= set(report)
    assert report["result"] == "ok" and report["problems"] == []
    # BLE: 4 points per notification, and the status characteristic's 2 points every 10 s.
    assert report["offered_points_per_s"] == round(3 * 8 * 5 + 2 * 4 * 5 + 2 * 2 / 10)
    assert report["points_per_s"] > 0
    assert report["loss"] == {
        "sequence_gaps": 0,
        "accepted_not_delivered": 0,
        "duplicates": 0,
        "notification_gaps": 0,
    }
    assert report["ble_peripherals"]["connected"] == 2
    assert report["ble_peripherals"]["notifications_sent"] >= 2 * 5 * 5
    accepted = report["readings"]["accepted"]
    assert accepted > 0 and report["readings"]["delivered_unique"] == accepted
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}
    assert all(v is not None and v > 0 for v in report["latency_ms"].values())
    assert set(report["gateway"]) == {
        "cpu_s_per_1M_points",
        "cpu_cores",
        "peak_rss_mb",
        "rss_high_water_mb",
    }
    assert report["gateway"]["peak_rss_mb"] > 10
    # The peak is one of the samples; the kernel's high-water mark is reported beside it.
    samples = [row["rss_mb"] for row in report["timeline"] if row["rss_mb"] is not None]
    assert report["gateway"]["peak_rss_mb"] == round(max(samples), 1)
    assert report["gateway"]["rss_high_water_mb"] >= report["gateway"]["peak_rss_mb"]
    assert report["units_4k_per_1k_points"] >= report["packing_min_units_per_1k_points"] > 0
    for plot in ("throughput.png", "latency.png", "latency-histogram.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loadtest result: OK" in run.stdout
    packing = re.search(r"packing minimum, 4 KB units per 1k points\s*│\s*([\d.]+)", run.stdout)
    assert packing and float(packing[1]) == report["packing_min_units_per_1k_points"]


@pytest.mark.slow
def test_a_run_whose_hub_dies_reports_the_backlog_instead_of_success(tmp_path: Path) -> None:
    run, report = loadtest(tmp_path / "out", *TINY, "--stop-hub-after", "3")
    assert run.returncode == 1, run.stdout[-3000:]
    assert report["result"] == "failed"
    missing = report["loss"]["accepted_not_delivered"]
    assert missing > 0
    assert report["readings"]["accepted"] - report["readings"]["delivered_unique"] == missing
    assert any("never reached the hub" in p for p in report["problems"])
    assert "loadtest result: FAILED" in run.stdout


@pytest.mark.slow
def test_loadtest_measures_a_users_own_config_at_its_hub(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    hub_port, _ = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 3, "--period", "0.2", "--max-age", "0.5"
    )
    run, report = loadtest(
        tmp_path / "out",
        "--gateway-config",
        str(config),
        "--pki",
        str(pki_dir),
        "--duration",
        "4",
        "--ramp",
        "2",
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert report["offered_points_per_s"] == 3 * 9 * 5  # the config's points and periods
    assert report["points_per_s"] > 0 and report["loss"]["accepted_not_delivered"] == 0
    refused, _ = loadtest(tmp_path / "o2", "--gateway-config", str(config))
    assert refused.returncode == 1 and "--gateway-config needs --pki" in refused.stderr


def _message(device: str, first: int, count: int, received: float) -> Opened:
    header = Header(1, "k1", "boot", first, count, CODEC)
    readings = [
        Reading(device, "boot", first + i, "p", 1.0, int(received * 1000) - 300, "good")
        for i in range(count)
    ]
    return Opened(device, header, readings, received)


def test_throughput_counts_exactly_the_hold_not_the_seconds_around_it() -> None:
    collector = Collector(started=1000.0)
    # 100 points/s in messages of 10 every 0.1 s from t=0.05 to t=9.95 of the run ...
    seq = 0
    for i in range(100):
        collector.opened(_message("plc-1", seq, 10, 1000.05 + i * 0.1), 500)
        seq += 10
    # ... then, after polling stopped at t=7.5, the final flush arrives at once.
    collector.opened(_message("plc-1", seq, 400, 1007.6), 4000)
    summary = summarize(
        collector,
        hold_from=1002.5,
        hold_to=1007.5,
        accepted={"plc-1": seq + 400},
        cpu_hold_s=1.0,
        peak_rss_mb=None,
        offered_points_per_s=100.0,
    )
    assert summary["points_per_s"] == 100
    assert summary["hold_s"] == 5.0


def test_peak_rss_is_the_largest_sample_and_the_high_water_mark_is_named_apart() -> None:
    collector = Collector(started=0.0)
    for t, rss in ((1.0, 40.0), (2.0, 60.7), (3.0, 55.0)):
        collector.sample(t, cpu_s=t, rss_mb=rss, backlog=0)
    collector.opened(_message("plc-1", 0, 10, 2.5), 500)
    summary = summarize(
        collector,
        hold_from=1.0,
        hold_to=3.0,
        accepted={"plc-1": 10},
        cpu_hold_s=0.1,
        peak_rss_mb=collector.max_rss_mb,
        rss_high_water_mb=86.4,
        offered_points_per_s=5.0,
    )
    assert summary["gateway"]["peak_rss_mb"] == 60.7
    assert summary["gateway"]["rss_high_water_mb"] == 86.4


def test_the_live_phase_never_says_more_than_the_phase_lasts() -> None:
    assert phase_label(103.0, 100.0, ramp=5, duration=15) == "ramp (3 of 5 s)"
    assert phase_label(112.0, 100.0, ramp=5, duration=15) == "hold (7 of 15 s)"
    assert phase_label(124.0, 100.0, ramp=5, duration=15) == "hold (15 of 15 s)"
    assert phase_label(100.0, 100.0, ramp=0, duration=15) == "hold (0 of 15 s)"
