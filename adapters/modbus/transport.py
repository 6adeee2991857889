"""Modbus TCP (plain, or over TLS: Modbus/TCP Security), RTU and RTU over TCP: the only module
of the product that imports pymodbus (the device side, a test tool, is
:mod:`adapters.modbus.sim.server`).

A :class:`ModbusTransport` is one link's connection (a TCP socket, or a serial port), shared by
the units on it, as an async context manager: connect in ``__aenter__``, close in
``__aexit__``. Each request names its :class:`Target` (device, unit id). pymodbus's client sends
one request at a time (a lock per client), so one request is on the wire at a time. It offers
reads and writes of one table's span and
translates pymodbus's exceptions at this boundary into :class:`DeviceUnavailable` with a
``cause`` (``refused``, ``timeout``, ``lost``, ``malformed``), keeping the original as
``__cause__``. What the link does with them (schedule, backoff, health) is
:mod:`adapters.modbus.link`.

Nothing a device sends is trusted: every frame is checked against the one request in flight
(:func:`adapters.modbus.checks.check_response`, or
:func:`~adapters.modbus.checks.check_rtu_response` for RTU framing) before pymodbus decodes
it. A wrong answer is reported to ``on_wrong`` and dropped, never a reading; one that leaves a
TCP stream out of step fails the request with :class:`WrongAnswer` (``resync``), and the link
closes the connection. RTU has no stream to fall out of step with: a bad frame (a CRC error,
a truncated frame) fails its request, and the next request is sent after the line has been
silent for the frame gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, AsyncModbusTlsClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerRTU, FramerSocket, FramerType
from pymodbus.pdu import DecodePDU, ModbusPDU, ReadCoilsRequest, ReadHoldingRegistersRequest
from pymodbus.pdu.bit_message import (
    ReadDiscreteInputsRequest,
    WriteMultipleCoilsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import (
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from adapters.modbus.checks import (
    DEVICE_IDENTIFICATION,
    MBAP_SIZE,
    RESYNC,
    TRUNCATED,
    UNDECODABLE,
    Expected,
    Verdict,
    check_response,
    check_rtu_response,
)
from adapters.modbus.config import ModbusLinkConfig
from adapters.modbus.identity import MORE_FOLLOWS, Identification
from adapters.modbus.security import REFUSED_US, TlsRefused, check_peer, explain, fingerprint
from gateway.core.errors import DeviceUnavailable, map_exceptions
from gateway.core.tasks import raise_if_cancelled

log = logging.getLogger(__name__)
# pymodbus logs every timeout at ERROR; the link reports transitions itself.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

_READERS = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}
_READ_CODES: dict[str, int] = {
    "holding": ReadHoldingRegistersRequest.function_code,
    "input": ReadInputRegistersRequest.function_code,
    "coil": ReadCoilsRequest.function_code,
    "discrete": ReadDiscreteInputsRequest.function_code,
}
# (table, one value) -> (pymodbus method, function code): FC 6/16 for registers, 5/15 for coils.
_WRITERS: dict[tuple[str, bool], tuple[str, int]] = {
    ("holding", True): ("write_register", WriteSingleRegisterRequest.function_code),
    ("holding", False): ("write_registers", WriteMultipleRegistersRequest.function_code),
    ("coil", True): ("write_coil", WriteSingleCoilRequest.function_code),
    ("coil", False): ("write_coils", WriteMultipleCoilsRequest.function_code),
}


# The shortest wait asyncio's timers honour without overshooting by about a millisecond.
_TIMER_RESOLUTION = 0.0015


class WrongAnswer(DeviceUnavailable):
    """A device's response did not match its request (``wrong`` names how, from
    :mod:`.checks`); ``resync``: the stream is out of step and the connection must close."""

    def __init__(self, device_id: str, endpoint: str, wrong: str, resync: bool) -> None:
        super().__init__(device_id, endpoint, wrong, cause="malformed")
        self.wrong = wrong
        self.resync = resync


@dataclass(frozen=True, slots=True)
class Reply:
    """A device's answer: the registers or bits read (or written back), or ``exception``, the
    Modbus exception code it answered with (0 when pymodbus gave none)."""

    values: Sequence[Any] = ()
    exception: int | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Who a request is for: the device (its id and endpoint label, for errors) and its unit."""

    device_id: str
    unit: int
    label: str


# What the framer checks an answer against: unit, function code, count, bits, address, and
# the value a single write sent (FC 5: 0xFF00 or 0; None: not a single write).
_Want = tuple[int, int, int, bool, int, int | None]


