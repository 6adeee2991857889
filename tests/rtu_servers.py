"""pymodbus's own servers as the other end of a link, for the link tests: an implementation
independent of fieldgate's client side.

- :class:`PtyPair`: ``socat`` joining two pseudo-terminals, the stand-in for an RS-485 cable;
  started and stopped by PID.
- :class:`Units`: several units behind one pymodbus server (serial RTU, RTU over TCP, or Modbus
  TCP), holding registers ``unit * 100 + address``; units not served stay silent (a dead slave:
  the trace drops pymodbus's answer).
  It counts requests per unit, connections, and overlaps: a request that arrives while a served
  unit's answer is still owed (on a bus, two requests on the wire at once).
  ``corrupt(unit, every)`` flips a byte in every ``every``-th answer of ``unit`` (a CRC error on
  RTU).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

SOCAT = shutil.which("socat")


class PtyPair:
    """Two linked pseudo-terminals at ``dir/gateway`` and ``dir/device``."""

    def __init__(self, folder: Path) -> None:
        self.gateway = str(folder / "gateway")
        self.device = str(folder / "device")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PtyPair:
        assert SOCAT is not None, "socat is not installed"
        self._proc = subprocess.Popen(
            [
                SOCAT,
                f"pty,raw,echo=0,link={self.gateway}",
                f"pty,raw,echo=0,link={self.device}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not (os.path.exists(self.gateway) and os.path.exists(self.device)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("socat did not make its pty pair")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def value(unit: int, address: int) -> int:
    return unit * 100 + address


class Units:
    """Units ``served`` behind one pymodbus server: ``kind`` ``rtu`` (on serial port
    ``port``), ``rtu-over-tcp`` or ``tcp`` (on ``("127.0.0.1", port)``)."""

    def __init__(self, kind: str, port: str | int, served: list[int], size: int = 32) -> None:
        self.kind = kind
        self.port = port
        self.served = served
        self.size = size
        self.requests: Counter[int] = Counter()
        self.connections = 0
        self.overlaps = 0
        self.corrupted = 0
        self._owed: int | None = None  # the unit whose answer is owed
        self._corrupt: dict[int, int] = {}
        self._answers: Counter[int] = Counter()
        self._server: Any = None

    def corrupt(self, unit: int, every: int) -> None:
        self._corrupt[unit] = every

    def _device(self, unit: int) -> SimDevice:
        bits = [SimData(0, count=self.size, values=False, datatype=DataType.BITS)]
        held = [value(unit, a) for a in range(self.size)]
        words = [SimData(0, values=held, datatype=DataType.REGISTERS)]
        return SimDevice(id=unit, simdata=(bits, bits, words, list(words)))

    def _trace(self, sending: bool, data: bytes) -> bytes:
        rtu = self.kind != "tcp"
        if not sending:
            if len(data) < (8 if rtu else 12):
                return data  # part of a request: traced again whole
            unit = data[0] if rtu else data[6]
            if self._owed is not None:
                self.overlaps += 1
            self.requests[unit] += 1
            if unit in self.served:
                self._owed = unit
            return data
        unit = data[0] if rtu else data[6]
        if unit not in self.served:
            return b""  # pymodbus answers 0x04 for an unknown id: a dead slave says nothing
        self._owed = None
        every = self._corrupt.get(unit)
        if every is not None and rtu:
            self._answers[unit] += 1
            if self._answers[unit] % every == 0 and len(data) > 4:
                self.corrupted += 1
                body = bytearray(data)
                body[3] ^= 0x5A  # a value byte: the CRC no longer matches
                return bytes(body)
        return data

    def _connected(self, connected: bool) -> None:
        if connected:
            self.connections += 1

    async def __aenter__(self) -> Units:
        devices = [self._device(u) for u in self.served]
        common: dict[str, Any] = {
            "ignore_missing_devices": True,
            "trace_packet": self._trace,
            "trace_connect": self._connected,
        }
        if self.kind == "rtu":
            self._server = ModbusSerialServer(
                devices, port=str(self.port), framer=FramerType.RTU, baudrate=115200, **common
            )
        else:
            framer = FramerType.RTU if self.kind == "rtu-over-tcp" else FramerType.SOCKET
            self._server = ModbusTcpServer(
                devices, address=("127.0.0.1", int(self.port)), framer=framer, **common
            )
        await self._server.serve_forever(background=True)
        await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
