"""Modbus TCP: the only module that imports pymodbus (the poller, and the device-side server
that the simulator uses).

Each device has its own task and its own connection, so a dead or slow device only ever delays
itself. Reads follow the coalesced plan from :mod:`adapters.modbus.registers`, on a drift-free
schedule per block; a read that overruns its period skips the missed ticks instead of bursting.

Nothing a device sends is trusted: every frame is checked against the one request in flight
(:func:`adapters.modbus.checks.check_response`) before pymodbus decodes it. A wrong answer is
counted as malformed and dropped, never a reading; one that leaves the stream out of step closes
the connection, and the device is reconnected with backoff. A device's fault is logged once per
transition (:class:`~adapters.modbus.checks.Misbehaviour`), never as a traceback.
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
from pymodbus.framer import FramerSocket
from pymodbus.pdu import DecodePDU, ModbusPDU, ReadCoilsRequest, ReadHoldingRegistersRequest
from pymodbus.pdu.bit_message import ReadDiscreteInputsRequest
from pymodbus.pdu.register_message import ReadInputRegistersRequest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from adapters.base import Admit, DeviceHealth, Evidence, ScanSink
from adapters.modbus.checks import (
    MBAP_SIZE,
    RESYNC,
    TRUNCATED,
    UNDECODABLE,
    Expected,
    Misbehaviour,
    check_response,
)
from adapters.modbus.registers import plan_reads
from gateway.config import DeviceConfig
from gateway.core.backoff import backoff_delay
from gateway.core.errors import DeviceUnavailable
from gateway.core.readings import Scan

log = logging.getLogger(__name__)
# pymodbus logs every timeout at ERROR; the poller reports transitions itself.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

_READERS = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}
_FUNCTION_CODES: dict[str, int] = {
    "holding": ReadHoldingRegistersRequest.function_code,
    "input": ReadInputRegistersRequest.function_code,
    "coil": ReadCoilsRequest.function_code,
    "discrete": ReadDiscreteInputsRequest.function_code,
}


# A security event: (kind, device id, reason, **fields), as gateway.events records it.
OnEvent = Callable[..., None]


class WrongAnswer(Exception):
    """A device's response did not match its request (``cause`` from :mod:`.checks`)."""

    def __init__(self, cause: str, resync: bool) -> None:
        super().__init__(cause)
        self.cause = cause
        self.resync = resync


