"""Pure accounting of what reached the hub, per second and in total.

The collector sees every opened envelope (at the hub) and the gateway's resource samples; the
summary turns them into the report's figures. No I/O, no event loop: tested on its own.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from gateway.consumer import Opened, SequenceTracker

UNIT = 4096
COUNTER = "counter"  # the point a simulated BLE peripheral numbers its notifications with
LATENCY_SAMPLES_PER_ENVELOPE = 8


@dataclass
class Second:
    points: int = 0
    messages: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s: float | None = None
    rss_mb: float | None = None
    backlog: int | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Collector:
    def __init__(self, started: float) -> None:
        self.started = started
        self.seconds: dict[int, Second] = defaultdict(Second)
        self.tracker = SequenceTracker()
        self.sizes: list[tuple[float, int]] = []  # (arrival, metered bytes) per message
        self.arrivals: list[tuple[float, int]] = []  # (arrival, new points) per message
        self.max_rss_mb: float | None = None  # the largest RSS sample taken
        self.all_latencies: list[tuple[float, float]] = []
        # Simulated BLE peripherals number their notifications ("counter"): per device the
        # lowest and highest seen and how many, to count notifications that never arrived.
        self.counters: dict[str, list[int]] = {}
        # (arrival, ms from arrival until the consumer opened it): the measuring side's own delay
        self.consumer_lag: list[tuple[float, float]] = []

    def opened(self, item: Opened, size: int) -> None:
        fresh = self.tracker.add(item)
        self.consumer_lag.append((item.received, (time.time() - item.received) * 1000))
        for reading in fresh:
            if reading.point == COUNTER:
                seen = self.counters.get(reading.device_id)
                if seen is None:
                    self.counters[reading.device_id] = [reading.value, reading.value, 1]
                else:
                    seen[0] = min(seen[0], reading.value)
                    seen[1] = max(seen[1], reading.value)
                    seen[2] += 1
        second = self.seconds[int(item.received - self.started)]
        second.points += len(fresh)
        second.messages += 1
        self.sizes.append((item.received, size))
        self.arrivals.append((item.received, len(fresh)))
        if fresh:
            step = max(1, len(fresh) // LATENCY_SAMPLES_PER_ENVELOPE)
            now_ms = item.received * 1000
            for reading in fresh[::step]:
                latency = now_ms - reading.ts_ms
                second.latencies_ms.append(latency)
                self.all_latencies.append((item.received, latency))

    def sample(self, now: float, cpu_s: float, rss_mb: float, backlog: int | None) -> None:
        second = self.seconds[int(now - self.started)]
        second.cpu_s, second.rss_mb, second.backlog = cpu_s, rss_mb, backlog
        self.max_rss_mb = rss_mb if self.max_rss_mb is None else max(self.max_rss_mb, rss_mb)

    def rate(self, now: float, window: int = 3) -> float:
        """Points/s over the last complete ``window`` seconds."""
        last = int(now - self.started) - 1
        seconds = [self.seconds.get(s) for s in range(last - window + 1, last + 1)]
        return sum(s.points for s in seconds if s) / window

    def recent_latency(self, now: float, q: float, window: int = 5) -> float | None:
        last = int(now - self.started)
        values = [
            v
            for s in range(last - window, last + 1)
            for v in (self.seconds[s].latencies_ms if s in self.seconds else [])
        ]
        return percentile(values, q)


def phase_label(now: float, started: float, ramp: float, duration: float) -> str:
    """The live view's phase and how far into it, e.g. ``hold (12 of 15 s)``; never more
    than the phase lasts."""
    into = max(0.0, now - started)
    if into < ramp:
        return f"ramp ({into:.0f} of {ramp:.0f} s)"
    return f"hold ({min(into - ramp, duration):.0f} of {duration:.0f} s)"


def summarize(
    collector: Collector,
    *,
    hold_from: float,
    hold_to: float,
    accepted: dict[str, int],
    cpu_hold_s: float,
    peak_rss_mb: float | None,
    offered_points_per_s: float,
    rss_high_water_mb: float | None = None,
) -> dict[str, Any]:
    """The report's figures over the hold window [hold_from, hold_to) (absolute times: ramp
    end to polling stop), plus the whole run's accounting against what the gateway's stores
    accepted. ``peak_rss_mb`` is the largest RSS sampled; ``rss_high_water_mb`` the kernel's
    high-water mark (VmHWM, summed over the processes), which also holds start-up peaks
    between samples, such as the keyring's scrypt."""
    start, end = hold_from - collector.started, hold_to - collector.started
    # Points by arrival inside the window itself, not by whole seconds: a whole second would
    # reach past the polling stop (or before the ramp's end).
    points = sum(n for t, n in collector.arrivals if hold_from <= t < hold_to)
    seconds = max(1e-9, hold_to - hold_from)
    latencies = [lat for t, lat in collector.all_latencies if hold_from <= t < hold_to]
    lags = [lag for t, lag in collector.consumer_lag if hold_from <= t < hold_to]
    sizes = [size for t, size in collector.sizes if hold_from <= t < hold_to]
    delivered: dict[str, int] = defaultdict(int)
    for (device, _boot), stream in collector.tracker.streams.items():
        delivered[device] += stream.count()
    gaps = sum(
        end_ - start_ for holes in collector.tracker.gaps().values() for start_, end_ in holes
    )
    not_delivered = sum(max(0, n - delivered.get(d, 0)) for d, n in accepted.items())
    return {
        "offered_points_per_s": round(offered_points_per_s),
        "points_per_s": round(points / seconds),
        "latency_ms": {
            f"p{int(q * 100)}": _round(percentile(latencies, q)) for q in (0.5, 0.95, 0.99)
        },
        # Not part of the latency above: how long the hub-side consumer (same machine) took to
        # get to an envelope after it arrived, e.g. while opening a burst of them.
        "hub_consumer_lag_ms": {
            f"p{int(q * 100)}": _round(percentile(lags, q)) for q in (0.5, 0.99)
        },
        "loss": {
            "sequence_gaps": gaps,
            "accepted_not_delivered": not_delivered,
            "duplicates": collector.tracker.duplicates,
            # Simulated BLE only: notifications the peripherals numbered but the hub never saw
            # (lost before the gateway's sequence numbers, e.g. on a link the gateway left).
            "notification_gaps": sum(hi - lo + 1 - n for lo, hi, n in collector.counters.values()),
        },
        "readings": {
            "accepted": sum(accepted.values()),
            "delivered_unique": sum(delivered.values()),
        },
        "messages_per_1k_points": _round(len(sizes) / points * 1000 if points else None, 3),
        "units_4k_per_1k_points": _round(
            sum(math.ceil(s / UNIT) for s in sizes) / points * 1000 if points else None, 3
        ),
        "packing_min_units_per_1k_points": _round(
            sum(sizes) / UNIT / points * 1000 if points else None, 3
        ),
        "gateway": {
            "cpu_s_per_1M_points": _round(cpu_hold_s / points * 1e6 if points else None),
            "cpu_cores": _round(cpu_hold_s / seconds, 3),
            "peak_rss_mb": _round(peak_rss_mb, 1),
            "rss_high_water_mb": _round(rss_high_water_mb, 1),
        },
        "hold_s": round(seconds, 1),
        "hold_window_s": [round(start, 1), round(end, 1)],
    }


def timeline(collector: Collector) -> list[dict[str, Any]]:
    out = []
    previous_cpu: float | None = None
    for t in sorted(collector.seconds):
        s = collector.seconds[t]
        cpu = None
        if s.cpu_s is not None:
            cpu = None if previous_cpu is None else _round(s.cpu_s - previous_cpu, 3)
            previous_cpu = s.cpu_s
        out.append(
            {
                "t": t,
                "points": s.points,
                "messages": s.messages,
                "p50_ms": _round(percentile(s.latencies_ms, 0.5)),
                "p99_ms": _round(percentile(s.latencies_ms, 0.99)),
                "cpu_cores": cpu,
                "rss_mb": s.rss_mb,
                "backlog": s.backlog,
            }
        )
    return out


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)
