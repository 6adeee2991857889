"""The device side of Modbus TCP, for the simulators and tests: a pymodbus server, plain or
Modbus/TCP Security (mutual TLS, requests authorized by the client's role).

A test tool (``adapters/*/sim/`` may import anything): the product's one pymodbus module is
:mod:`adapters.modbus.transport`.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pymodbus.constants import DeviceInformation, ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.decoders import DecodePDU
from pymodbus.pdu.exceptionresponse import ExceptionResponse
from pymodbus.pdu.mei_message import ReadDeviceInformationRequest, ReadDeviceInformationResponse
from pymodbus.server import ModbusTcpServer, ModbusTlsServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from gateway.core.errors import PkiError
from gateway.core.tlsprofile import MIN_VERSION, TLS12_CIPHERS
from gateway.identity.pki import modbus_role

# (function code, request address, request count, the accessed table's registers, is it a
# write) -> Modbus exception code or None.
DeviceAction = Callable[[int, int, int, list[int], bool], Awaitable[int | None]]
# FC 43 (read code, first object id) -> the objects to answer with (id -> value), or a Modbus
# exception code.
Identify = Callable[[int, int], "dict[int, bytes] | int"]


class DeviceServer:
    """A Modbus TCP device: four tables (coils, discrete inputs, holding and input registers)
    of ``size`` entries each, on its own port; ``action`` sees every request first and may
    change the registers in place or answer with an exception code."""

    def __init__(
        self,
        host: str,
        port: int,
        unit: int,
        size: int,
        action: DeviceAction,
        identify: Identify | None = None,
    ) -> None:
        self.address = (host, port)
        self._unit = unit
        self._size = size
        self._action = action
        self._identify = identify
        self._server: ModbusTcpServer | None = None  # a ModbusTlsServer is one too

    async def _on_access(
        self,
        function_code: int,
        _start: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: Any,
    ) -> ExcCodes | None:
        code = await self._action(function_code, address, count, registers, set_values is not None)
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
        if self._identify is not None:
            _answer_identification(self._server.decoder, self._identify)
        await self._server.serve_forever(background=True)
        return self

    def drop_connections(self) -> int:
        """Abort every client connection now (a device unplugged); returns how many."""
        if self._server is None:
            return 0
        dropped = 0
        for connection in list(self._server.active_connections.values()):
            transport = connection.transport
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]
                dropped += 1
        return dropped

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None


# -- Modbus/TCP Security ----------------------------------------------------------------------


def server_context(
    cert: Path, key: Path, passphrase: bytes | None, client_ca: Path
) -> ssl.SSLContext:
    """A device's side of Modbus/TCP Security: TLS 1.2+ with the gateway's suites, its own
    certificate, and a client certificate from ``client_ca`` required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(client_ca))
    ctx.load_cert_chain(str(cert), str(key), password=passphrase or b"")
    return ctx


class TlsDeviceServer(DeviceServer):
    """A Modbus/TCP Security device: mutual TLS (a client certificate from its CA, or no
    handshake), then authorization by the role the client's certificate carries.

    A connection whose certificate has no role, a malformed one or one not in ``roles`` is
    kept open, and every request on it is answered with exception 01 (Illegal Function), as
    the specification has an unauthorized request answered. ``refusals`` counts those
    answers; ``roles_seen`` lists the role of every connection (None: none, or malformed)."""

    def __init__(
        self,
        host: str,
        port: int,
        unit: int,
        size: int,
        action: DeviceAction,
        *,
        sslctx: ssl.SSLContext,
        roles: frozenset[str],
        identify: Identify | None = None,
    ) -> None:
        super().__init__(host, port, unit, size, action, identify)
        self.sslctx = sslctx
        self.roles = roles
        self.refusals = 0
        self.roles_seen: list[str | None] = []

    async def __aenter__(self) -> TlsDeviceServer:
        self._server = _RoleCheckingServer(
            self, self._device(), address=self.address, sslctx=self.sslctx
        )
        if self._identify is not None:
            _answer_identification(self._server.decoder, self._identify)
        await self._server.serve_forever(background=True)
        return self

    def authorize(self, peer_der: bytes | None) -> bool:
        """Whether a connection with this client certificate may be served."""
        try:
            role = None if peer_der is None else modbus_role(peer_der)
        except PkiError:
            role = None
        self.roles_seen.append(role)
        return role is not None and role in self.roles


