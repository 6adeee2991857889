"""BlueZ over D-Bus: the only module that imports bleak and dbus_fast.

Everything else in the BLE adapter sees fieldgate's own small surface: :func:`ready` (is
bluetoothd there), a :class:`Scanner` that reports what advertises, a :class:`Connection` to one
device (connect, pair, read, write, notify), fieldgate's pairing :class:`Agent`, and the errors
they raise: :class:`BlueZUnavailable`, :class:`DeviceGone`, :class:`PairingFailed` and
:class:`AttError` (the peripheral answered a GATT request with an ATT error). Every
library exception is translated at this boundary by :func:`translate`, keeping the cause.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bleak import BleakClient, BleakScanner
from bleak.backends.bluezdbus.manager import get_global_bluez_manager
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import (
    PROTOCOL_ERROR_CODES,
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
)
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from gateway.core.errors import FieldgateError

log = logging.getLogger("adapters.ble")
# bleak asks the bluetoothctl tool for BlueZ's version and warns when it is missing (as in most
# containers); fieldgate only needs the D-Bus API.
logging.getLogger("bleak.backends.bluezdbus.version").setLevel(logging.ERROR)

AGENT_PATH = "/org/fieldgate/agent"
AGENT = "org.bluez.Agent1"
# What a D-Bus peer, bleak or the socket under them raise when a radio operation fails.
_FAILURES = (BleakError, TimeoutError, OSError, EOFError)


class BlueZError(FieldgateError):
    """A BlueZ operation failed. ``reason`` is "``what``: ``detail``", the detail in BlueZ's
    own words where it gave any."""

    def __init__(self, what: str, detail: str = "") -> None:
        self.detail = detail
        self.reason = f"{what}: {detail}" if detail else what
        super().__init__(self.reason)


class BlueZUnavailable(BlueZError):
    """bluetoothd (or the bus it is on) cannot be reached."""


class DeviceGone(BlueZError):
    """BlueZ no longer knows the device (removed after discovery): it must be found again."""


class PairingFailed(BlueZError):
    pass


class AttError(BlueZError):
    """The peripheral refused a GATT request with an ATT error (``code``, as in the Core
    specification, Vol 3 Part F 3.4.1.1): the link is fine, the request is not."""

    def __init__(self, what: str, code: int) -> None:
        self.code = code
        name = PROTOCOL_ERROR_CODES.get(code, "unknown error")
        super().__init__(what, f"ATT error 0x{code:02X} ({name})")


def why(err: BaseException) -> str:
    if isinstance(err, BleakDBusError):
        detail = err.dbus_error_details
        return f"{err.dbus_error}" + (f": {detail}" if detail else "")
    if isinstance(err, TimeoutError):
        return "timed out"
    return str(err) or type(err).__name__


@contextlib.contextmanager
def _gone_if_unknown(path: str, what: str) -> Iterator[None]:
    """bleak's manager raises KeyError for a device path BlueZ has dropped."""
    try:
        yield
    except KeyError as err:
        raise DeviceGone(what, f"BlueZ no longer knows {path}") from err


@contextlib.contextmanager
def translate(what: str) -> Iterator[None]:
    """Map a radio operation's failure to :class:`BlueZError` ("``what``: reason")."""
    try:
        yield
    except BleakDeviceNotFoundError as err:
        raise DeviceGone(what, why(err)) from err
    except BleakGATTProtocolError as err:  # bleak read it out of BlueZ's D-Bus error
        raise AttError(what, int(err.code)) from err
    except _FAILURES as err:
        raise BlueZError(what, why(err)) from err


async def ready() -> None:
    """Return once bluetoothd answers on the system bus (``DBUS_SYSTEM_BUS_ADDRESS``)."""
    try:
        await get_global_bluez_manager()
    except (BleakError, OSError, EOFError) as err:
        raise BlueZUnavailable("BlueZ not reachable", why(err)) from err


@dataclass(frozen=True, slots=True)
class Found:
    """A device BlueZ reports, as a handle to connect to."""

    address: str
    handle: BLEDevice


Seen = Callable[[Found, dict[int, bytes]], None]


class Scanner:
    """Discovery on one adapter while inside the block; ``seen`` gets each advertisement
    (the device and its manufacturer data by company id)."""

    def __init__(self, adapter: str, seen: Seen) -> None:
        def callback(device: BLEDevice, adv: AdvertisementData) -> None:
            seen(Found(device.address.upper(), device), adv.manufacturer_data)

        self._scanner = BleakScanner(detection_callback=callback, bluez={"adapter": adapter})

    async def __aenter__(self) -> Scanner:
        with translate("discovery"):
            await self._scanner.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(*_FAILURES):
            await self._scanner.stop()


Notify = Callable[[bytearray], None]


