"""Simulated Modbus serial buses: many units on one paced RTU line, RTU over TCP, and a
serial-to-Ethernet gateway (Modbus TCP in front, units behind).

A bus is a set of :class:`~adapters.modbus.sim.devices.SimulatedDevice` units (their values,
faults and map quirks are the TCP simulator's, unchanged) sharing one line. What the line adds
is what a real RS-485 bus does to a master:

- **Timing.** A pty or a loopback socket moves bytes at once, a serial line does not. Each
  character takes 1 start + 8 data + parity + stop bits at the baud rate (11 bits at 8E1, 10 at
  8N1). A request is taken to occupy the line from its first byte for its length in characters;
  a response starts no earlier than 3.5 characters after the request's last byte would have
  arrived, and its bytes are released no faster than the baud rate. So a master never sees an
  answer sooner than a real bus could give it (``tests/test_modbus_sim_rtu.py`` asserts that
  lower bound), and a benchmark measures its polls against the line's real frame rate.
- **Silence.** A unit id no device has does not answer; a ``dead`` (or ``down``) unit never
  answers; a frame with a bad CRC is dropped, and so is everything up to the next 3.5-character
  silence, as a real slave does.
- **Independent units.** Each unit answers its own requests in order, but units do not wait
  for each other: a ``slow`` unit delays its own answer, not the next unit's, and its late
  answer goes out when it is ready, over whatever is on the line then.
- **One talker at a time.** ``overlaps`` counts frames that started while the line still carried
  another frame: a request sent before the previous request or response had finished, or a
  response a unit had to start over a master's next request. A correct master keeps it at 0;
  two masters on one line (or a gateway that does not serialise its requests) make it grow.
  The frames themselves are still served, so that the counter, not a garbled answer, is what
  a test asserts on. ``gap_violations`` counts requests that began within 3.5 characters of
  the line falling idle (no collision, but less silence than the spec asks between frames).
- **Fault ``crc:N``** (``--fault plc-3=crc:5``): every Nth response of that unit leaves with a
  corrupted CRC.

Frames are found by their length, which follows from the function code
(:func:`~adapters.modbus.sim.rtuframe.request_length`), and otherwise by the silence that ends
them. The units answer through :class:`~adapters.modbus.sim.server.UnitEngine` (pymodbus's own
request handling); this module only owns the wire, in plain asyncio.

Python API (tests and ``fieldgate simulate modbus --rtu|--rtu-over-tcp|--gateway``)::

    async with rtu_line(specs, folder, LineTiming(19200, "E")) as sim:
        sim.path            # the serial port a gateway opens (a socat pty)
        sim.bus.stats()     # requests per unit, overlaps, bad frames, ...

    async with RtuBus(specs, LineTiming(19200)) as bus, RtuOverTcp(bus, "127.0.0.1", port):
        ...                 # RTU frames through TCP, the same line behind it

    async with MbapGateway(specs, "127.0.0.1", port, max_connections=1) as gw:
        gw.stats()          # Modbus TCP in front, one request at a time behind
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import time
import tty
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.modbus.sim import rtuframe
from adapters.modbus.sim.devices import DeviceSpec, SimulatedDevice
from adapters.modbus.sim.rtuframe import LineTiming
from adapters.modbus.sim.serialline import SerialLine
from adapters.modbus.sim.server import UnitEngine

# The least silence that ends a frame whose length the function code does not give. The event
# loop cannot time a gap finer than about a millisecond, so a shorter gap would split frames
# that arrived in two reads; frames of known length never wait for it.
SILENCE_FLOOR = 0.005
SILENT_FAULTS = ("dead", "down")
SERIAL_UNITS = range(1, 248)  # 0 is broadcast, 248-255 reserved (Modbus over serial line)


def crc_every(fault: str | None) -> int | None:
    """N of a ``crc:N`` fault, else None."""
    if not fault or not fault.startswith("crc:"):
        return None
    n = int(fault.split(":", 1)[1])
    if n < 1:
        raise ValueError(f"crc:N needs N >= 1, not {n}")
    return n


@dataclass
class UnitStats:
    device_id: str
    requests: int = 0  # frames with a good CRC addressed to this unit
    answered: int = 0
    crc_faults: int = 0  # answers sent with a corrupted CRC (fault crc:N)


@dataclass
class LineStats:
    """What happened on one line; :meth:`as_dict` is what ``--stats FILE`` holds."""

    mode: str
    units: dict[int, UnitStats] = field(default_factory=dict)
    overlaps: int = 0
    # Requests that started less than 3.5 characters after the line fell idle: no collision,
    # but a real slave may take them for the tail of the previous frame (pymodbus's own
    # client does not keep this gap; a master that does keeps the counter at 0).
    gap_violations: int = 0
    bad_frames: int = 0  # CRC wrong, truncated, garbage (RTU); malformed MBAP headers
    unknown_unit: int = 0  # requests to a unit id no device has: not answered
    broadcasts: int = 0
    connections: int = 0  # open now (TCP modes)
    connections_refused: int = 0  # over the connection limit: closed at once
    dropped_bytes: int = 0  # response bytes nobody could take (a full pty, a gone socket)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "overlaps": self.overlaps,
            "gap_violations": self.gap_violations,
            "bad_frames": self.bad_frames,
            "unknown_unit": self.unknown_unit,
            "broadcasts": self.broadcasts,
            "connections": self.connections,
            "connections_refused": self.connections_refused,
            "dropped_bytes": self.dropped_bytes,
            "requests": sum(u.requests for u in self.units.values()),
            "units": {
                str(unit): {
                    "device": u.device_id,
                    "requests": u.requests,
                    "answered": u.answered,
                    "crc_faults": u.crc_faults,
                }
                for unit, u in sorted(self.units.items())
            },
        }


def _device_stats(units: dict[int, _Unit]) -> dict[str, Any]:
    """Per device (as the TCP fleet gives them): requests, writes taken, exceptions."""
    return {"devices": {u.device.spec.device_id: u.device.stats() for u in units.values()}}


class _Unit:
    def __init__(self, spec: DeviceSpec, step: float, stats: UnitStats) -> None:
        self.device = SimulatedDevice(spec, step)
        self.engine = UnitEngine(
            spec.unit, self.device.table_size(), self.device.action, self.device.identify
        )
        self.stats = stats
        self.crc_every = crc_every(spec.fault)
        self.silent = spec.fault in SILENT_FAULTS
        self.turn = asyncio.Lock()  # a unit answers its own requests one after the other


def _units(specs: list[DeviceSpec], step: float, stats: LineStats) -> dict[int, _Unit]:
    units: dict[int, _Unit] = {}
    for spec in specs:
        if spec.unit not in SERIAL_UNITS:
            raise ValueError(
                f"{spec.device_id}: unit {spec.unit} cannot be on a serial bus (1 to 247)"
            )
        if spec.unit in units:
            raise ValueError(
                f"{spec.device_id}: unit {spec.unit} is already "
                f"{units[spec.unit].device.spec.device_id} on this bus"
            )
        stats.units[spec.unit] = UnitStats(spec.device_id)
        units[spec.unit] = _Unit(spec, step, stats.units[spec.unit])
    return units


async def sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    """Sleep until ``loop.time() >= deadline``, to about 0.1 ms.

    The event loop's timers round up to whole milliseconds (epoll), which at 115,200 baud is
    ten characters: the bus would look a third slower than it is. The loop sleeps the
    milliseconds, and the last one is a plain ``time.sleep`` (it blocks the loop for under
    1.5 ms, only when a frame's end is due)."""
    remaining = deadline - loop.time()
    if remaining > 0.0015:
        await asyncio.sleep(remaining - 0.0012)
        remaining = deadline - loop.time()
    if remaining > 0:
        time.sleep(remaining)  # noqa: ASYNC251 - on purpose, see above


Send = Callable[[bytes], None]


class BusPort:
    """One way onto the line (the serial end, one TCP connection): assembles the frames its
    bytes make and hands them to the bus; the bus sends answers back through ``send``."""

    def __init__(self, bus: RtuBus, send: Send, name: str) -> None:
        self.bus = bus
        self.send = send
        self.name = name
        self._buf = b""
        self._start = 0.0
        self._hunting = False  # after a bad frame: drop bytes until the line falls silent
        self._silence: asyncio.TimerHandle | None = None
        self.closed = False

    def received(self, data: bytes) -> None:
        if self.closed or not data:
            return
        loop = self.bus.loop
        now = loop.time()
        self._rearm(now)
        if self._hunting:
            return
        if not self._buf:
            self._start = now
            self.bus.frame_started(now, len(data))
        self._buf += data
        self.bus.occupy(self._start, len(self._buf), now)
        self._split(now)

    def _split(self, now: float) -> None:
        while self._buf:
            n = rtuframe.request_length(self._buf)
            if not n or len(self._buf) < n:
                return  # more bytes, or the silence, end this frame
            adu, self._buf = self._buf[:n], self._buf[n:]
            if not self.bus.frame_received(adu, self, self._start, now):
                self._hunting, self._buf = True, b""
                return
            if self._buf:  # the next frame arrived in the same read: it started now
                self._start = now
                self.bus.frame_started(now, len(self._buf))

    def _rearm(self, now: float) -> None:
        if self._silence is not None:
            self._silence.cancel()
        delay = max(self.bus.timing.gap, SILENCE_FLOOR)
        self._silence = self.bus.loop.call_at(now + delay, self._silent)

    def _silent(self) -> None:
        """The line fell silent: whatever is buffered was one frame."""
        self._silence = None
        self._hunting = False
        adu, self._buf = self._buf, b""
        if adu:
            self.bus.frame_received(adu, self, self._start, self.bus.loop.time())

    def close(self) -> None:
        self.closed = True
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None


@dataclass(frozen=True)
class _Frame:
    adu: bytes
    port: BusPort
    end: float  # when its last byte was on the line


class RtuBus:
    """Units sharing one RTU line; each answers its own requests in the order they came.

    ``async with RtuBus(specs, timing) as bus``; then attach ways onto it: :class:`SerialPort`
    (a pty end), :class:`RtuOverTcp` (a TCP listener), or :meth:`port` for your own."""

    def __init__(
        self, specs: list[DeviceSpec], timing: LineTiming, *, step: float = 1.0, mode: str = "rtu"
    ) -> None:
        self.timing = timing
        self.specs = specs
        self.stats_ = LineStats(mode)
        self.units = _units(specs, step, self.stats_)
        self._queue: asyncio.Queue[_Frame] = asyncio.Queue()
        self._busy_until = 0.0
        self._worker: asyncio.Task[None] | None = None
        self._answering: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the bus is not running (use async with)"
        return self._loop

    def stats(self) -> dict[str, Any]:
        return {**self.stats_.as_dict(), **_device_stats(self.units)}

    def port(self, send: Send, name: str = "port") -> BusPort:
        return BusPort(self, send, name)

    async def __aenter__(self) -> RtuBus:
        self._loop = asyncio.get_running_loop()
        self._worker = asyncio.create_task(self._serve(), name=f"rtu-bus[{self.stats_.mode}]")
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = [t for t in (self._worker, *self._answering) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._worker = None

    # The line's occupancy, as the ports report bytes arriving.

    def frame_started(self, now: float, nbytes: int) -> None:
        if now < self._busy_until:
            self.stats_.overlaps += 1
        elif now < self._busy_until + self.timing.gap:
            self.stats_.gap_violations += 1
        self.occupy(now, nbytes, now)

    def occupy(self, start: float, nbytes: int, now: float) -> None:
        self._busy_until = max(self._busy_until, start + self.timing.wire_time(nbytes), now)

    def frame_received(self, adu: bytes, port: BusPort, start: float, now: float) -> bool:
        """A whole frame arrived at ``port``; False if it is not a frame (bad CRC)."""
        if rtuframe.check(adu) is None:
            self.stats_.bad_frames += 1
            return False
        end = max(start + self.timing.wire_time(len(adu)), now)
        self._queue.put_nowait(_Frame(adu, port, end))
        return True

    async def _serve(self) -> None:
        while True:
            self._dispatch(await self._queue.get())

    def _dispatch(self, item: _Frame) -> None:
        """Hand a frame to the unit it names. Units are independent, as on a real bus: a slow
        unit delays its own answers, not another unit's (its late answer may then collide
        with the next one, which ``overlaps`` counts)."""
        checked = rtuframe.check(item.adu)
        assert checked is not None
        unit_id, pdu = checked
        if unit_id == 0:  # broadcast: every unit acts, none answers
            self.stats_.broadcasts += 1
            for each in self.units.values():
                if not each.silent:
                    self._spawn(self._act(each, pdu), each)
            return
        unit = self.units.get(unit_id)
        if unit is None:
            self.stats_.unknown_unit += 1
            return
        unit.stats.requests += 1
        if not unit.silent:
            self._spawn(self._answer(unit, item, pdu), unit)

    def _spawn(self, work: Coroutine[Any, Any, None], unit: _Unit) -> None:
        task = asyncio.create_task(work, name=f"rtu-unit[{unit.device.spec.device_id}]")
        self._answering.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._answering.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            # A test tool keeps serving, and says why.
            print(f"simulated bus: {task.get_name()}: {err!r}", flush=True)

    async def _act(self, unit: _Unit, pdu: bytes) -> None:
        async with unit.turn:
            await unit.engine.execute(pdu)

    async def _answer(self, unit: _Unit, item: _Frame, pdu: bytes) -> None:
        async with unit.turn:
            answer = rtuframe.frame(unit.engine.unit, await unit.engine.execute(pdu))
            unit.stats.answered += 1
            if unit.crc_every and unit.stats.answered % unit.crc_every == 0:
                answer = rtuframe.corrupt(answer)
                unit.stats.crc_faults += 1
            await self.transmit(item.port, answer, not_before=item.end + self.timing.gap)

    async def transmit(self, port: BusPort, adu: bytes, *, not_before: float) -> None:
        """Send ``adu`` through ``port`` at the baud rate, its first character no earlier than
        ``not_before``: byte k leaves only once k + 1 characters' time has passed."""
        loop = self.loop
        start = max(loop.time(), not_before)
        if start < self._busy_until:
            self.stats_.overlaps += 1  # the unit talks over a frame still on the line
        c = self.timing.char_time
        m = len(adu)
        end = start + self.timing.wire_time(m)
        self._busy_until = max(self._busy_until, end)
        sent = 0
        while sent < m:
            now = loop.time()
            due = m if now >= end else max(0, min(m, int((now - start) / c)))
            if due > sent:
                self._send(port, adu[sent:due])
                sent = due
            if sent < m:
                # At most one write a millisecond, and the last byte precisely at its time.
                nxt = min(max(start + (sent + 1) * c, now + 0.001), end)
                if nxt >= end:
                    await sleep_until(loop, end)
                else:
                    await asyncio.sleep(nxt - now)

    def _send(self, port: BusPort, data: bytes) -> None:
        if port.closed:
            self.stats_.dropped_bytes += len(data)
            return
        try:
            port.send(data)
        except OSError:
            self.stats_.dropped_bytes += len(data)


class SerialPort:
    """Serve a bus on a serial device (a pty end: :class:`SerialLine`'s ``device_end``)."""

    def __init__(self, bus: RtuBus, path: Path) -> None:
        self.bus = bus
        self.path = path
        self._fd: int | None = None
        self._port: BusPort | None = None

    async def __aenter__(self) -> SerialPort:
        fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)
        except OSError:
            pass  # not a tty (a FIFO in a test): raw already
        self._fd = fd
        self._port = self.bus.port(self._write, name=str(self.path))
        self.bus.loop.add_reader(fd, self._readable)
        return self

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0  # nobody reads the other end and the pty is full: lost, as on a wire
        if written < len(data):
            self.bus.stats_.dropped_bytes += len(data) - written

    def _readable(self) -> None:
        assert self._fd is not None and self._port is not None
        try:
            data = os.read(self._fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            # EIO: the cable is gone (socat stopped). Stop reading, or the loop would spin on
            # a descriptor that is always readable; the answers' bytes are dropped from now on.
            self.bus.loop.remove_reader(self._fd)
            print(f"simulated bus: {self.path}: {err.strerror}; no longer reading", flush=True)
            return
        self._port.received(data)

    async def __aexit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.bus.loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._port is not None:
            self._port.close()


class _Listener(abc.ABC):
    """A TCP listener with a connection limit: over it, a connection is closed at once and
    counted (``connections_refused``), as a serial server with all its slots taken does.
    Subclasses serve one accepted connection in :meth:`connection`."""

    def __init__(self, stats: LineStats, host: str, port: int, max_connections: int | None) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self._stats = stats
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats = self._stats
        if self.max_connections is not None and stats.connections >= self.max_connections:
            stats.connections_refused += 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        stats.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self.connection(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels a connection, and asyncio's server callback would report a
            # cancelled handler as an error: end quietly then, propagate otherwise.
            if not self._stopping:
                raise
        finally:
            stats.connections -= 1
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @abc.abstractmethod
    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one accepted connection until it closes."""

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._accept, self.host, self.port)
        except OSError as err:
            raise OSError(
                f"{self.host}:{self.port} is in use, or not an address of this machine"
            ) from err
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._stopping = True
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None


class RtuOverTcp(_Listener):
    """RTU frames (CRC and all) through TCP, as cheap serial servers carry them: every
    connection is one more way onto the same bus, so two masters connected at once share (and
    can overlap on) one line. ``port=0`` picks a free port (see :attr:`port`)."""

    def __init__(
        self, bus: RtuBus, host: str, port: int, *, max_connections: int | None = None
    ) -> None:
        super().__init__(bus.stats_, host, port, max_connections)
        self.bus = bus

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        port = self.bus.port(writer.write, name=f"tcp {peer}")
        try:
            while data := await reader.read(4096):
                port.received(data)
        finally:
            port.close()

    async def __aenter__(self) -> RtuOverTcp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


MBAP_HEADER = 7


class MbapGateway(_Listener):
    """A serial-to-Ethernet gateway: one Modbus TCP listener, the units behind it on one
    (simulated) serial bus, so it serves one request at a time in arrival order, from any
    connection. A request that arrives while another is in progress is counted as an overlap
    and waits its turn. A silent unit (none with that id, ``dead``, ``down``) holds the gateway
    for ``target_timeout`` seconds, as a real gateway waits for its serial slave; then the
    request goes unanswered, or with ``answer_timeout=True`` it is answered with exception 0x0B
    (gateway target device failed to respond), which most real gateways send.

    ``timing`` (optional) is the bus behind the gateway: each answer then waits as long as the
    RTU request and response would take on it. A malformed MBAP header (protocol id not 0, a
    length out of range) closes that connection, as a real gateway does."""

    def __init__(
        self,
        specs: list[DeviceSpec],
        host: str,
        port: int,
        *,
        max_connections: int | None = 1,
        timing: LineTiming | None = None,
        target_timeout: float = 0.5,
        answer_timeout: bool = False,
        step: float = 1.0,
    ) -> None:
        stats = LineStats("gateway")
        super().__init__(stats, host, port, max_connections)
        self.stats_ = stats
        self.units = _units(specs, step, stats)
        self.timing = timing
        self.target_timeout = target_timeout
        self.answer_timeout = answer_timeout
        # Requests from every connection, in arrival order; one worker serves them.
        self._queue: asyncio.Queue[tuple[asyncio.StreamWriter, bytes, bytes]] = asyncio.Queue()
        self._busy = False
        self._worker: asyncio.Task[None] | None = None

    def stats(self) -> dict[str, Any]:
        return {**self.stats_.as_dict(), **_device_stats(self.units)}

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read requests as they come (a master that sends before its answer is in is seen
        at once, not when its turn comes) and queue them for the one worker."""
        while True:
            try:
                header = await reader.readexactly(MBAP_HEADER)
            except asyncio.IncompleteReadError as err:
                if err.partial:
                    self.stats_.bad_frames += 1
                return
            protocol = int.from_bytes(header[2:4], "big")
            length = int.from_bytes(header[4:6], "big")
            if protocol != 0 or not 2 <= length <= 254:
                self.stats_.bad_frames += 1
                return
            pdu = await reader.readexactly(length - 1)
            if self._busy or not self._queue.empty():
                self.stats_.overlaps += 1
            self._queue.put_nowait((writer, header, pdu))

    async def _serve(self) -> None:
        while True:
            writer, header, pdu = await self._queue.get()
            self._busy = True
            try:
                answer = await self._answer(header[6], pdu)
            finally:
                self._busy = False
            if answer is None or writer.is_closing():
                continue
            # Transaction id and unit as asked; protocol 0; the length of unit and PDU.
            writer.write(header[0:4] + (len(answer) + 1).to_bytes(2, "big") + header[6:7] + answer)

    async def _answer(self, unit_id: int, pdu: bytes) -> bytes | None:
        unit = self.units.get(unit_id)
        if unit is None:
            self.stats_.unknown_unit += 1
        else:
            unit.stats.requests += 1
        if unit is None or unit.silent:
            await asyncio.sleep(self.target_timeout)
            return bytes([(pdu[0] if pdu else 0) | 0x80, 0x0B]) if self.answer_timeout else None
        started = time.monotonic()
        answer = await unit.engine.execute(pdu)
        if self.timing is not None:
            # What the RTU exchange behind the gateway would take (request and answer frames:
            # unit and CRC around each PDU, and the gap between them).
            wire = self.timing.exchange_time(len(pdu) + 3, len(answer) + 3)
            await asyncio.sleep(max(0.0, wire - (time.monotonic() - started)))
        unit.stats.answered += 1
        return answer

    async def __aenter__(self) -> MbapGateway:
        self._worker = asyncio.create_task(self._serve(), name="mbap-gateway")
        try:
            await self.start()
        except BaseException:
            await self._stop_worker()
            raise
        return self

    async def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self._stop_worker()


@dataclass
class RtuLine:
    """A running simulated RTU line: ``path`` is the serial port for the gateway."""

    bus: RtuBus
    line: SerialLine

    @property
    def path(self) -> Path:
        return self.line.gateway_end


@contextlib.asynccontextmanager
async def rtu_line(
    specs: list[DeviceSpec], folder: Path, timing: LineTiming, *, step: float = 1.0
) -> AsyncIterator[RtuLine]:
    """Units on a paced RTU line behind a socat pty pair in ``folder``; the gateway opens
    ``.path``. Everything (socat included) is stopped on exit."""
    async with (
        SerialLine(folder) as line,
        RtuBus(specs, timing, step=step) as bus,
        SerialPort(bus, line.device_end),
    ):
        yield RtuLine(bus, line)


def write_stats(path: Path, stats: dict[str, Any]) -> None:
    """Replace ``path`` with ``stats`` as JSON, atomically (a reader never sees half)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