class _RoleCheckingServer(ModbusTlsServer):
    def __init__(self, device: TlsDeviceServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device = device

    def callback_new_connection(self) -> ServerRequestHandler:
        return _RoleCheckingHandler(  # type: ignore[no-untyped-call]
            self, self.trace_packet, self.trace_pdu, self.trace_connect
        )


class _RoleCheckingHandler(ServerRequestHandler):
    """One client connection: the role is read once the handshake is done (asyncio calls
    ``connection_made`` after it), and decides every request on the connection."""

    authorized = False

    def callback_connected(self) -> None:
        super().callback_connected()
        link = self.transport
        ssl_object = None if link is None else link.get_extra_info("ssl_object")
        der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
        self.authorized = self.server.device.authorize(der)

    async def handle_request(self) -> None:
        request = self.last_pdu
        if request is None or self.authorized:
            await super().handle_request()  # type: ignore[no-untyped-call]
            return
        self.server.device.refusals += 1
        self.server_send(  # type: ignore[no-untyped-call]
            ExceptionResponse(
                request.function_code,
                exception_code=ExcCodes.ILLEGAL_FUNCTION,
                device_id=request.dev_id,
                transaction=request.transaction_id,
            ),
            self.last_addr,
        )


def _answer_identification(decoder: DecodePDU, identify: Identify) -> None:
    """Serve FC 43 / MEI 14 from this device's own objects.

    pymodbus answers Read Device Identification from one process-wide control block (a
    singleton), so every server in a process would show the same identity; here the server's
    (or a bus unit's) own decoder maps MEI 14 to a request class bound to ``identify``.
    pymodbus's response encodes "more follows" itself when the objects exceed one frame."""

    class _Request(ReadDeviceInformationRequest):
        async def datastore_update(self, context: Any, device_id: int) -> ModbusPDU:
            _ = context
            if self.read_code not in set(DeviceInformation):
                return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_VALUE)
            answer = identify(self.read_code, self.object_id)
            if isinstance(answer, int):
                return ExceptionResponse(self.function_code, answer)
            if self.read_code == DeviceInformation.SPECIFIC:
                chosen = {k: v for k, v in answer.items() if k == self.object_id}
            else:
                top = {DeviceInformation.BASIC: 0x03, DeviceInformation.REGULAR: 0x80}.get(
                    DeviceInformation(self.read_code), 0x100
                )
                start = self.object_id if self.object_id < top else 0
                chosen = {k: v for k, v in sorted(answer.items()) if start <= k < top}
            if not chosen:
                return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_ADDRESS)
            return ReadDeviceInformationResponse(
                read_code=self.read_code,
                information=dict(chosen),
                dev_id=device_id,
                transaction_id=self.transaction_id,
            )

    table = {code: dict(subs) for code, subs in DecodePDU.pdu_sub_table.items()}
    table[_Request.function_code][_Request.sub_function_code] = (
        _Request,
        ReadDeviceInformationResponse,
    )
    decoder.pdu_sub_table = table  # this server's decoder only


class UnitEngine:
    """One unit behind a simulated serial bus or serial-to-Ethernet gateway: a request PDU in,
    the response PDU out, through pymodbus's own request decoding and datastore (the same
    tables and ``action`` as :class:`DeviceServer`, without a listener). The bus around it
    (:mod:`adapters.modbus.sim.bus`) owns the wire: framing, pacing, silence, faults."""

    def __init__(
        self, unit: int, size: int, action: DeviceAction, identify: Identify | None = None
    ) -> None:
        # The device is built exactly as a TCP device server builds it (its own tables and
        # access hook); the port is never opened.
        from pymodbus.pdu import DecodePDU
        from pymodbus.simulator.simcore import SimCore

        self.unit = unit
        self._core = SimCore(DeviceServer("", 0, unit, size, action)._device())
        self._decoder = DecodePDU(True)
        if identify is not None:  # FC 43 from this unit's own objects
            _answer_identification(self._decoder, identify)

    async def execute(self, pdu: bytes) -> bytes:
        """The response PDU (function code first) to the request PDU ``pdu``: what
        pymodbus's server would answer, exception responses included."""
        from pymodbus.pdu import ExceptionResponse

        request = self._decoder.decode(pdu) if pdu else None
        if request is None:
            # A function pymodbus knows but cannot decode (a count out of range, a short
            # body) is an illegal data value; an unknown function is an illegal function.
            known = bool(pdu) and self._decoder.lookupPduClass(pdu) is not None
            code = ExcCodes.ILLEGAL_VALUE if known else ExcCodes.ILLEGAL_FUNCTION
            response: Any = ExceptionResponse(pdu[0] if pdu else 0, code)
        else:
            try:
                response = await request.datastore_update(self._core, self.unit)  # type: ignore[arg-type]
            except Exception:  # pymodbus's own server answers 04 the same way
                response = ExceptionResponse(request.function_code, ExcCodes.DEVICE_FAILURE)
        encoded: bytes = response.encode()
        return bytes([response.function_code]) + encoded
