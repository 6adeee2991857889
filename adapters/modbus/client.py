"""Modbus TCP: the only module that imports pymodbus (the poller, and the device-side server
that the simulator uses).

Each device has its own task and its own connection, so a dead or slow device only ever delays
itself. Reads follow the coalesced plan from :mod:`adapters.modbus.registers`, on a drift-free
schedule per block; a read that overruns its period skips the missed ticks instead of bursting.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from struct import error as struct_error
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from adapters.base import Admit, DeviceHealth, Evidence, ScanSink
from adapters.modbus.registers import plan_reads
from gateway.backoff import backoff_delay
from gateway.config import DeviceConfig
from gateway.errors import DeviceUnavailable
from gateway.readings import Scan

log = logging.getLogger(__name__)
# pymodbus logs every timeout at ERROR; the poller reports transitions itself.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

_READERS = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}


class ModbusPoller:
    def __init__(
        self,
        device: DeviceConfig,
        sink: ScanSink,
        admit: Admit,
        health: DeviceHealth,
        *,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        phases: int = 1,
    ) -> None:
        if device.modbus is None:
            raise ValueError(f"{device.id} is not a Modbus device")
        self.device = device
        self.modbus = device.modbus
        self._sink = sink
        self._admit = admit
        self.health = health
        self._backoff = (backoff_min, backoff_max)
        self._phases = max(1, phases)
        self.endpoint = self.modbus.label
        self.blocks = plan_reads(device.points, max_gap=self.modbus.max_gap)

    async def run(self) -> None:
        """Poll until cancelled; returns early only if the device is refused admission."""
        attempt = 0
        while True:
            cfg = self.modbus
            client = AsyncModbusTcpClient(
                cfg.host, port=cfg.port, timeout=cfg.timeout, retries=0, reconnect_delay=0
            )
            try:
                await self._connect(client)
                refusal = self._admit(Evidence(self.device.id, "modbus-tcp", self.endpoint))
                if refusal is not None:
                    self.health.quarantine(refusal)
                    return
                attempt = 0
                await self._poll(client)
            except DeviceUnavailable as err:
                self.health.down(err.reason)
            except Exception as err:
                # A bug must cost this device a reconnect, never the other devices their data.
                log.exception("%s: poller failed", self.device.id)
                self.health.down(f"internal error: {err!r}")
            finally:
                client.close()
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, *self._backoff))

    async def _connect(self, client: AsyncModbusTcpClient) -> None:
        try:
            async with asyncio.timeout(self.modbus.timeout * 2):
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException) as err:
            raise DeviceUnavailable(self.device.id, self.endpoint, f"connect: {err!r}") from err
        _raise_if_cancelled()
        if not ok:
            raise DeviceUnavailable(self.device.id, self.endpoint, "connect refused")

    async def _poll(self, client: AsyncModbusTcpClient) -> None:
        loop = asyncio.get_running_loop()
        unit = self.modbus.unit
        timeout = self.modbus.timeout
        device_id = self.device.id
        readers: list[Callable[..., Awaitable[Any]]] = [
            getattr(client, _READERS[b.table]) for b in self.blocks
        ]
        # A fleet started together reads, seals and publishes in one burst per period, and the
        # last of a large burst waits for all the others. Each device starts in one of
        # ``phases`` slots of its shortest period (at most 1 s, so a slow poll is not put off).
        spread = min(1.0, min(b.period for b in self.blocks))
        phases = self._phases
        phase = zlib.crc32(device_id.encode()) % phases / phases * spread
        start = loop.time() + phase
        due = [start] * len(self.blocks)
        sink = self._sink
        health = self.health
        while True:
            index = min(range(len(due)), key=due.__getitem__)
            block = self.blocks[index]
            wait = due[index] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            ts_ms = int(time.time() * 1000)
            try:
                async with asyncio.timeout(timeout + 0.5):
                    response = await readers[index](
                        block.address, count=block.count, device_id=unit
                    )
            except (TimeoutError, ModbusIOException) as err:
                health.reads_failed += 1
                raise DeviceUnavailable(
                    device_id,
                    self.endpoint,
                    f"read {block.table}@{block.address}: no response within {timeout} s",
                ) from err
            except (ConnectionException, ModbusException, OSError) as err:
                health.reads_failed += 1
                raise DeviceUnavailable(
                    device_id, self.endpoint, f"read {block.table}@{block.address}: {err!r}"
                ) from err
            _raise_if_cancelled()
            next_due = due[index] + block.period
            now = loop.time()
            if next_due < now:
                health.overruns += 1
                next_due = now + block.period - (now - due[index]) % block.period
            due[index] = next_due
            if response.isError():
                health.reads_failed += 1
                code = getattr(response, "exception_code", "?")
                if health.last_error is None:
                    log.warning(
                        "%s: %s@%d answered Modbus exception %s",
                        device_id,
                        block.table,
                        block.address,
                        code,
                    )
                health.last_error = f"exception {code} on {block.table}@{block.address}"
                continue
            try:
                values = block.decode(response.bits if block.bits else response.registers)
            except (ValueError, struct_error, TypeError) as err:
                health.malformed += 1
                if health.malformed == 1 or health.malformed % 1000 == 0:
                    log.warning(
                        "%s: malformed response (%d so far): %s", device_id, health.malformed, err
                    )
                continue
            health.reads_ok += 1
            health.up()
            sink(Scan(device_id, ts_ms, block.names, values))


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that pymodbus swallowed.

    pymodbus awaits responses with ``asyncio.wait_for``. On Python 3.11, when the response
    arrives in the same loop iteration as a cancellation, ``wait_for`` returns the response and
    drops the ``CancelledError``; the poller would then poll on forever and a stop would hang
    (seen in CI). The task still records that a cancel was requested.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# -- the device side ------------------------------------------------------------------------

# (function code, the accessed table's registers, is it a write) -> Modbus exception code or None.
DeviceAction = Callable[[int, list[int], bool], Awaitable[int | None]]


class DeviceServer:
    """A Modbus TCP device: four tables (coils, discrete inputs, holding and input registers)
    of ``size`` entries each, on its own port; ``action`` sees every request first and may
    change the registers in place or answer with an exception code."""

    def __init__(self, host: str, port: int, unit: int, size: int, action: DeviceAction) -> None:
        self.address = (host, port)
        self._unit = unit
        self._size = size
        self._action = action
        self._server: ModbusTcpServer | None = None

    async def _on_access(
        self,
        function_code: int,
        _start: int,
        _address: int,
        _count: int,
        registers: list[int],
        set_values: Any,
    ) -> ExcCodes | None:
        code = await self._action(function_code, registers, set_values is not None)
        return ExcCodes(code) if code else None

    def _device(self) -> SimDevice:
        def bits() -> list[SimData]:
            return [SimData(0, count=self._size, values=False, datatype=DataType.BITS)]

        def words() -> list[SimData]:
            return [SimData(0, count=self._size, values=0, datatype=DataType.REGISTERS)]

        return SimDevice(
            id=self._unit, simdata=(bits(), bits(), words(), words()), action=self._on_access
        )

    async def __aenter__(self) -> DeviceServer:
        self._server = ModbusTcpServer(self._device(), address=self.address)
        await self._server.serve_forever(background=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None