class Connection:
    """One GATT connection through bleak's BlueZ backend. ``lost`` is called when the link
    drops after :meth:`connect` returned (bleak's drops of connects it retried itself are not
    reported)."""

    def __init__(
        self, found: Found, adapter: str, timeout: float, lost: Callable[[], None]
    ) -> None:
        self._found = found
        self._lost = lost
        self._connected = False
        self._client = BleakClient(
            found.handle,
            disconnected_callback=self._dropped,
            timeout=timeout,
            bluez={"adapter": adapter},
        )

    def _dropped(self, _client: BleakClient) -> None:
        if self._connected:
            self._lost()

    @property
    def path(self) -> str:
        return str(self._found.handle.details["path"])

    @property
    def address(self) -> str:
        return self._client.address.upper()

    async def connect(self) -> None:
        with translate("connect"):
            await self._client.connect()
        self._connected = True
        if not self._client.is_connected:
            self._lost()

    async def disconnect(self) -> None:
        self._connected = False
        with contextlib.suppress(*_FAILURES):
            await self._client.disconnect()

    async def paired(self) -> bool:
        with translate("pairing state"), _gone_if_unknown(self.path, "pairing state"):
            manager = await get_global_bluez_manager()
            return bool(manager.is_paired(self.path))

    async def identity_address(self) -> str:
        """The identity address BlueZ shows for a bonded device."""
        with translate("identity address"), _gone_if_unknown(self.path, "identity address"):
            manager = await get_global_bluez_manager()
            return str(manager.get_device_address(self.path)).upper()

    async def pair(self) -> None:
        try:
            await self._client.pair()
        except _FAILURES as err:  # BlueZ's refusal (a D-Bus error), a timeout, a lost bus
            raise PairingFailed("pairing failed", why(err)) from err

    async def read(self, uuid: str) -> bytes:
        with translate(f"read {uuid}"):
            return bytes(await self._client.read_gatt_char(uuid))

    async def write(self, uuid: str, data: bytes) -> None:
        """A write with response: returns once the peripheral has accepted it; raises
        :class:`AttError` when it refuses it."""
        with translate(f"write {uuid}"):
            await self._client.write_gatt_char(uuid, data, response=True)

    async def start_notify(self, uuid: str, callback: Notify) -> None:
        """Notifications through AcquireNotify where the device offers it, else signals."""

        def on_notify(_char: Any, data: bytearray) -> None:
            callback(data)

        with translate(f"subscribe {uuid}"):
            await self._client.start_notify(uuid, on_notify, bluez={"use_start_notify": False})


@dataclass
class Pairing:
    passkey: int | None
    passkey_given: bool = False


class Agent:
    """fieldgate's ``org.bluez.Agent1``: answers only for the device it is pairing right now.

    A passkey request is answered with the configured passkey (authenticated pairing). Where
    the config asks for Just Works, a request to authorize or confirm is accepted (and the bond
    counts as Just Works); where it asks for an authenticated bond, numeric comparison is
    refused: a headless gateway has no display to compare. Anything for a device fieldgate did
    not ask to pair is refused.
    """

    def __init__(self) -> None:
        self._bus: MessageBus | None = None
        self.pairing: dict[str, Pairing] = {}

    async def __aenter__(self) -> Agent:
        try:
            bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        except (OSError, EOFError, ValueError) as err:  # no bus, refused, a bad bus address
            raise BlueZUnavailable("pairing agent: system bus not reachable", why(err)) from err
        self._bus = bus
        bus.add_message_handler(self._on_message)
        for member, signature, body in (
            ("RegisterAgent", "os", [AGENT_PATH, "KeyboardDisplay"]),
            ("RequestDefaultAgent", "o", [AGENT_PATH]),
        ):
            reply = await bus.call(
                Message(
                    destination="org.bluez",
                    path="/org/bluez",
                    interface="org.bluez.AgentManager1",
                    member=member,
                    signature=signature,
                    body=body,
                )
            )
            if reply is None or reply.message_type == MessageType.ERROR:
                detail = reply.body if reply is not None else "no reply"
                log.warning("pairing agent: %s failed: %s", member, detail)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    def _on_message(self, msg: Message) -> Message | bool:
        if msg.message_type != MessageType.METHOD_CALL or msg.path != AGENT_PATH:
            return False
        if msg.interface != AGENT:
            return False
        member = msg.member
        if member in ("Release", "Cancel", "DisplayPasskey", "DisplayPinCode"):
            return Message.new_method_return(msg)
        device = msg.body[0] if msg.body else ""
        pairing = self.pairing.get(device)
        if member == "RequestPasskey" and pairing is not None and pairing.passkey is not None:
            pairing.passkey_given = True
            return Message.new_method_return(msg, "u", [pairing.passkey])
        if (
            member in ("RequestAuthorization", "RequestConfirmation")
            and pairing is not None
            and pairing.passkey is None
        ):
            return Message.new_method_return(msg)
        log.warning("pairing agent: refused %s for %s", member, device)
        return Message.new_error(msg, "org.bluez.Error.Rejected", f"{member} refused by fieldgate")
