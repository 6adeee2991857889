"""The loadtest report: report.json, a short table on the terminal, and PNG plots.

Plots need matplotlib (``pip install 'fieldgate[loadtest]'``; scripts/setup installs it).
Without it the JSON and the table are still written, and the report says the plots were skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from gateway.testbed.console import Column, Console, table
from gateway.testbed.loadtest.stats import Collector


def write_report(out: Path, report: dict[str, Any], console: Console) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    latency = report["latency_ms"]
    gateway = report["gateway"]
    rows = [
        ("offered points/s", f"{report['offered_points_per_s']:,}"),
        ("points/s opened at the hub", f"{report['points_per_s']:,}"),
        ("latency p50 / p95 / p99 (ms)", f"{latency['p50']} / {latency['p95']} / {latency['p99']}"),
        (
            "hub consumer's own lag p50 / p99 (ms)",
            f"{report['hub_consumer_lag_ms']['p50']} / {report['hub_consumer_lag_ms']['p99']}",
        ),
        (
            "readings accepted / delivered",
            f"{report['readings']['accepted']:,} / {report['readings']['delivered_unique']:,}",
        ),
        (
            "loss: gaps / not delivered",
            f"{report['loss']['sequence_gaps']} / {report['loss']['accepted_not_delivered']}",
        ),
        ("duplicates (dropped by the consumer)", f"{report['loss']['duplicates']:,}"),
        (
            "messages / 4 KB units per 1k points",
            f"{report['messages_per_1k_points']} / {report['units_4k_per_1k_points']}",
        ),
        (
            "packing minimum, 4 KB units per 1k points",
            f"{report['packing_min_units_per_1k_points']}",
        ),
        ("gateway CPU-s per 1M points", f"{gateway['cpu_s_per_1M_points']}"),
        ("gateway cores used", f"{gateway['cpu_cores']}"),
        (
            "gateway RSS MB: peak sampled / high-water (VmHWM)",
            f"{gateway['peak_rss_mb']} / {gateway.get('rss_high_water_mb')}",
        ),
    ]
    ble = report.get("ble_peripherals")
    if ble and "error" not in ble:
        rows.append(
            (
                "BLE notifications sent / missing at the hub",
                f"{ble['notifications_sent']:,} / {report['loss']['notification_gaps']:,}",
            )
        )
    title = f"loadtest result: {report['result'].upper()}"
    console.print(table(title, ["measure", Column("value", justify="right")], rows))
    for problem in report["problems"]:
        console.print(f"[bold red]FAILED[/]: {problem}")


def write_plots(out: Path, report: dict[str, Any], collector: Collector) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        import matplotlib.pyplot as plt
    except ImportError:
        report.setdefault("notes", []).append("plots skipped: matplotlib is not installed")
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return []
    line = report["timeline"]
    t = [row["t"] for row in line]
    written = []

    def save(
        fig: Any, ax: Any, name: str, title: str, xlabel: str, ylabel: str, hold: bool = True
    ) -> None:
        if hold:
            ax.axvspan(*report["hold_window_s"], color="green", alpha=0.08, label="hold (measured)")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, [row["points"] for row in line], label="delivered (opened at the hub)")
    ax.axhline(report["offered_points_per_s"], color="grey", linestyle="--", label="offered")
    save(fig, ax, "throughput.png", "Throughput", "seconds", "points/s")

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(t, [row["p50_ms"] for row in line], label="p50")
    ax.plot(t, [row["p99_ms"] for row in line], label="p99")
    save(fig, ax, "latency.png", "Latency over time", "seconds", "ms, read to hub")

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.hist([lat for _, lat in collector.all_latencies], bins=60)
    save(
        fig,
        ax,
        "latency-histogram.png",
        "Latency histogram",
        "ms, read to hub",
        "readings (sampled)",
        hold=False,
    )
    return written