class _Checking:
    """What both checked framers share: a frame is judged against the request in flight
    (``expected``) by a pure check of :mod:`.checks` before pymodbus decodes it, and only a
    correct answer's PDU is handed on. Anything else is reported to ``on_wrong`` and dropped
    whole; nothing raised here (asyncio would log it as a fatal transport error with a
    traceback and close the connection behind the link's back)."""

    decoder: DecodePDU

    def __init__(self, decoder: DecodePDU, on_wrong: Callable[[str, bool], None]):
        # Cooperative: the pymodbus framer after this mixin in the MRO takes the decoder.
        super().__init__(decoder)  # type: ignore[call-arg]
        self._on_wrong = on_wrong
        self.expected: _Want | None = None

    def _judge(
        self,
        data: bytes,
        expected: Expected | None,
        check: Callable[[bytes, Expected | None], Verdict],
        pdu_at: tuple[int, int],
        may_resync: bool,
        ids: tuple[int, int],
    ) -> tuple[int, ModbusPDU | None]:
        """``pdu_at``: the PDU's bytes in a frame of ``used`` bytes, ``data[head:used - tail]``;
        ``may_resync``: a wrong answer can leave the stream out of step (TCP, not RTU);
        ``ids``: the unit and transaction id the answer is filed under for pymodbus."""
        head, tail = pdu_at
        pdu: ModbusPDU | None = None
        try:
            verdict = check(data, expected)
            if verdict.used == 0:
                return 0, None
            used, cause = verdict.used, verdict.cause
            if cause is None:
                pdu = self.decoder.decode(data[head : used - tail])
                cause = UNDECODABLE if pdu is None else None
        except Exception:  # a bug here must not become a transport's fatal error
            log.debug("checking a response failed", exc_info=True)
            pdu, used, cause = None, len(data), UNDECODABLE
        self.expected = None
        if pdu is None or cause is not None:
            cause = cause or UNDECODABLE
            self._on_wrong(cause, may_resync and cause in RESYNC)
            return len(data), None
        pdu.dev_id, pdu.transaction_id = ids
        return used, pdu


class _CheckedFramer(_Checking, FramerSocket):
    """MBAP framing that hands pymodbus only a frame that answers the request in flight.
    pymodbus calls :meth:`handleFrame` from the transport's ``data_received`` with everything
    received since the request went out."""

    def handleFrame(
        self, data: bytes, exp_devid: int, exp_tid: int
    ) -> tuple[int, ModbusPDU | None]:
        want = self.expected
        expected = None if want is None else Expected(exp_tid, *want)
        return self._judge(
            data, expected, check_response, (MBAP_SIZE, 0), True, (exp_devid, exp_tid)
        )


class _CheckedRtuFramer(_Checking, FramerRTU):
    """RTU framing (serial, or through a TCP socket) with the same contract: a bad frame (CRC,
    unit, function code, byte count, truncated, trailing bytes) is told and dropped with
    everything received after it. Never a resync of the connection: the line's silence before
    the next request is one."""

    def handleFrame(
        self, data: bytes, exp_devid: int, exp_tid: int
    ) -> tuple[int, ModbusPDU | None]:
        want = self.expected
        expected = None if want is None else Expected(0, *want)
        return self._judge(data, expected, check_rtu_response, (1, 2), False, (exp_devid, exp_tid))


OnWrong = Callable[[str, "Target | None"], None]
# Seconds a request spent on the wire: its answer's arrival, or the whole wait of a timeout.
# None (no metrics) costs the hot path one test per request.
OnRequest = Callable[[float], None]


