"""`fieldgate loadtest` on a tiny fleet: a complete report, and a broken run that says so."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

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
    assert set(report["gateway"]) == {"cpu_s_per_1M_points", "cpu_cores", "peak_rss_mb"}
    assert report["gateway"]["peak_rss_mb"] > 10
    assert report["units_4k_per_1k_points"] >= report["packing_min_units_per_1k_points"] > 0
    for plot in ("throughput.png", "latency.png", "latency-histogram.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loadtest result: OK" in run.stdout


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
