"""What metrics cost: gateway CPU per point with ``[metrics]`` off and on, in one run.

For each profile, one hub stand-in and one simulated Modbus fleet (their own processes) serve
gateway runs that alternate off and on (``--rounds``): each run warms up, then holds while its
CPU is measured from /proc and its points are counted at the hub (opened envelopes that arrived
in the hold window). The "on" runs are scraped like Prometheus would, every
``--scrape-interval`` seconds, so their CPU includes the scrapes. Prints one JSON document:
per profile the median CPU per 1M points off and on and their ratio, and the scrapes' wall
time (client side, p50 and max) and size (plain and gzip) at that fleet size.

Profiles, as benchmarks/profiles.py names them:
(a) 100 devices x 60 float32 points x 10 Hz; (b) 1,000 devices x 5 points x 1 Hz.

    python benchmarks/metrics.py --duration 20 --rounds 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

from gateway.config import render_toml
from gateway.consumer import SequenceTracker, open_all, read_record
from gateway.identity import pki as pki_mod
from gateway.identity.keyring import load as load_keyring
from gateway.ops.metrics import samples
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

STOP_GRACE = 30.0
PROFILES = {
    "a_wide_modbus": {"devices": 100, "points": 60, "rate": 10.0},
    "b_many_identities": {"devices": 1000, "points": 5, "rate": 1.0},
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def scrape(port: int) -> tuple[float, int, int, int, float]:
    """(seconds, bytes, gzip bytes, samples, loop seconds of the previous snapshot) of one
    GET /metrics."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        body = answer.read()
    took = time.perf_counter() - t0
    found = samples(body.decode())
    snapshot = found.get("fieldgate_scrape_snapshot_seconds", 0.0)
    return took, len(body), len(gzip.compress(body, 1)), len(found), snapshot


def hold(
    procs: list[Proc], work: Path, config: Path, name: str, args: argparse.Namespace, port: int
) -> dict[str, Any]:
    """One gateway run: warm up, hold (scraping when ``port``), stop."""
    gateway = start_logged(
        procs, work, name, ["--log-level", "warning", "run", "--config", str(config)]
    )
    time.sleep(args.warmup)
    scrapes: list[tuple[float, int, int, int, float]] = []
    t0, (cpu0, _, _) = time.time(), usage(gateway.pid)
    end = t0 + args.duration
    while time.time() < end:
        if port:
            scrapes.append(scrape(port))
        time.sleep(max(0.0, min(args.scrape_interval, end - time.time())))
    t1, (cpu1, rss, _) = time.time(), usage(gateway.pid)
    code = gateway.stop(STOP_GRACE)
    procs.remove(gateway)
    out: dict[str, Any] = {"t0": t0, "t1": t1, "cpu_s": cpu1 - cpu0, "rss_mb": rss, "exit": code}
    if scrapes:
        out["scrapes"] = scrapes
    return out


def profile(name: str, shape: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"fieldgate-metrics-{name}-"))
    pki_dir = work / "pki"
    pki_mod.init(pki_dir)
    hub_port = free_ports(1)
    record = work / "record.jsonl"
    procs: list[Proc] = []
    runs: list[tuple[str, dict[str, Any]]] = []
    try:
        start_logged(procs, work, "hub", hub_argv(pki_dir, hub_port, record), HUB_READY, 60)
        config = work / "gateway.toml"
        argv = modbus_load_argv(
            devices=shape["devices"],
            config=config,
            pki=pki_dir,
            hub_port=hub_port,
            state_dir=work / "state",
            points=shape["points"],
            types="float32",
            rate=shape["rate"],
            max_age=1.0,
        )
        start_logged(procs, work, "sim", argv, MODBUS_READY, 120)
        doc = tomllib.loads(config.read_text())
        off = work / "off.toml"
        off.write_text(render_toml(doc))
        metrics_port = free_ports(1)
        on = work / "on.toml"
        on.write_text(render_toml({**doc, "metrics": {"listen": f"127.0.0.1:{metrics_port}"}}))
        for index in range(args.rounds):
            runs.append(("off", hold(procs, work, off, f"off-{index}", args, 0)))
            runs.append(("on", hold(procs, work, on, f"on-{index}", args, metrics_port)))
    finally:
        for proc in reversed(procs):
            proc.stop(STOP_GRACE)
    p = pki_mod.Pki(pki_dir)
    opened, errors = open_all(
        read_record(record), load_keyring(p.keyring, p.passphrase()), SequenceTracker()
    )
    cost: dict[str, list[float]] = {"off": [], "on": []}
    detail = []
    for mode, run in runs:
        points = sum(len(o.readings) for o in opened if run["t0"] <= o.received < run["t1"])
        seconds = run["t1"] - run["t0"]
        per_m = run["cpu_s"] / points * 1e6 if points else float("nan")
        cost[mode].append(per_m)
        detail.append(
            {
                "metrics": mode,
                "points_per_s": round(points / seconds),
                "gateway_cpu_fraction": round(run["cpu_s"] / seconds, 3),
                "gateway_cpu_s_per_1M_points": round(per_m, 2),
                "gateway_rss_mb": round(run["rss_mb"], 1),
                "exit": run["exit"],
            }
        )
    scrapes = [s for mode, run in runs for s in run.get("scrapes", [])]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in cost.items()}
    return {
        "profile": {
            **shape,
            "offered_points_per_s": shape["devices"] * shape["points"] * shape["rate"],
        },
        "median_cpu_s_per_1M_points": {k: round(v, 2) for k, v in median.items()},
        "cpu_ratio_on_over_off": round(median["on"] / median["off"], 3),
        "scrape": {
            "count": len(scrapes),
            "interval_s": args.scrape_interval,
            "ms_p50": round(percentile([s[0] for s in scrapes], 0.5) * 1000, 1),
            "ms_max": round(max(s[0] for s in scrapes) * 1000, 1),
            # The loop's share (the snapshot; the text is formatted in a thread).
            "loop_ms_p50": round(percentile([s[4] for s in scrapes[1:]], 0.5) * 1000, 1)
            if len(scrapes) > 1
            else None,
            "bytes": scrapes[-1][1],
            "gzip_bytes": scrapes[-1][2],
            "samples": scrapes[-1][3],
        }
        if scrapes
        else None,
        "refused_envelopes": len(errors),
        "runs": detail,
        "work_dir": str(work) if args.keep else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="a_wide_modbus,b_many_identities")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds held per run")
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs per profile")
    parser.add_argument("--scrape-interval", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    args = parser.parse_args()
    out = {"machine": machine(), "duration_s": args.duration, "rounds": args.rounds}
    for name in args.profiles.split(","):
        out[name] = profile(name, PROFILES[name], args)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
