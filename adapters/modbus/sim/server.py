"""The device side of Modbus TCP, for the simulators and tests: a pymodbus server.

A test tool (``adapters/*/sim/`` may import anything): the product's one pymodbus module is
:mod:`adapters.modbus.transport`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pymodbus.constants import DeviceInformation, ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.decoders import DecodePDU
from pymodbus.pdu.exceptionresponse import ExceptionResponse
from pymodbus.pdu.mei_message import ReadDeviceInformationRequest, ReadDeviceInformationResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

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
        self._server: ModbusTcpServer | None = None

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
            _answer_identification(self._server, self._identify)
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


def _answer_identification(server: ModbusTcpServer, identify: Identify) -> None:
    """Serve FC 43 / MEI 14 from this device's own objects.

    pymodbus answers Read Device Identification from one process-wide control block (a
    singleton), so every server in a process would show the same identity; here the server's
    own decoder maps MEI 14 to a request class bound to ``identify``. pymodbus's response
    encodes "more follows" itself when the objects exceed one frame."""

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

    decoder = server.decoder
    table = {code: dict(subs) for code, subs in DecodePDU.pdu_sub_table.items()}
    table[_Request.function_code][_Request.sub_function_code] = (
        _Request,
        ReadDeviceInformationResponse,
    )
    decoder.pdu_sub_table = table  # this server's decoder only
