"""RTU bus throughput: polls per second against the line's theoretical frame rate.

8 units x 10 holding registers on one paced serial line (``fieldgate simulate modbus --rtu``, in
its own process, behind a socat pty pair: it times each character at the baud rate, answers 3.5
characters after a request ends and releases its answer's bytes no faster than the line would),
polled as fast as the link can: every block is due every 10 ms, so the link is never idle and its
rate is the bus's.

The theoretical rate: each poll puts a request (8 bytes) and an answer (3 + 20 + 2 = 25 bytes) on
the wire, each followed by a 3.5-character silence, so 40 characters of 10 bits (8N1; 11 with
parity). A pty cannot be opened with parity on Linux, so the line runs 8N1; ``--parity E`` models
11-bit characters in the simulator's timing and the theoretical rate alike.

    python benchmarks/rtu.py [--seconds 5] [--baud 19200 115200] [--parity N]

prints one JSON document: per baud rate, polls/s achieved, the theoretical rate, their ratio (goal
>= 0.9), where a poll's time goes (the master's turnaround and the answer, each against its
ideal), overlaps seen by the simulated line (must be 0), and what the gateway's health counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters.base import DeviceHealth
from adapters.modbus.config import ModbusEndpoint, RtuLink
from adapters.modbus.link import ModbusBus, ModbusLink
from adapters.modbus.sim.devices import make_points
from adapters.modbus.transport import ModbusTransport
from gateway.core.readings import GOOD, Scan
from gateway.testbed.harness import Proc, fieldgate

UNITS = 8
REGISTERS = 10
REQUEST, RESPONSE = 8, 3 + 2 * REGISTERS + 2  # bytes on the wire per poll
GAP = 3.5  # characters of silence after each frame


class Timeline:
    """When the link's serial transport sent and received bytes (pymodbus's packet trace, which
    the transport already takes for the frame gap), to split a poll's time between the master's
    turnaround (last byte in -> next request out: the frame gap, then fieldgate's own work) and
    the answer (request out -> last byte of the answer in: the line, the simulator and socat)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, bool]] = []
        self.recording = False
        original = ModbusTransport._on_packet
        timeline = self

        def traced(transport: ModbusTransport, sending: bool, data: bytes) -> bytes:
            if timeline.recording:
                timeline.events.append((time.perf_counter(), sending))
            return original(transport, sending, data)

        ModbusTransport._on_packet = traced  # type: ignore[method-assign]
        self._original = original

    def close(self) -> None:
        ModbusTransport._on_packet = self._original  # type: ignore[method-assign]

    def medians_ms(self) -> tuple[float, float]:
        turnaround, answer = [], []
        sent: float | None = None
        last_rx: float | None = None
        for at, sending in self.events:
            if sending:
                if sent is not None and last_rx is not None:
                    answer.append(last_rx - sent)
                    turnaround.append(at - last_rx)
                sent, last_rx = at, None
            else:
                last_rx = at
        if not answer:
            return 0.0, 0.0
        return statistics.median(turnaround) * 1e3, statistics.median(answer) * 1e3


def theoretical(baud: int, parity: str) -> float:
    bits = 1 + 8 + (0 if parity == "N" else 1) + 1
    return baud / (bits * (REQUEST + GAP + RESPONSE + GAP))


async def measure(baud: int, parity: str, seconds: float, folder: Path) -> dict[str, Any]:
    """One run: the simulated line in its own process (``fieldgate simulate modbus --rtu``, so
    its pacing timers do not share the gateway's event loop), the link in this one."""
    counts = {u: 0 for u in range(1, UNITS + 1)}
    counting = False

    def sink_for(unit: int) -> Any:
        def sink(scan: Scan) -> None:
            if counting and scan.quality == GOOD:
                counts[unit] += 1

        return sink

    stats_file = folder / "stats.json"
    timeline = Timeline()
    sim = Proc(
        fieldgate(
            "simulate", "modbus", "--rtu", "--units", str(UNITS), "--baud", str(baud),
            "--parity", parity, "--points", str(REGISTERS), "--types", "uint16",
            "--step", "1000", "--serial-dir", str(folder / "line"), "--stats", str(stats_file),
        ),
        folder / "sim.log",
    )  # fmt: skip
    try:
        path = sim.wait_for(r"on serial (\S+) \(RTU").group(1)
        link = RtuLink(name="bench", type="rtu", port=path, baud=baud, parity="N", timeout=0.5)
        if parity != "N":
            # The simulated line times 11-bit characters; the gateway keeps the same gap.
            link = link.model_copy(update={"frame_gap": 3.5 * 11 / baud})
        points = [sp.point for sp in make_points(REGISTERS, types=["uint16"], period=0.01)]
        health = {u: DeviceHealth(f"plc-{u}") for u in counts}
        units = [
            ModbusLink(
                f"plc-{u}",
                ModbusEndpoint(link="bench", unit=u).on(link),
                points,
                sink_for(u),
                lambda _e: None,
                health[u],
                transport=link.transport,
            )
            for u in counts
        ]
        task = asyncio.create_task(ModbusBus(link, units).run(), name="link[bench]")
        await asyncio.sleep(1.0)  # connected, every unit answering
        counting = timeline.recording = True
        start = time.perf_counter()
        await asyncio.sleep(seconds)
        counting = timeline.recording = False
        elapsed = time.perf_counter() - start
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        sim.stop()
        timeline.close()
    stats = json.loads(stats_file.read_text())
    polls = sum(counts.values())
    turnaround, answer = timeline.medians_ms()
    char = (10 if parity == "N" else 11) / baud
    rate = polls / elapsed
    ideal = theoretical(baud, parity)
    return {
        "baud": baud,
        "parity": parity,
        "units": UNITS,
        "registers_per_unit": REGISTERS,
        "seconds": round(elapsed, 3),
        "polls": polls,
        "polls_per_s": round(rate, 2),
        "theoretical_per_s": round(ideal, 2),
        "ratio": round(rate / ideal, 3),
        # Per poll, median: the master's turnaround against the 3.5-character gap it must keep,
        # and the answer's time against the line's (request, gap, answer).
        "turnaround_ms": round(turnaround, 3),
        "turnaround_ideal_ms": round(GAP * char * 1e3, 3),
        "answer_ms": round(answer, 3),
        "answer_ideal_ms": round((REQUEST + GAP + RESPONSE) * char * 1e3, 3),
        "per_unit": counts,
        "overlaps": stats["overlaps"],
        "bad_frames": stats["bad_frames"],
        "malformed": sum(h.malformed for h in health.values()),
        "reads_failed": sum(h.reads_failed for h in health.values()),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for baud in args.baud:
        with tempfile.TemporaryDirectory(prefix="rtu-bench-") as tmp:
            out.append(await measure(baud, args.parity, args.seconds, Path(tmp)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--baud", type=int, nargs="+", default=[19200, 115200])
    parser.add_argument("--parity", choices=["N", "E", "O"], default="N")
    args = parser.parse_args(argv)
    results = asyncio.run(main_async(args))
    json.dump({"benchmark": "rtu", "goal_ratio": 0.9, "results": results}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
