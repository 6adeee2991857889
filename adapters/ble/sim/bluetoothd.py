"""Simulated BLE peripherals behind a simulated bluetoothd, on a private D-Bus.

There is no radio here and no kernel Bluetooth, so the simulator stands in for bluetoothd: a
private ``dbus-daemon`` (:class:`PrivateBus`) and a service on it that owns ``org.bluez`` and
exports the object tree bleak's BlueZ backend walks (``ObjectManager`` at ``/``,
``AgentManager1``, ``Adapter1`` at ``/org/bluez/hci0``, then ``Device1``, ``GattService1`` and
``GattCharacteristic1`` per peripheral, with BlueZ's path names, from which bleak reads handles).
bleak runs unchanged against it.

It models what bleak and real BlueZ show: devices appear only while someone discovers; a device
never connected, paired or trusted is removed 30 s after discovery stops; Connect sets
``Connected``, exports the GATT objects, then ``ServicesResolved``; a link drop sets
``Connected`` false; one connect at a time per adapter (``InProgress``); a connection-slot
limit; ``le-connection-abort-by-local``; pairing through the registered ``Agent1`` (Just Works,
or passkey entry, which is authenticated); a device with a resolvable private address switches
``Address`` to its identity address once bonded; characteristics that need encryption refuse
reads before pairing; notifications by ``StartNotify`` (``PropertiesChanged`` on ``Value``) or
``AcquireNotify`` (a ``SOCK_SEQPACKET`` socket per characteristic).

Each peripheral has the fieldgate sensor profile (:mod:`adapters.ble.gatt`): a measurement
characteristic (notify, read) whose values are a pure function of (seed, counter), a status
characteristic (read), a setpoint (read, write) that holds what was last written to it, and,
when the peripheral has a key, the HMAC challenge characteristic. Every write that reaches a
data characteristic is counted (``writes``; ``write_requests`` those with response), so a test
can tell that a refused command reached no device; a peripheral told to (``write-error``)
answers writes to its setpoint with that ATT error, reported the way BlueZ reports it.

Faults are set at start (``--set``) or at run time through ``org.fieldgate.BleSim1`` on
``/org/fieldgate/sim`` (:class:`SimControl`): connect aborts, slow connects, dropping a link,
garbage or short notifications, a wrong or replayed challenge answer, the slot limit, writes
refused with an ATT error or answered late.

Every message the service sends goes through one ordered outbox that waits while the socket's
send queue is deep: dbus-fast drops the whole connection when a send hits a full socket buffer.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import random
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from dbus_fast import Message, MessageType, RequestNameReply, Variant
from dbus_fast.aio import MessageBus

from adapters.ble import gatt
from adapters.ble.sim.fleet import (
    MEASUREMENT_DECODER,
    PeripheralSpec,
    apply_setting,
    measurement_raw,
    setpoint_raw,
)

log = logging.getLogger(__name__)

BLUEZ = "org.bluez"
OM = "org.freedesktop.DBus.ObjectManager"
PROPS = "org.freedesktop.DBus.Properties"
ADAPTER = "org.bluez.Adapter1"
DEVICE = "org.bluez.Device1"
SERVICE = "org.bluez.GattService1"
CHAR = "org.bluez.GattCharacteristic1"
AGENT_MANAGER = "org.bluez.AgentManager1"
AGENT = "org.bluez.Agent1"
CONTROL = "org.fieldgate.BleSim1"
CONTROL_PATH = "/org/fieldgate/sim"
ABORT = "le-connection-abort-by-local"
TEMPORARY_TIMEOUT = 30.0  # BlueZ's TemporaryTimeout: unknown devices go 30 s after discovery
ADVERTISE_EVERY = 2.0  # seconds between advertisements (RSSI updates) while discovering
MTU = 247
_OUTQ_LIMIT = 64 * 1024  # bytes queued in the socket before the outbox waits

# Handles, as BlueZ names them in object paths (bleak parses them back out).
SERVICE_NODE = "service000a"
NODES = {
    gatt.MEASUREMENT: f"{SERVICE_NODE}/char000b",
    gatt.STATUS: f"{SERVICE_NODE}/char000d",
    gatt.CHALLENGE: f"{SERVICE_NODE}/char000f",
    gatt.SETPOINT: f"{SERVICE_NODE}/char0011",
}


class SimError(Exception):
    """A D-Bus error reply: ``name`` such as ``org.bluez.Error.Failed``, and its text."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name = name
        self.text = text


