"""The simulated RTU line's own ceiling: how close a bare pymodbus master gets to the line's
theoretical frame rate, through the socat pty pair (or RTU over TCP).

The issue's benchmark measures the gateway's polls/s against the theoretical rate of the line
(request and response bytes at the baud rate, a 3.5-character gap before each frame); this one
measures the simulator with the simplest master there is, one ``AsyncModbusSerialClient``
reading 8 units round-robin, so that a gateway's figure can be read against what the
simulated line itself allows. Master and simulator share one process and event loop here.

    python benchmarks/rtu_line.py --baud 19200 115200 --units 8 --registers 10 --duration 5

Prints one JSON object: per baud rate, polls/s achieved, the theoretical rate, and the ratio.
pymodbus's client sends its next request as soon as an answer is in, without the 3.5-character
gap (``gap_violations`` counts those), so its ratio can exceed 1 by that gap; a master that
keeps the gap, as the spec asks, can reach 1 at most.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

from adapters.modbus.sim.bus import RtuBus, RtuOverTcp, rtu_line
from adapters.modbus.sim.devices import DeviceSpec, make_points
from adapters.modbus.sim.rtuframe import LineTiming


async def _poll(client: Any, units: int, registers: int, duration: float) -> tuple[int, float]:
    polls = 0
    began = time.monotonic()
    while (elapsed := time.monotonic() - began) < duration:
        for unit in range(1, units + 1):
            response = await client.read_holding_registers(0, count=registers, device_id=unit)
            assert not response.isError(), response
            polls += 1
    return polls, elapsed


async def measure(
    baud: int, units: int, registers: int, duration: float, transport: str
) -> dict[str, Any]:
    timing = LineTiming(baud)
    specs = [
        DeviceSpec(f"plc-{u}", 0, unit=u, points=make_points(registers, types=["uint16"]))
        for u in range(1, units + 1)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if transport == "serial":
            async with rtu_line(specs, Path(tmp), timing) as sim:
                client: Any = AsyncModbusSerialClient(
                    str(sim.path), baudrate=baud, timeout=1.0, retries=0
                )
                assert await client.connect()
                polls, elapsed = await _poll(client, units, registers, duration)
                client.close()
                stats = sim.bus.stats()
        else:
            async with RtuBus(specs, timing) as bus, RtuOverTcp(bus, "127.0.0.1", 0) as srv:
                client = AsyncModbusTcpClient(
                    "127.0.0.1", port=srv.port, framer=FramerType.RTU, timeout=1.0, retries=0
                )
                assert await client.connect()
                polls, elapsed = await _poll(client, units, registers, duration)
                client.close()
                stats = bus.stats()
    request, response = 8, 5 + 2 * registers
    # Each poll: request, gap, response, and the gap before the next request.
    per_poll = timing.exchange_time(request, response) + timing.gap
    achieved = polls / elapsed
    return {
        "baud": baud,
        "transport": transport,
        "units": units,
        "registers": registers,
        "polls": polls,
        "seconds": round(elapsed, 3),
        "polls_per_s": round(achieved, 1),
        "theoretical_polls_per_s": round(1 / per_poll, 1),
        "ratio": round(achieved * per_poll, 3),
        "overlaps": stats["overlaps"],
        "gap_violations": stats["gap_violations"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baud", type=int, nargs="+", default=[19200, 115200])
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--registers", type=int, default=10)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--transport", choices=("serial", "tcp"), default="serial")
    args = parser.parse_args()
    results = [
        asyncio.run(measure(b, args.units, args.registers, args.duration, args.transport))
        for b in args.baud
    ]
    print(json.dumps({"benchmark": "rtu_line", "results": results}, indent=1))


if __name__ == "__main__":
    main()