class ModbusTransport:
    """One link's connection, shared by its units. ``on_wrong(cause, target)`` hears of every
    wrong answer as it arrives, with the target of the request it failed (None: bytes that no
    request was waiting for); the link counts and tells them. ``on_request(seconds)``, when
    given (metrics on), hears each request's time on the wire: to its answer (an exception
    answer too), or the whole wait of one that timed out; a wrong answer or a lost connection
    is not a latency."""

    def __init__(
        self,
        link: ModbusLinkConfig,
        on_wrong: OnWrong,
        tls_context: ssl.SSLContext | None = None,
        on_request: OnRequest | None = None,
    ) -> None:
        self.link = link
        self._on_request = on_request
        self._tls = getattr(link, "tls", None)  # Modbus/TCP Security (a tcp link's tls table)
        # Facts of the device's TLS identity once connected (for the admission evidence).
        self.peer: dict[str, str] = {}
        self._tls_error: BaseException | None = None  # why the last handshake failed
        # On TLS 1.3 a device that refuses our certificate says so after the client's side of
        # the handshake is done: an alert that closes the connection at the first request.
        self._closed_by: BaseException | None = None  # what closed the TLS connection
        self._gone = asyncio.Event()  # pymodbus saw the connection close
        self._refused: TlsRefused | None = None
        self.label = link.label
        self._on_wrong = on_wrong
        self._out_of_step: str | None = None  # a violation seen while no request was waiting
        # pymodbus keeps a response future even when nothing is asked; only one that a request
        # awaits may be failed, or asyncio reports an exception that was never retrieved.
        self._in_flight = False
        self._target: Target | None = None  # the request's, while one is in flight
        self._rtu = link.type in ("rtu", "rtu-over-tcp")
        # Serial: the silence kept between frames (RTU delimits frames by it); the line's
        # last activity, from pymodbus's packet trace.
        self._gap = link.gap if link.type == "rtu" else 0.0
        self._last_rx = 0.0
        client = self._client_for(link, tls_context)
        self._client = client
        framer_type = _CheckedRtuFramer if self._rtu else _CheckedFramer
        self._framer = framer_type(client.ctx.framer.decoder, self._wrong)
        client.ctx.framer = self._framer
        # pymodbus silently empties a receive buffer past 264 bytes; the framer judges all.
        client.ctx.max_buffer_size = 1 << 20
        # pymodbus closes a TCP connection after a few timeouts in a row; on a shared link
        # one dead unit would take the others' connection with it. The link decides.
        client.ctx.max_until_disconnect = client.ctx.count_until_disconnect = 1 << 30

    def _client_for(
        self, link: ModbusLinkConfig, tls_context: ssl.SSLContext | None
    ) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        """pymodbus's client for ``link``'s type: serial RTU, RTU through TCP, Modbus TCP, or
        (a tcp link with ``tls``) Modbus/TCP Security on ``tls_context``
        (:func:`adapters.modbus.security.client_context`, made once at start)."""
        if link.type == "tcp" and self._tls is not None:
            return self._tls_client(link.host, link.port, link.timeout, tls_context)
        if link.type == "rtu":
            return AsyncModbusSerialClient(
                link.port,
                framer=FramerType.RTU,
                baudrate=link.baud,
                bytesize=link.byte_size,
                parity=link.parity,
                stopbits=link.stop_bits,
                timeout=link.timeout,
                retries=0,
                reconnect_delay=0,
                trace_packet=self._on_packet,
                trace_connect=self._on_link,
            )
        return AsyncModbusTcpClient(
            link.host,
            port=link.port,
            framer=FramerType.RTU if link.type == "rtu-over-tcp" else FramerType.SOCKET,
            timeout=link.timeout,
            retries=0,
            reconnect_delay=0,
            trace_connect=self._on_link,
        )

    def _tls_client(
        self, host: str, port: int, timeout: float, tls_context: ssl.SSLContext | None
    ) -> AsyncModbusTlsClient:
        tls = self._tls
        assert tls is not None
        if tls_context is None:
            raise ValueError(f"{self.link.name}: a TLS link needs its client context")
        client = AsyncModbusTlsClient(
            host,
            port=port,
            sslctx=tls_context,
            timeout=timeout,
            retries=0,
            reconnect_delay=0,
            trace_connect=self._on_link,
        )
        # The TLS framing is MBAP as on TCP (pymodbus's FramerTLS is the socket framer
        # without its length check); the checked socket framer replaces it.
        # pymodbus's connect swallows every OSError (ssl's among them) into False; the
        # connection is made through this wrapper so that the reason is kept, and with the
        # configured server name (pymodbus would send the host) when one is set.
        made = client.ctx.call_create
        if tls.server_name is not None and isinstance(made, functools.partial):
            made = functools.partial(
                made.func, *made.args, **{**made.keywords, "server_hostname": tls.server_name}
            )
        client.ctx.call_create = functools.partial(self._create_connection, made)
        disconnected = client.ctx.callback_disconnected  # called before trace_connect(False)

        def closed_by(exc: Exception | None) -> None:
            self._closed_by = exc
            self._gone.set()
            disconnected(exc)

        client.ctx.callback_disconnected = closed_by  # type: ignore[method-assign]
        return client

    async def _create_connection(self, made: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        self._tls_error = None
        try:
            return await made()
        except OSError as err:
            self._tls_error = err
            raise

    def _unavailable(
        self, reason: str, cause: Any, target: Target | None = None
    ) -> DeviceUnavailable:
        if target is None:
            return DeviceUnavailable(self.link.name, self.label, reason, cause=cause)
        return DeviceUnavailable(target.device_id, target.label, reason, cause=cause)

    async def __aenter__(self) -> ModbusTransport:
        try:
            await self._connect()
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    async def _connect(self) -> None:
        try:
            with map_exceptions(
                {
                    TimeoutError: lambda e: self._unavailable(f"connect: {e!r}", "timeout"),
                    (OSError, ModbusException): lambda e: self._unavailable(
                        f"connect: {e!r}", "refused"
                    ),
                }
            ):
                async with asyncio.timeout(self.link.timeout * 2):
                    ok = await self._client.connect()
        finally:
            # pymodbus's connect awaits asyncio.wait_for; a cancel that lands once the TCP
            # connection is made leaves the socket with pymodbus (closed by close() above).
            _raise_if_cancelled()
        if not ok:
            failed = self._tls_error
            refused = None if failed is None else explain(failed)
            if refused is not None:
                raise TlsRefused(self.link.name, self.label, *refused) from failed
            why = f": {failed!r}" if failed is not None else ""
            raise self._unavailable(f"connect refused{why}", "refused")
        if self._tls is not None:
            await self._check_peer()

    async def _check_peer(self) -> None:
        """The handshake verified the device against the CA; now the pin, if any."""
        assert self._tls is not None
        link = self._client.ctx.transport
        ssl_object = None if link is None else link.get_extra_info("ssl_object")
        try:
            der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
        except ValueError:  # "handshake not done yet": the connection went under us
            ssl_object = None
        if ssl_object is None:
            # TLS 1.3: the device's alert (it refused our certificate) closed the connection
            # as the handshake ended; pymodbus hears of it on the next turns of the loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.link.timeout):
                    await self._gone.wait()
            if self._refused is not None:
                raise self._refused
            raise self._unavailable("the device closed the connection after the handshake", "lost")
        refused = check_peer(self._tls, der)
        if refused is not None:
            raise TlsRefused(self.link.name, self.label, *refused)
        assert der is not None and ssl_object is not None
        self.peer = {
            "tls_version": str(ssl_object.version()),
            "tls_peer_sha256": fingerprint(der),
        }

    async def _quiet(self) -> None:
        """Keep the line silent for the frame gap since the last byte received.

        The event loop's timers overshoot by up to a millisecond (epoll waits in whole
        milliseconds: a 0.3 ms sleep costs 1 ms or more, a third of a poll at 115,200 baud), so
        the last part of the gap is waited by yielding to the loop until it has passed: other
        tasks still run, and the gap is kept to within a loop turn."""
        loop = asyncio.get_running_loop()
        until = self._last_rx + self._gap
        quiet = until - loop.time()
        if quiet <= 0:
            return
        if quiet > _TIMER_RESOLUTION:
            await asyncio.sleep(quiet - _TIMER_RESOLUTION)  # the rest, below, to the point
        # Not an Event: nothing will set it; this is a sub-millisecond wait, yielding each turn.
        while loop.time() < until:  # noqa: ASYNC110
            await asyncio.sleep(0)

    def _on_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._last_rx = asyncio.get_running_loop().time()
        return data

    def _wrong(self, cause: str, resync: bool) -> None:
        """The framer dropped a response (or bytes nobody asked for): tell it, and fail the
        request waiting for it."""
        target = self._target if self._in_flight else None
        self._on_wrong(cause, target)
        waiting = self._client.ctx.response_future if self._in_flight else None
        if waiting is not None and not waiting.done():
            who = target.device_id if target is not None else self.link.name
            where = target.label if target is not None else self.label
            waiting.set_exception(WrongAnswer(who, where, cause, resync))
        elif resync:
            self._out_of_step = cause

    def _on_link(self, connected: bool) -> None:
        """pymodbus saw the connection go: fail the request waiting on it now, not at its
        timeout."""
        if connected:
            return
        closed_by = self._closed_by
        refused = None if closed_by is None else explain(closed_by)
        if refused is not None and refused[0] == REFUSED_US:
            self._refused = TlsRefused(self.link.name, self.label, *refused)
        if not self._in_flight:
            return
        waiting = self._client.ctx.response_future
        if not waiting.done():
            waiting.set_exception(
                self._refused or ConnectionResetError("connection closed by the device")
            )

    async def read(self, target: Target, table: str, address: int, count: int) -> Reply | None:
        """Read ``count`` registers (or bits) of ``table`` from ``address`` of ``target``;
        None: the answer was wrong but the stream stays in step (told through ``on_wrong``)."""
        call = getattr(self._client, _READERS[table])
        bits = table in ("coil", "discrete")
        response = await self._request(
            target,
            f"read {table}@{address}",
            (target.unit, _READ_CODES[table], count, bits, address, None),
            lambda: call(address, count=count, device_id=target.unit),
        )
        if response is None or response.isError():
            return None if response is None else _exception(response)
        return Reply(response.bits if bits else response.registers)

    async def write(
        self, target: Target, table: str, address: int, values: Sequence[int]
    ) -> Reply | None:
        """Write ``values`` (registers of ``holding``, or 0/1 of ``coil``) from ``address``,
        one value with FC 6 or 5, more with FC 16 or 15."""
        single = len(values) == 1
        method, code = _WRITERS[(table, single)]
        call = getattr(self._client, method)
        bits = table == "coil"
        data: Any = [bool(v) for v in values] if bits else list(values)
        if single:
            data = data[0]
        # A single write's answer echoes the value sent (FC 5: 0xFF00 for on, 0 for off).
        echo = ((0xFF00 if values[0] else 0) if bits else values[0] & 0xFFFF) if single else None
        response = await self._request(
            target,
            f"write {table}@{address}",
            (target.unit, code, len(values), bits, address, echo),
            lambda: call(address, data, device_id=target.unit),
        )
        if response is None or response.isError():
            return None if response is None else _exception(response)
        return Reply(tuple(values))

    async def read_device_information(
        self, target: Target, read_code: int, object_id: int = 0
    ) -> Identification | None:
        """FC 43 / MEI 14: the identification objects of ``target`` from ``object_id`` (read
        code 1 basic, 2 regular), one answer (the caller follows "more follows"); None: the
        answer was wrong but the stream stays in step."""
        response = await self._request(
            target,
            f"read device identification {read_code}/0x{object_id:02X}",
            (target.unit, DEVICE_IDENTIFICATION, read_code, False, object_id, None),
            lambda: self._client.read_device_information(
                read_code=read_code, object_id=object_id, device_id=target.unit
            ),
        )
        if response is None:
            return None
        if response.isError():
            return Identification(exception=_exception(response).exception)
        objects: list[tuple[int, bytes]] = []
        for oid, value in response.information.items():
            for one in value if isinstance(value, list) else [value]:
                objects.append((int(oid), bytes(one)))
        return Identification(
            tuple(objects),
            more_follows=response.more_follows == MORE_FOLLOWS,
            next_object=int(response.next_object_id),
        )

    async def _request(
        self,
        target: Target,
        what: str,
        expected: _Want,
        call: Callable[[], Awaitable[Any]],
    ) -> Any:
        if self._refused is not None:
            raise self._refused
        if self._out_of_step is not None:
            raise WrongAnswer(target.device_id, target.label, self._out_of_step, True)
        if self._gap:
            await self._quiet()
        timeout = self.link.timeout
        self._framer.expected = expected
        self._target = target
        try:
            with map_exceptions(
                {
                    (ConnectionException, ModbusException, OSError): lambda e: self._unavailable(
                        f"{what}: {e!r}", "lost", target
                    )
                }
            ):
                self._in_flight = True
                on_request = self._on_request
                sent = time.monotonic() if on_request is not None else 0.0
                try:
                    async with asyncio.timeout(timeout + 0.5):
                        response = await call()
                    if on_request is not None:
                        on_request(time.monotonic() - sent)
                except (TimeoutError, ModbusIOException) as err:
                    if on_request is not None:
                        on_request(time.monotonic() - sent)
                    self._framer.expected = None
                    self._in_flight = False  # nothing awaits the response future now
                    if self._client.ctx.recv_buffer:  # part of a frame came, the rest never did
                        resync = not self._rtu
                        self._on_wrong(TRUNCATED, target)
                        self._client.ctx.recv_buffer = b""
                        raise WrongAnswer(
                            target.device_id, target.label, TRUNCATED, resync
                        ) from err
                    raise self._unavailable(
                        f"{what}: no response within {timeout} s", "timeout", target
                    ) from err
                finally:
                    self._in_flight = False
        except WrongAnswer as err:
            if err.resync:
                raise
            response = None  # told by _wrong; the connection stays in step
        _raise_if_cancelled()
        return response


def _exception(response: Any) -> Reply:
    code = getattr(response, "exception_code", 0)
    return Reply(exception=code if isinstance(code, int) else 0)


def _raise_if_cancelled() -> None:
    """pymodbus awaits responses with ``asyncio.wait_for``, which on Python 3.11 can drop a
    cancellation that arrives with the response (see :func:`raise_if_cancelled`)."""
    raise_if_cancelled("pymodbus")