def att_error(code: int) -> SimError:
    """A peripheral's ATT error as BlueZ reports it on D-Bus (``create_gatt_dbus_error`` in
    BlueZ's src/gatt-client.c): a few codes have errors of their own, the rest are ``Failed``
    with the code in the text (from which bleak reads it back)."""
    named = {
        0x02: ("NotPermitted", "Read not permitted"),
        0x03: ("NotPermitted", "Write not permitted"),
        0x05: ("NotPermitted", "Not paired"),
        0x0C: ("NotPermitted", "Not paired"),
        0x0F: ("NotPermitted", "Not paired"),
        0x06: ("NotSupported", "Not Supported"),
        0x07: ("InvalidArguments", "Invalid offset"),
        0x08: ("NotAuthorized", "Not Authorized"),
        0x0D: ("InvalidArguments", "Invalid Length"),
    }
    if code in named:
        name, text = named[code]
        return SimError(f"org.bluez.Error.{name}", text)
    return SimError("org.bluez.Error.Failed", f"Operation failed with ATT error: 0x{code:02x}")


# -- the simulated bluetoothd ----------------------------------------------------------------------


def _random_private_address() -> str:
    # Resolvable private addresses have the two top bits 01.
    first = 0x40 | random.randrange(0x40)
    rest = [random.randrange(256) for _ in range(5)]
    return ":".join(f"{b:02X}" for b in (first, *rest))


@dataclass
class Peripheral:
    spec: PeripheralSpec
    adapter: str
    path: str
    address: str
    acquire: bool = True  # offers AcquireNotify beside StartNotify
    exported: bool = False  # Device1 visible on the bus
    gatt_exported: bool = False
    connected: bool = False
    services_resolved: bool = False
    paired: bool = False
    trusted: bool = False
    ever_connected: bool = False
    counter: int = 0
    notifying: str | None = None  # "start" or "acquire"
    sock: socket.socket | None = None
    timer: asyncio.TimerHandle | None = None
    nonce: bytes = b""
    first_response: bytes | None = None
    removal: asyncio.TimerHandle | None = None
    setpoint: bytes = b""
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "connects": 0,
            "disconnects": 0,
            "notifications": 0,
            "dropped": 0,
            "pairings": 0,
            "challenges": 0,
            "writes": 0,  # writes that reached a data characteristic, whatever the answer
            "write_requests": 0,  # of which with response
            "writes_refused": 0,
        }
    )

    def __post_init__(self) -> None:
        self.setpoint = struct.pack(gatt.SETPOINT_FORMAT, setpoint_raw(self.spec.seed))

    def status_value(self) -> bytes:
        return struct.pack(gatt.STATUS_FORMAT, 3000 - self.spec.seed % 500, int(time.monotonic()))

    def measurement(self) -> bytes:
        return MEASUREMENT_DECODER.encode(measurement_raw(self.spec.seed, self.counter))

    def device_props(self) -> dict[str, Variant]:
        spec = self.spec
        uuids = [gatt.SENSOR_SERVICE]
        manufacturer = {0xFFFF: Variant("ay", (spec.app_id or "").encode())}
        return {
            "Address": Variant("s", self.address),
            "AddressType": Variant("s", "random"),
            "Name": Variant("s", f"fg-sensor {spec.seed + 1}"),
            "Alias": Variant("s", f"fg-sensor {spec.seed + 1}"),
            "Adapter": Variant("o", f"/org/bluez/{self.adapter}"),
            "Paired": Variant("b", self.paired),
            "Bonded": Variant("b", self.paired),
            "Trusted": Variant("b", self.trusted),
            "Blocked": Variant("b", False),
            "LegacyPairing": Variant("b", False),
            "Connected": Variant("b", self.connected),
            "ServicesResolved": Variant("b", self.services_resolved),
            "RSSI": Variant("n", -40 - spec.seed % 50),
            "UUIDs": Variant("as", uuids),
            "ManufacturerData": Variant("a{qv}", manufacturer),
            "ServiceData": Variant("a{sv}", {}),
        }

    def gatt_objects(self) -> dict[str, dict[str, dict[str, Variant]]]:
        """The GATT objects, by path; characteristics needing encryption say so in Flags."""
        secure = self.spec.bond != "none"
        service_path = f"{self.path}/{SERVICE_NODE}"
        objects: dict[str, dict[str, dict[str, Variant]]] = {
            service_path: {
                SERVICE: {
                    "UUID": Variant("s", gatt.SENSOR_SERVICE),
                    "Device": Variant("o", self.path),
                    "Primary": Variant("b", True),
                    "Includes": Variant("ao", []),
                }
            }
        }
        chars = [
            (gatt.MEASUREMENT, ["read", "notify"] + (["encrypt-read"] if secure else [])),
            (gatt.STATUS, ["read"] + (["encrypt-read"] if secure else [])),
            (
                gatt.SETPOINT,
                ["read", "write"] + (["encrypt-read", "encrypt-write"] if secure else []),
            ),
        ]
        if self.spec.key is not None:
            chars.append((gatt.CHALLENGE, ["read", "write"]))
        for uuid, flags in chars:
            props: dict[str, Variant] = {
                "UUID": Variant("s", uuid),
                "Service": Variant("o", service_path),
                "Value": Variant("ay", b""),
                "Flags": Variant("as", flags),
                "MTU": Variant("q", MTU),
            }
            if "notify" in flags:
                props["Notifying"] = Variant("b", False)
                if self.acquire:
                    props["NotifyAcquired"] = Variant("b", False)
            objects[f"{self.path}/{NODES[uuid]}"] = {CHAR: props}
        return objects


