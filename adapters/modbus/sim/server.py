"""The device side of Modbus TCP, for the simulators and tests: a pymodbus server.

A test tool (``adapters/*/sim/`` may import anything): the product's one pymodbus module is
:mod:`adapters.modbus.transport`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

# (function code, request address, request count, the accessed table's registers, is it a
# write) -> Modbus exception code or None.
DeviceAction = Callable[[int, int, int, list[int], bool], Awaitable[int | None]]


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
        await self._server.serve_forever(background=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None


class UnitEngine:
    """One unit behind a simulated serial bus or serial-to-Ethernet gateway: a request PDU in,
    the response PDU out, through pymodbus's own request decoding and datastore (the same
    tables and ``action`` as :class:`DeviceServer`, without a listener). The bus around it
    (:mod:`adapters.modbus.sim.bus`) owns the wire: framing, pacing, silence, faults."""

    def __init__(self, unit: int, size: int, action: DeviceAction) -> None:
        # The device is built exactly as a TCP device server builds it (its own tables and
        # access hook); the port is never opened.
        from pymodbus.pdu import DecodePDU
        from pymodbus.simulator.simcore import SimCore

        self.unit = unit
        self._core = SimCore(DeviceServer("", 0, unit, size, action)._device())
        self._decoder = DecodePDU(True)

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