class _CheckedFramer(FramerSocket):
    """MBAP framing that hands pymodbus only a frame that answers the request in flight.

    pymodbus calls :meth:`handleFrame` from the transport's ``data_received`` with everything
    received since the request went out. Anything else is reported to ``on_wrong`` and dropped
    whole; nothing raised here (asyncio would log it as a fatal transport error with a
    traceback and close the connection behind the poller's back).
    """

    def __init__(self, decoder: DecodePDU, unit: int, on_wrong: Callable[[str, bool], None]):
        super().__init__(decoder)
        self._unit = unit
        self._on_wrong = on_wrong
        self.expected: tuple[int, int, bool] | None = None  # function code, count, bits

    def handleFrame(
        self, data: bytes, exp_devid: int, exp_tid: int
    ) -> tuple[int, ModbusPDU | None]:
        want = self.expected
        expected = None if want is None else Expected(exp_tid, self._unit, *want)
        pdu: ModbusPDU | None = None
        try:
            verdict = check_response(data, expected)
            if verdict.used == 0:
                return 0, None
            used, cause = verdict.used, verdict.cause
            if cause is None:
                pdu = self.decoder.decode(data[MBAP_SIZE:used])
                cause = UNDECODABLE if pdu is None else None
        except Exception:  # a bug here must not become a transport's fatal error
            log.debug("checking a response failed", exc_info=True)
            pdu, used, cause = None, len(data), UNDECODABLE
        self.expected = None
        if pdu is None or cause is not None:
            self._on_wrong(cause or UNDECODABLE, (cause or UNDECODABLE) in RESYNC)
            return len(data), None
        pdu.dev_id, pdu.transaction_id = self._unit, exp_tid
        return used, pdu


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
        report_every: float = 60.0,
        settle: float = 10.0,
        on_event: OnEvent | None = None,
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
        self.misbehaviour = Misbehaviour(device.id, every=report_every, settle=settle)
        self._on_event = on_event
        self._client: AsyncModbusTcpClient | None = None
        self._out_of_step: str | None = None  # a violation seen while no read was waiting
        self.attempt = 0  # connections in a row that delivered no reading: the backoff step

    async def run(self) -> None:
        """Poll until cancelled; returns early only if the device is refused admission."""
        try:
            await self._run()
        finally:
            line = self.misbehaviour.at_stop(time.monotonic())
            if line is not None:
                log.warning("%s", line)

    async def _run(self) -> None:
        self.attempt = 0
        while True:
            cfg = self.modbus
            client = AsyncModbusTcpClient(
                cfg.host,
                port=cfg.port,
                timeout=cfg.timeout,
                retries=0,
                reconnect_delay=0,
                trace_connect=self._on_link,
            )
            client.ctx.framer = _CheckedFramer(client.ctx.framer.decoder, cfg.unit, self._wrong)
            # pymodbus silently empties a receive buffer past 264 bytes; the framer judges all.
            client.ctx.max_buffer_size = 1 << 20
            self._client, self._out_of_step = client, None
            reads_before = self.health.reads_ok
            try:
                await self._connect(client)
                refusal = self._admit(Evidence(self.device.id, "modbus-tcp", self.endpoint))
                if refusal is not None:
                    self.health.quarantine(refusal)
                    return
                await self._poll(client)
            except DeviceUnavailable as err:
                self.health.down(err.reason)
            except WrongAnswer:
                pass  # counted and logged as it arrived; the connection is out of step
            except Exception as err:
                # A bug must cost this device a reconnect, never the other devices their data.
                log.exception("%s: poller failed", self.device.id)
                self.health.down(f"internal error: {err!r}")
            finally:
                self._client = None
                client.close()
            # The backoff grows until a connection delivers a reading, so that a device that
            # breaks every connection it is given is not reconnected at the shortest delay.
            if self.health.reads_ok > reads_before:
                self.attempt = 0
            self.attempt += 1
            await asyncio.sleep(backoff_delay(self.attempt, *self._backoff))

    def _wrong(self, cause: str, resync: bool) -> None:
        """The framer dropped a response (or bytes nobody asked for): count it, tell it, and
        fail the read waiting for it."""
        health = self.health
        health.malformed += 1
        health.malformed_causes[cause] = health.malformed_causes.get(cause, 0) + 1
        self._bad(cause)
        client = self._client
        waiting = None if client is None else client.ctx.response_future
        if waiting is not None and not waiting.done():
            waiting.set_exception(WrongAnswer(cause, resync))
        elif resync:
            self._out_of_step = cause

    def _on_link(self, connected: bool) -> None:
        """pymodbus saw the connection go: fail the read waiting on it now, not at its timeout."""
        client = self._client
        if connected or client is None:
            return
        waiting = client.ctx.response_future
        if not waiting.done():
            waiting.set_exception(ConnectionResetError("connection closed by the device"))

    def _bad(self, cause: str) -> None:
        """One wrong answer: told (and recorded as a security event) when an episode starts,
        then only in the periodic counts."""
        starting = self.misbehaviour.since is None
        line = self.misbehaviour.bad(cause, time.monotonic())
        if line is not None:
            log.warning("%s", line)
        if starting and self._on_event is not None:
            self._on_event("wrong-answers", self.device.id, cause, endpoint=self.endpoint)

    def _good(self) -> None:
        counts = dict(self.misbehaviour.counts)
        line = self.misbehaviour.good(time.monotonic())
        if line is not None:
            log.info("%s", line)
            if self._on_event is not None:
                self._on_event(
                    "wrong-answers-ended",
                    self.device.id,
                    "answering correctly again",
                    endpoint=self.endpoint,
                    counts=counts,
                )

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
        framer = client.ctx.framer
        assert isinstance(framer, _CheckedFramer)
        expects = [(_FUNCTION_CODES[b.table], b.count, b.bits) for b in self.blocks]
        misbehaviour = self.misbehaviour
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
            if self._out_of_step is not None:
                raise WrongAnswer(self._out_of_step, True)
            ts_ms = int(time.time() * 1000)
            framer.expected = expects[index]
            try:
                async with asyncio.timeout(timeout + 0.5):
                    response = await readers[index](
                        block.address, count=block.count, device_id=unit
                    )
            except WrongAnswer as err:
                if err.resync:
                    raise
                response = None  # counted and told by _wrong; the connection stays in step
            except (TimeoutError, ModbusIOException) as err:
                framer.expected = None
                if client.ctx.recv_buffer:  # part of a frame came, the rest never did
                    self._wrong(TRUNCATED, True)
                    raise WrongAnswer(TRUNCATED, True) from err
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
            if response is None:
                continue
            if response.isError():
                health.reads_failed += 1
                code = getattr(response, "exception_code", 0)
                what = f"Modbus exception 0x{code:02X}" if isinstance(code, int) else "exception"
                health.last_error = f"{what} on {block.table}@{block.address}"
                self._bad(what)
                continue
            try:
                values = block.decode(response.bits if block.bits else response.registers)
            except (ValueError, struct_error, TypeError) as err:
                log.debug("%s: undecodable values: %s", device_id, err)
                self._wrong("undecodable values", False)
                continue
            health.reads_ok += 1
            health.up()
            if misbehaviour.since is not None:
                self._good()
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