class BlueZSimulator:
    """The ``org.bluez`` service: one adapter and its peripherals. An async context manager:
    connects to the bus, takes the name, and serves until exit."""

    def __init__(
        self,
        address: str,
        specs: list[PeripheralSpec],
        *,
        adapter: str = "hci0",
        slots: int = 10_000,
        temporary_timeout: float = TEMPORARY_TIMEOUT,
        acquire_notify: bool = True,
    ) -> None:
        self.bus_address = address
        self.adapter = adapter
        self.adapter_path = f"/org/bluez/{adapter}"
        self.slots = slots
        self.temporary_timeout = temporary_timeout
        self.offer_acquire = acquire_notify
        self.peripherals: dict[str, Peripheral] = {}
        self.by_id: dict[str, Peripheral] = {}
        for spec in specs:
            address_now = _random_private_address() if spec.rpa else spec.identity
            p = Peripheral(
                spec,
                adapter,
                gatt.device_path(adapter, address_now),
                address_now,
                acquire=acquire_notify,
            )
            self.peripherals[p.path] = p
            self.by_id[spec.device_id] = p
        self.discovering = 0  # clients discovering
        self.connecting = False
        self.agent: tuple[str, str] | None = None  # (bus name, path)
        self.stats = {"connect_in_progress": 0, "slot_refusals": 0, "aborts": 0, "max_connected": 0}
        self._bus: MessageBus | None = None
        self._outbox: deque[Message] = deque()
        self._outbox_ready = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._advertiser: asyncio.Task[None] | None = None

    # -- lifetime --

    async def __aenter__(self) -> BlueZSimulator:
        # negotiate_unix_fd: AcquireNotify hands out file descriptors.
        bus = await MessageBus(bus_address=self.bus_address, negotiate_unix_fd=True).connect()
        self._bus = bus
        bus.add_message_handler(self._on_message)
        self._spawn(self._send_loop(), "outbox")
        reply = await bus.request_name(BLUEZ)
        if reply != RequestNameReply.PRIMARY_OWNER:
            await self.__aexit__()
            raise OSError(f"{self.bus_address}: org.bluez is already served ({reply.name})")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in self.peripherals.values():
            self._stop_notify(p)
        for task in list(self._tasks):
            task.cancel()
        if self._bus is not None:
            self._bus.disconnect()
            with contextlib.suppress(Exception):
                await self._bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            self._bus = None

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the ordered outbox --

    def _send(self, msg: Message) -> None:
        self._outbox.append(msg)
        self._outbox_ready.set()

    def _outq(self) -> int:
        bus = self._bus
        if bus is None or bus._sock is None:
            return 0
        buf = array.array("i", [0])
        fcntl.ioctl(bus._sock.fileno(), termios.TIOCOUTQ, buf)
        return buf[0]

    async def _send_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                # No event says "the daemon has read enough": the kernel's send queue is polled.
                while self._outq() > _OUTQ_LIMIT:  # noqa: ASYNC110
                    await asyncio.sleep(0.002)
                bus = self._bus
                if bus is None or not bus.connected:
                    return
                future = bus.send(self._outbox.popleft())
                future.add_done_callback(_ignore_result)
                # Let the writer drain between bursts instead of queueing thousands.
                if len(self._outbox) % 64 == 63:
                    await asyncio.sleep(0)

    def _signal(
        self, path: str, interface: str, member: str, signature: str, body: list[Any]
    ) -> None:
        self._send(Message.new_signal(path, interface, member, signature, body))

    def _changed(self, path: str, interface: str, props: dict[str, Variant]) -> None:
        self._signal(path, PROPS, "PropertiesChanged", "sa{sv}as", [interface, props, []])

    def _added(self, path: str, interfaces: dict[str, dict[str, Variant]]) -> None:
        self._signal("/", OM, "InterfacesAdded", "oa{sa{sv}}", [path, interfaces])

    def _removed(self, path: str, interfaces: list[str]) -> None:
        self._signal("/", OM, "InterfacesRemoved", "oas", [path, interfaces])

    # -- dispatch --

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        handler = _HANDLERS.get((msg.interface or "", msg.member or ""))
        if handler is None:
            if msg.interface in (
                "org.freedesktop.DBus.Introspectable",
                "org.freedesktop.DBus.Peer",
            ):
                return False
            self._send(
                Message.new_error(
                    msg, "org.freedesktop.DBus.Error.UnknownMethod", f"{msg.member} unknown"
                )
            )
            return True
        try:
            result = handler(self, msg)
        except SimError as err:
            self._send(Message.new_error(msg, err.name, err.text))
            return True
        if asyncio.iscoroutine(result):
            self._spawn(self._finish(msg, result), f"{msg.member}:{msg.path}")
        elif result is not None:
            self._send(result)
        return True

    async def _finish(self, msg: Message, coro: Any) -> None:
        try:
            reply = await coro
        except SimError as err:
            reply = Message.new_error(msg, err.name, err.text)
        except Exception as err:  # a simulator bug: answer, log, keep serving
            log.exception("%s %s failed", msg.member, msg.path)
            reply = Message.new_error(msg, "org.bluez.Error.Failed", repr(err))
        self._send(reply)

    def _peripheral(self, path: str | None) -> Peripheral:
        device_path = (path or "").split("/service")[0]
        p = self.peripherals.get(device_path)
        if p is None or not p.exported:
            raise SimError("org.freedesktop.DBus.Error.UnknownObject", f"no object {path}")
        return p

    # -- ObjectManager and Properties --

    def _managed_objects(self) -> dict[str, dict[str, dict[str, Variant]]]:
        objects: dict[str, dict[str, dict[str, Variant]]] = {
            "/org/bluez": {AGENT_MANAGER: {}},
            self.adapter_path: {ADAPTER: self._adapter_props()},
        }
        for p in self.peripherals.values():
            if p.exported:
                objects[p.path] = {DEVICE: p.device_props()}
                if p.gatt_exported:
                    objects.update(p.gatt_objects())
        return objects

    def get_managed_objects(self, msg: Message) -> Message:
        if msg.path != "/":
            raise SimError("org.freedesktop.DBus.Error.UnknownObject", f"no object {msg.path}")
        return Message.new_method_return(msg, "a{oa{sa{sv}}}", [self._managed_objects()])

    def _adapter_props(self) -> dict[str, Variant]:
        return {
            "Address": Variant("s", "00:00:5E:00:53:00"),
            "AddressType": Variant("s", "public"),
            "Name": Variant("s", "fieldgate-sim"),
            "Alias": Variant("s", "fieldgate-sim"),
            "Powered": Variant("b", True),
            "Discoverable": Variant("b", False),
            "Pairable": Variant("b", True),
            "Discovering": Variant("b", self.discovering > 0),
            "UUIDs": Variant("as", []),
            "Roles": Variant("as", ["central", "peripheral"]),
        }

    def _props_of(self, path: str, interface: str) -> dict[str, Variant]:
        if path == self.adapter_path and interface == ADAPTER:
            return self._adapter_props()
        objects = self._managed_objects()
        try:
            return objects[path][interface]
        except KeyError:
            raise SimError(
                "org.freedesktop.DBus.Error.UnknownObject", f"no {interface} at {path}"
            ) from None

    def props_get(self, msg: Message) -> Message:
        interface, name = msg.body
        props = self._props_of(msg.path or "", interface)
        if name not in props:
            raise SimError("org.freedesktop.DBus.Error.InvalidArgs", f"no property {name}")
        return Message.new_method_return(msg, "v", [props[name]])

    def props_get_all(self, msg: Message) -> Message:
        (interface,) = msg.body
        return Message.new_method_return(msg, "a{sv}", [self._props_of(msg.path or "", interface)])

    def props_set(self, msg: Message) -> Message:
        interface, name, value = msg.body
        if interface == DEVICE and name == "Trusted":
            p = self._peripheral(msg.path)
            p.trusted = bool(value.value)
            self._changed(p.path, DEVICE, {"Trusted": Variant("b", p.trusted)})
            return Message.new_method_return(msg)
        raise SimError("org.bluez.Error.NotSupported", f"{interface}.{name} cannot be set here")

    # -- Adapter1 and AgentManager1 --

    def set_discovery_filter(self, msg: Message) -> Message:
        return Message.new_method_return(msg)

    def start_discovery(self, msg: Message) -> Message:
        self.discovering += 1
        if self.discovering == 1:
            self._changed(self.adapter_path, ADAPTER, {"Discovering": Variant("b", True)})
            self._advertiser = asyncio.get_running_loop().create_task(self._advertise())
        return Message.new_method_return(msg)

    def stop_discovery(self, msg: Message) -> Message:
        if self.discovering == 0:
            raise SimError("org.bluez.Error.Failed", "No discovery started")
        self.discovering -= 1
        if self.discovering == 0:
            if self._advertiser is not None:
                self._advertiser.cancel()
            self._changed(self.adapter_path, ADAPTER, {"Discovering": Variant("b", False)})
            loop = asyncio.get_running_loop()
            for p in self.peripherals.values():
                if p.exported and not (p.paired or p.trusted or p.ever_connected):
                    p.removal = loop.call_later(self.temporary_timeout, self._remove_device, p)
        return Message.new_method_return(msg)

    def remove_device(self, msg: Message) -> Message:
        (path,) = msg.body
        p = self._peripheral(path)
        self._drop_link(p)
        p.paired = p.trusted = p.ever_connected = False
        self._remove_device(p)
        return Message.new_method_return(msg)

    def _remove_device(self, p: Peripheral) -> None:
        if not p.exported or p.connected:
            return
        if p.gatt_exported:
            for path in sorted(p.gatt_objects(), reverse=True):
                self._removed(path, [SERVICE if path.endswith(SERVICE_NODE) else CHAR])
            p.gatt_exported = False
        p.exported = False
        self._removed(p.path, [DEVICE])

    async def _advertise(self) -> None:
        """While discovering: each peripheral appears (InterfacesAdded), then advertises as
        RSSI updates, spread over the interval so that the bus sees no bursts."""
        while True:
            waiting = [p for p in self.peripherals.values() if not p.connected]
            pause = ADVERTISE_EVERY / max(1, len(waiting))
            for p in waiting:
                if p.removal is not None:
                    p.removal.cancel()
                    p.removal = None
                if not p.exported:
                    p.exported = True
                    self._added(p.path, {DEVICE: p.device_props()})
                elif not p.connected:
                    rssi = -40 - p.spec.seed % 50 - random.randrange(3)
                    self._changed(p.path, DEVICE, {"RSSI": Variant("n", rssi)})
                await asyncio.sleep(pause)
            if not waiting:
                await asyncio.sleep(ADVERTISE_EVERY)

    def register_agent(self, msg: Message) -> Message:
        path, capability = msg.body
        self.agent = (msg.sender or "", path)
        log.debug("agent %s at %s (%s)", msg.sender, path, capability)
        return Message.new_method_return(msg)

    def request_default_agent(self, msg: Message) -> Message:
        return Message.new_method_return(msg)

    def unregister_agent(self, msg: Message) -> Message:
        self.agent = None
        return Message.new_method_return(msg)

    # -- Device1 --

    async def connect(self, msg: Message) -> Message:
        p = self._peripheral(msg.path)
        await self._connect(p)
        return Message.new_method_return(msg)

    async def _connect(self, p: Peripheral) -> None:
        if p.connected:
            return
        if self.connecting:
            self.stats["connect_in_progress"] += 1
            raise SimError("org.bluez.Error.InProgress", "In Progress")
        in_use = sum(1 for q in self.peripherals.values() if q.connected)
        if in_use >= self.slots:
            self.stats["slot_refusals"] += 1
            raise SimError(
                "org.bluez.Error.Failed", f"Connection Limit Exceeded ({in_use} of {self.slots})"
            )
        self.connecting = True
        try:
            if p.spec.connect_delay:
                await asyncio.sleep(p.spec.connect_delay)
            if p.spec.connect_aborts > 0:
                # BlueZ reports the link as up, then down, then fails the call.
                p.spec.connect_aborts -= 1
                self.stats["aborts"] += 1
                self._changed(p.path, DEVICE, {"Connected": Variant("b", True)})
                self._changed(p.path, DEVICE, {"Connected": Variant("b", False)})
                raise SimError("org.bluez.Error.Failed", ABORT)
            if p.removal is not None:
                p.removal.cancel()
                p.removal = None
            p.connected = p.ever_connected = True
            p.stats["connects"] += 1
            self.stats["max_connected"] = max(self.stats["max_connected"], in_use + 1)
            self._changed(p.path, DEVICE, {"Connected": Variant("b", True)})
            if not p.gatt_exported:
                p.gatt_exported = True
                for path, interfaces in p.gatt_objects().items():
                    self._added(path, interfaces)
            p.services_resolved = True
            self._changed(p.path, DEVICE, {"ServicesResolved": Variant("b", True)})
        finally:
            self.connecting = False

    def disconnect(self, msg: Message) -> Message:
        p = self._peripheral(msg.path)
        self._drop_link(p)
        return Message.new_method_return(msg)

    def _drop_link(self, p: Peripheral) -> None:
        if not p.connected:
            return
        self._stop_notify(p)
        p.connected = p.services_resolved = False
        p.stats["disconnects"] += 1
        self._changed(
            p.path,
            DEVICE,
            {"ServicesResolved": Variant("b", False), "Connected": Variant("b", False)},
        )

    async def pair(self, msg: Message) -> Message:
        p = self._peripheral(msg.path)
        if p.paired:
            raise SimError("org.bluez.Error.AlreadyExists", "Already Exists")
        await self._connect(p)
        if p.spec.bond == "none":
            raise SimError("org.bluez.Error.AuthenticationFailed", "Pairing Not Supported")
        if p.spec.bond == "passkey":
            if self.agent is None:
                raise SimError("org.bluez.Error.AuthenticationFailed", "No agent registered")
            name, agent_path = self.agent
            assert self._bus is not None
            reply = await self._bus.call(
                Message(
                    destination=name,
                    path=agent_path,
                    interface=AGENT,
                    member="RequestPasskey",
                    signature="o",
                    body=[p.path],
                )
            )
            if reply is None or reply.message_type == MessageType.ERROR:
                raise SimError("org.bluez.Error.AuthenticationRejected", "Authentication Rejected")
            if int(reply.body[0]) != p.spec.passkey:
                raise SimError("org.bluez.Error.AuthenticationFailed", "Authentication Failed")
        p.paired = p.trusted = True
        p.stats["pairings"] += 1
        changed = {
            "Paired": Variant("b", True),
            "Bonded": Variant("b", True),
            "Trusted": Variant("b", True),
        }
        if p.spec.rpa:
            # Bonded: the IRK resolves the private address, BlueZ shows the identity address.
            p.address = p.spec.identity
            changed["Address"] = Variant("s", p.address)
        self._changed(p.path, DEVICE, changed)
        return Message.new_method_return(msg)

    # -- GattCharacteristic1 --

    def _char(self, msg: Message) -> tuple[Peripheral, str]:
        p = self._peripheral(msg.path)
        node = (msg.path or "")[len(p.path) + 1 :]
        for uuid, known in NODES.items():
            if known == node and (uuid != gatt.CHALLENGE or p.spec.key is not None):
                if not p.connected:
                    raise SimError("org.bluez.Error.Failed", "Not connected")
                return p, uuid
        raise SimError("org.freedesktop.DBus.Error.UnknownObject", f"no object {msg.path}")

    def _check_encrypted(self, p: Peripheral, uuid: str, op: str = "Read") -> None:
        if uuid != gatt.CHALLENGE and p.spec.bond != "none" and not p.paired:
            raise SimError("org.bluez.Error.NotPermitted", f"{op} not permitted: encryption needed")

    def read_value(self, msg: Message) -> Message:
        p, uuid = self._char(msg)
        self._check_encrypted(p, uuid)
        if uuid == gatt.MEASUREMENT:
            value = p.measurement()
        elif uuid == gatt.STATUS:
            value = p.status_value()
        elif uuid == gatt.SETPOINT:
            value = p.setpoint
        else:
            value = self._challenge_answer(p)
        return Message.new_method_return(msg, "ay", [value])

    def _challenge_answer(self, p: Peripheral) -> bytes:
        key = p.spec.key
        assert key is not None
        if not p.nonce:
            return b""
        p.stats["challenges"] += 1
        if p.spec.hmac == "wrong":
            return gatt.challenge_response(b"w" * 32, p.nonce, p.spec.identity)
        answer = gatt.challenge_response(key, p.nonce, p.spec.identity)
        if p.first_response is None:
            p.first_response = answer
        if p.spec.hmac == "replay":
            return p.first_response
        return answer

    def write_value(self, msg: Message) -> Message | Any:
        p, uuid = self._char(msg)
        value = bytes(msg.body[0])
        if uuid == gatt.CHALLENGE:
            if len(value) != gatt.NONCE_SIZE:
                raise att_error(0x0D)
            p.nonce = value
            return Message.new_method_return(msg)
        options = msg.body[1] if len(msg.body) > 1 else {}
        kind = options.get("type")
        # BlueZ's default is a request (with response), unless the flags allow only commands.
        request = kind is None or kind.value == "request"
        p.stats["writes"] += 1
        p.stats["write_requests"] += int(request)
        if uuid == gatt.SETPOINT and p.spec.write_delay > 0:
            return self._write_later(msg, p, value, request)
        return self._write(msg, p, uuid, value, request)

    async def _write_later(
        self, msg: Message, p: Peripheral, value: bytes, request: bool
    ) -> Message:
        await asyncio.sleep(p.spec.write_delay)
        return self._write(msg, p, gatt.SETPOINT, value, request)

    def _write(
        self, msg: Message, p: Peripheral, uuid: str, value: bytes, request: bool
    ) -> Message:
        """A write to a data characteristic; a write command (no response) is never answered
        with an error, like the radio: the peripheral drops what it refuses."""
        try:
            if uuid != gatt.SETPOINT:
                raise att_error(0x03)
            self._check_encrypted(p, uuid, "Write")
            if p.spec.write_error:
                raise att_error(p.spec.write_error)
            if len(value) != len(p.setpoint):
                raise att_error(0x0D)
        except SimError:
            p.stats["writes_refused"] += 1
            if request:
                raise
            return Message.new_method_return(msg)
        p.setpoint = value
        return Message.new_method_return(msg)

    def start_notify(self, msg: Message) -> Message:
        p, uuid = self._char(msg)
        self._check_encrypted(p, uuid)
        if uuid != gatt.MEASUREMENT:
            raise SimError("org.bluez.Error.NotSupported", "Notify not supported")
        if p.notifying is None:
            p.notifying = "start"
            self._changed(msg.path or "", CHAR, {"Notifying": Variant("b", True)})
            self._schedule(p)
        return Message.new_method_return(msg)

    def acquire_notify(self, msg: Message) -> Message:
        p, uuid = self._char(msg)
        self._check_encrypted(p, uuid)
        if uuid != gatt.MEASUREMENT or not p.acquire:
            raise SimError("org.bluez.Error.NotSupported", "Notify not supported")
        if p.notifying is not None:
            raise SimError("org.bluez.Error.NotPermitted", "Notify already acquired")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        p.sock, p.notifying = ours, "acquire"
        self._changed(msg.path or "", CHAR, {"NotifyAcquired": Variant("b", True)})
        self._schedule(p)
        reply = Message.new_method_return(msg, "hq", [0, MTU])
        reply.unix_fds = [theirs.detach()]
        return reply

    def stop_notify(self, msg: Message) -> Message:
        p, _ = self._char(msg)
        self._stop_notify(p)
        return Message.new_method_return(msg)

    def _stop_notify(self, p: Peripheral) -> None:
        if p.timer is not None:
            p.timer.cancel()
            p.timer = None
        if p.sock is not None:
            p.sock.close()
            p.sock = None
        was, p.notifying = p.notifying, None
        if was is not None and self._bus is not None and p.gatt_exported:
            name = "Notifying" if was == "start" else "NotifyAcquired"
            path = f"{p.path}/{NODES[gatt.MEASUREMENT]}"
            self._changed(path, CHAR, {name: Variant("b", False)})

    # -- notifications --

    def _schedule(self, p: Peripheral) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / p.spec.rate
        # Spread the fleet's first notifications over one period.
        start = loop.time() + period * ((p.spec.seed * 0.618) % 1.0)
        p.timer = loop.call_at(start, self._notify, p, start, period)

    def _notify(self, p: Peripheral, due: float, period: float) -> None:
        if p.notifying is None:
            return
        p.counter += 1
        mode = p.spec.notify
        if mode == "good":
            value = p.measurement()
        elif mode == "short":
            value = p.measurement()[:5]
        else:
            value = os.urandom(random.choice((1, 3, 8, 10, 17)))
        if p.notifying == "acquire" and p.sock is not None:
            try:
                p.sock.send(value)
                p.stats["notifications"] += 1
            except BlockingIOError:
                p.stats["dropped"] += 1  # the central does not read: like a radio, drop
            except OSError:
                self._stop_notify(p)
                return
        else:
            path = f"{p.path}/{NODES[gatt.MEASUREMENT]}"
            self._changed(path, CHAR, {"Value": Variant("ay", value)})
            p.stats["notifications"] += 1
        loop = asyncio.get_running_loop()
        due += period
        now = loop.time()
        if due < now:
            due = now + period - (now - due) % period
        p.timer = loop.call_at(due, self._notify, p, due, period)

    # -- control --

    def control_set(self, msg: Message) -> Message:
        device_id, key, value = msg.body
        p = self.by_id.get(device_id)
        if p is None:
            raise SimError("org.fieldgate.Error.NoSuchDevice", f"no peripheral {device_id!r}")
        if key == "drop-link":
            self._drop_link(p)
        else:
            try:
                apply_setting(p.spec, key, value)
            except ValueError as err:
                raise SimError("org.fieldgate.Error.InvalidArgs", str(err)) from err
        return Message.new_method_return(msg)

    def control_slots(self, msg: Message) -> Message:
        (self.slots,) = msg.body
        return Message.new_method_return(msg)

    def control_stats(self, msg: Message) -> Message:
        report = {
            "adapter": dict(self.stats),
            "connected": sum(1 for p in self.peripherals.values() if p.connected),
            "devices": {
                p.spec.device_id: {
                    **p.stats,
                    "address": p.address,
                    "connected": p.connected,
                    "paired": p.paired,
                    "counter": p.counter,
                    "setpoint": p.setpoint.hex(),
                }
                for p in self.peripherals.values()
            },
        }
        return Message.new_method_return(msg, "s", [orjson.dumps(report).decode()])


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


