"""Drive a running BLE simulator over its control interface (``org.fieldgate.BleSim1``)."""

from __future__ import annotations

from typing import Any

import orjson
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from adapters.ble.sim.bluetoothd import BLUEZ, CONTROL, CONTROL_PATH


class SimControl:
    """Drive a running simulator from a test or a benchmark: faults, slots, counters."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._bus: MessageBus | None = None

    async def __aenter__(self) -> SimControl:
        self._bus = await MessageBus(bus_address=self.address).connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    async def _call(self, member: str, signature: str = "", body: list[Any] | None = None) -> Any:
        assert self._bus is not None
        reply = await self._bus.call(
            Message(
                destination=BLUEZ,
                path=CONTROL_PATH,
                interface=CONTROL,
                member=member,
                signature=signature,
                body=body or [],
            )
        )
        if reply is None or reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else "no reply"
            raise RuntimeError(f"simulator {member}: {detail}")
        return reply.body[0] if reply.body else None

    async def set(self, device_id: str, key: str, value: str = "") -> None:
        await self._call("Set", "sss", [device_id, key, value])

    async def drop_link(self, device_id: str) -> None:
        await self.set(device_id, "drop-link")

    async def set_slots(self, slots: int) -> None:
        await self._call("SetSlots", "u", [slots])

    async def stats(self) -> dict[str, Any]:
        report: dict[str, Any] = orjson.loads(await self._call("Stats"))
        return report