_HANDLERS: dict[tuple[str, str], Callable[[BlueZSimulator, Message], Any]] = {
    (OM, "GetManagedObjects"): BlueZSimulator.get_managed_objects,
    (PROPS, "Get"): BlueZSimulator.props_get,
    (PROPS, "GetAll"): BlueZSimulator.props_get_all,
    (PROPS, "Set"): BlueZSimulator.props_set,
    (ADAPTER, "SetDiscoveryFilter"): BlueZSimulator.set_discovery_filter,
    (ADAPTER, "StartDiscovery"): BlueZSimulator.start_discovery,
    (ADAPTER, "StopDiscovery"): BlueZSimulator.stop_discovery,
    (ADAPTER, "RemoveDevice"): BlueZSimulator.remove_device,
    (AGENT_MANAGER, "RegisterAgent"): BlueZSimulator.register_agent,
    (AGENT_MANAGER, "RequestDefaultAgent"): BlueZSimulator.request_default_agent,
    (AGENT_MANAGER, "UnregisterAgent"): BlueZSimulator.unregister_agent,
    (DEVICE, "Connect"): BlueZSimulator.connect,
    (DEVICE, "Disconnect"): BlueZSimulator.disconnect,
    (DEVICE, "Pair"): BlueZSimulator.pair,
    (CHAR, "ReadValue"): BlueZSimulator.read_value,
    (CHAR, "WriteValue"): BlueZSimulator.write_value,
    (CHAR, "StartNotify"): BlueZSimulator.start_notify,
    (CHAR, "StopNotify"): BlueZSimulator.stop_notify,
    (CHAR, "AcquireNotify"): BlueZSimulator.acquire_notify,
    (CONTROL, "Set"): BlueZSimulator.control_set,
    (CONTROL, "SetSlots"): BlueZSimulator.control_slots,
    (CONTROL, "Stats"): BlueZSimulator.control_stats,
}
