"""BLE through bleak's BlueZ backend: the only module that imports bleak.

One :class:`BleAdapter` per radio (``hci0``, ...) owns what the radio shares: discovery, the
connection slots, one connect at a time, and fieldgate's own pairing agent (``Agent1``). Each
allow-listed device has its own task (:class:`BleLink`), so a dead or slow device only ever
delays itself.

A connection is admitted before any of its data flows:

1. **identity**: the device is matched by its identity address, or (for devices with
   resolvable private addresses) by the app id it advertises; once bonded, BlueZ shows the
   identity address, and an app id stays bound to the first identity address it was admitted
   with (``ble-bonds.json`` in the state folder);
2. **bond**: ``none``, ``just-works`` or ``authenticated``. fieldgate pairs through its own
   agent, so it knows how each bond was made: authenticated means the passkey was entered
   (LE Secure Connections with MITM protection); a bond made elsewhere counts as Just Works;
3. **challenge** (optional): a fresh random nonce is written to the challenge characteristic
   and HMAC-SHA256(key, nonce || identity address) must come back, compared in constant time;
   an answer seen before is reported as a replay.

A refusal is a security event (through the auth gate), and the device is held off for
``ble.hold_off`` seconds, doubling with each further refusal: failures are rate-limited.

Devices whose decode table only polls give their connection slot back between polls when the
adapter has more devices than slots; devices that notify keep theirs. Notifications use
AcquireNotify (a socket per characteristic) where the device offers it, which carries four times
what D-Bus signals do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from bleak import BleakClient, BleakScanner
from bleak.backends.bluezdbus.manager import get_global_bluez_manager
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakDBusError, BleakDeviceNotFoundError, BleakError
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from adapters.base import Admit, DeviceHealth, Evidence, ScanSink, Unknown
from adapters.ble import gatt
from gateway.backoff import backoff_delay
from gateway.config import BleCharacteristic, BleSection, DeviceConfig
from gateway.errors import DeviceUnavailable
from gateway.readings import Scan

log = logging.getLogger(__name__)
# bleak asks the bluetoothctl tool for BlueZ's version and warns when it is missing (as in most
# containers); fieldgate only needs the D-Bus API.
logging.getLogger("bleak.backends.bluezdbus.version").setLevel(logging.ERROR)

AGENT_PATH = "/org/fieldgate/agent"
AGENT = "org.bluez.Agent1"
BOND_LEVELS = {"none": 0, "just-works": 1, "authenticated": 2}
BONDS_FILE = "ble-bonds.json"
HOLD_OFF_MAX = 24 * 3600.0
RECENT_ANSWERS = 32  # challenge answers remembered per device, to name a replay


def decoder_for(row: BleCharacteristic) -> gatt.Decoder:
    return gatt.Decoder(
        row.format, tuple(gatt.Field(v.name, v.scale, v.offset) for v in row.values)
    )


# -- bonds this gateway made -----------------------------------------------------------------------


class BondBook:
    """How each bond was made, by identity address, and which identity each app id is bound to.

    Kept in ``ble-bonds.json`` (written atomically) because BlueZ does not say whether a bond
    is authenticated: only the agent that made it knows.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / BONDS_FILE
        self._data: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                self._data = orjson.loads(self.path.read_bytes())
            except orjson.JSONDecodeError:
                broken = self.path.with_suffix(f".broken-{int(time.time())}")
                self.path.rename(broken)
                log.error("%s was not JSON; kept as %s, bonds start anew", self.path, broken)

    def level(self, identity: str) -> str | None:
        entry = self._data.get(identity)
        return None if entry is None else str(entry["level"])

    def identity_of(self, app_id: str) -> str | None:
        for identity, entry in self._data.items():
            if entry.get("app_id") == app_id:
                return identity
        return None

    def record(self, identity: str, level: str) -> None:
        """A bond this gateway's agent just made."""
        self._data[identity] = {"level": level, "app_id": None, "at": time.time()}
        self._save()

    def bind(self, identity: str, app_id: str) -> None:
        """An app id was admitted with this identity: from now on it is bound to it."""
        entry = self._data.setdefault(identity, {"level": "just-works", "at": time.time()})
        if entry.get("app_id") != app_id:
            entry["app_id"] = app_id
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # created anew below, 0600 (it names paired devices)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(orjson.dumps(self._data, option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)


# -- the pairing agent -----------------------------------------------------------------------------


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
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
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


# -- one radio -------------------------------------------------------------------------------------


class BleAdapter:
    """What the devices on one radio share. Run :meth:`run` until cancelled."""

    def __init__(
        self,
        name: str,
        section: BleSection,
        devices: list[DeviceConfig],
        *,
        sink: ScanSink,
        admit: Admit,
        unknown: Unknown,
        health: dict[str, DeviceHealth],
        state_dir: Path,
    ) -> None:
        self.name = name
        self.section = section
        self.sink = sink
        self.admit = admit
        self.unknown = unknown
        self.bonds = BondBook(state_dir)
        self.agent = Agent()
        self.connect_lock = asyncio.Lock()
        slots = section.max_connections
        rotate = len(devices) > slots
        self.slots = asyncio.Semaphore(slots)
        # When polled devices rotate through the slots, notifying devices leave one free.
        held = slots - 1 if rotate and slots > 1 else slots
        self.held_slots = asyncio.Semaphore(held)
        self.links = [
            BleLink(self, d, health[d.id], rotate=rotate and d.ble is not None and d.ble.polls)
            for d in devices
        ]
        holders = sum(1 for link in self.links if not link.rotate)
        if holders > held:
            log.warning(
                "%s: %d devices keep a connection but the adapter has %d slots for them; "
                "the rest wait for a slot",
                name,
                holders,
                held,
            )
        self._by_address = {
            d.ble.address: link
            for d, link in zip(devices, self.links, strict=True)
            if d.ble is not None and d.ble.address
        }
        self._by_app_id = {
            d.ble.app_id: link
            for d, link in zip(devices, self.links, strict=True)
            if d.ble is not None and d.ble.app_id
        }
        self._wanted = asyncio.Event()
        self._complete = asyncio.Event()

    async def run(self) -> None:
        if self.section.dbus_address:
            # bleak and dbus-fast take the system bus from the environment.
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.section.dbus_address
        attempt = 0
        while True:
            try:
                await get_global_bluez_manager()
                break
            except (BleakError, OSError, EOFError) as err:
                # No bluetoothd (yet): the BLE devices wait, the rest of the gateway runs on.
                for link in self.links:
                    link.health.down(f"BlueZ not reachable: {_why(err)}")
                attempt += 1
                section = self.section
                await asyncio.sleep(
                    backoff_delay(attempt, section.backoff_min, section.backoff_max)
                )
        async with self.agent, asyncio.TaskGroup() as group:
            group.create_task(self._discover(), name=f"ble-scan[{self.name}]")
            for link in self.links:
                group.create_task(link.run(), name=f"ble[{link.device.id}]")

    def want(self) -> None:
        """A link needs its device found (again): discovery runs until every link has it."""
        self._complete.clear()
        self._wanted.set()

    def check_complete(self) -> None:
        if not any(link.needs_device for link in self.links):
            self._complete.set()

    async def _discover(self) -> None:
        """Discover while a link waits for its device, and for ``scan_window`` seconds every
        ``scan_every`` seconds, so that devices outside the allow-list get reported."""
        section = self.section
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(section.scan_every):
                    await self._wanted.wait()
            scanner = BleakScanner(detection_callback=self._seen, bluez={"adapter": self.name})
            try:
                await scanner.start()
            except (BleakError, OSError) as err:
                log.warning("%s: discovery failed: %r", self.name, err)
                await asyncio.sleep(backoff_delay(3, section.backoff_min, section.backoff_max))
                continue
            log.debug("%s: discovering", self.name)
            try:
                self._wanted.clear()
                await asyncio.sleep(section.scan_window)
                self.check_complete()
                await self._complete.wait()
            finally:
                with contextlib.suppress(BleakError, OSError):
                    await scanner.stop()
            log.debug("%s: discovery stopped", self.name)
            self._wanted.clear()

    def _seen(self, device: BLEDevice, adv: AdvertisementData) -> None:
        link = self._by_address.get(device.address.upper())
        if link is not None:
            link.found(device)
            return
        data = adv.manufacturer_data.get(self.section.company_id)
        if data is None:
            return  # not one of the fleet's kind: somebody else's device
        app_id = data.decode("utf-8", "replace")
        link = self._by_app_id.get(app_id) if app_id else None
        if link is not None:
            link.found(device)
            return
        seen = (
            f"{device.address} advertises app id {app_id!r}"
            if app_id
            else f"address {device.address}"
        )
        self.unknown("ble", f"{self.name}/{device.address}", seen)


# -- one device ------------------------------------------------------------------------------------


class Refused(Exception):
    """The auth gate refused this connection (and recorded why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BleLink:
    def __init__(
        self, adapter: BleAdapter, device: DeviceConfig, health: DeviceHealth, *, rotate: bool
    ) -> None:
        assert device.ble is not None
        self.adapter = adapter
        self.device = device
        self.ble = device.ble
        self.health = health
        self.rotate = rotate
        self.endpoint = self.ble.label
        self.ble_device: BLEDevice | None = None
        self._found = asyncio.Event()
        self.notify_rows = [
            (r, decoder_for(r)) for r in self.ble.characteristics if r.mode == "notify"
        ]
        self.poll_rows = [(r, decoder_for(r)) for r in self.ble.characteristics if r.mode == "poll"]
        self.gatt_ops = asyncio.Semaphore(adapter.section.max_gatt_ops)
        self.refusals = 0
        self.answers: deque[bytes] = deque(maxlen=RECENT_ANSWERS)
        self._key: bytes | None = None
        if self.ble.challenge is not None:
            self._key = gatt.read_key(self.ble.challenge.key_file.read_bytes())

    @property
    def needs_device(self) -> bool:
        return self.ble_device is None

    def found(self, device: BLEDevice) -> None:
        if self.ble_device is None:
            self.ble_device = device
            self._found.set()
            self.adapter.check_complete()

    def _lost(self) -> None:
        """BlueZ no longer knows the device (removed after discovery): find it again."""
        self.ble_device = None
        self._found.clear()
        self.adapter.want()

    async def run(self) -> None:
        attempt = 0
        next_poll = 0.0
        self.adapter.want()
        while True:
            if self.ble_device is None:
                await self._found.wait()
            if self.rotate:
                await asyncio.sleep(max(0.0, next_poll - time.monotonic()))
                next_poll = time.monotonic() + min(r.period for r, _ in self.poll_rows)
            try:
                async with self._slot():
                    await self._session()
                attempt = 0
                if self.rotate:
                    continue
                raise DeviceUnavailable(self.device.id, self.endpoint, "link lost")
            except Refused as refused:
                self.refusals += 1
                hold = min(HOLD_OFF_MAX, self.adapter.section.hold_off * 2 ** (self.refusals - 1))
                self.health.quarantine(f"{refused.reason}; next attempt in {hold:.0f} s")
                await asyncio.sleep(hold)
                continue
            except DeviceUnavailable as err:
                self.health.down(err.reason)
            except BleakDeviceNotFoundError:
                self.health.down("BlueZ no longer knows the device; discovering it again")
                self._lost()
            except Exception as err:
                # A bug must cost this device a reconnect, never the other devices their data.
                log.exception("%s: BLE link failed", self.device.id)
                self.health.down(f"internal error: {err!r}")
            attempt += 1
            section = self.adapter.section
            await asyncio.sleep(backoff_delay(attempt, section.backoff_min, section.backoff_max))

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        adapter = self.adapter
        if self.rotate:
            async with adapter.slots:
                yield
        else:
            async with adapter.held_slots, adapter.slots:
                yield

    async def _session(self) -> None:
        """Connect, admit, serve; returns after one poll round (rotating), else on link loss."""
        assert self.ble_device is not None
        lost = asyncio.Event()
        timeout = self.adapter.section.connect_timeout
        client = BleakClient(
            self.ble_device,
            disconnected_callback=lambda _client: lost.set(),
            timeout=timeout,
            bluez={"adapter": self.adapter.name},
        )
        try:
            async with self.adapter.connect_lock:
                try:
                    await client.connect()
                except BleakDeviceNotFoundError:
                    raise
                except (BleakError, TimeoutError, OSError, EOFError) as err:
                    raise DeviceUnavailable(
                        self.device.id, self.endpoint, f"connect: {_why(err)}"
                    ) from err
                # bleak also reports the drops of connects it retried itself
                # (le-connection-abort-by-local): only a drop from now on is a lost link.
                lost.clear()
                if not client.is_connected:
                    lost.set()
                identity, level, failed = await self._bond(client)
            await self._admit(client, identity, level, failed)
            self.refusals = 0
            if self.rotate:
                await self._poll_once(client)
                return
            await self._serve(client, lost)
        finally:
            with contextlib.suppress(BleakError, TimeoutError, OSError, EOFError):
                await client.disconnect()

    # -- admission --

    async def _bond(self, client: BleakClient) -> tuple[str, str, str | None]:
        """Pair if the config asks for a bond and there is none.

        Returns the identity address, the bond's level, and why pairing failed (or None).
        """
        required = self.ble.bond
        bonds = self.adapter.bonds
        assert self.ble_device is not None
        path = self.ble_device.details["path"]
        manager = await get_global_bluez_manager()
        if required == "none":
            paired = manager.is_paired(path)
            identity = client.address.upper()
            level = (bonds.level(identity) or "just-works") if paired else "none"
            return identity, level, None
        if manager.is_paired(path):
            identity = manager.get_device_address(path).upper()
            return identity, bonds.level(identity) or "just-works", None
        pairing = Pairing(self.ble.passkey if required == "authenticated" else None)
        agent = self.adapter.agent
        agent.pairing[path] = pairing
        try:
            await client.pair()
        except BleakDBusError as err:
            return client.address.upper(), "none", f"pairing failed: {_why(err)}"
        finally:
            agent.pairing.pop(path, None)
        identity = client.address.upper()
        level = "authenticated" if pairing.passkey_given else "just-works"
        bonds.record(identity, level)
        log.info("%s: bonded with %s (%s)", self.device.id, identity, level)
        return identity, level, None

    async def _admit(
        self, client: BleakClient, identity: str, level: str, failed: str | None
    ) -> None:
        fingerprint = {"identity": identity, "bond": level}
        reason = failed or self._identity_problem(identity)
        if reason is None and BOND_LEVELS[level] < BOND_LEVELS[self.ble.bond]:
            reason = f"bond is {level}, the config requires {self.ble.bond}"
        if reason is None and self.ble.challenge is not None:
            reason = await self._challenge(client, identity)
            fingerprint["challenge"] = "failed" if reason else "passed"
        refusal = self.adapter.admit(
            Evidence(self.device.id, "ble", self.endpoint, fingerprint, refusal=reason)
        )
        if refusal is not None:
            raise Refused(refusal)
        if self.ble.app_id is not None:
            self.adapter.bonds.bind(identity, self.ble.app_id)

    def _identity_problem(self, identity: str) -> str | None:
        if self.ble.address is not None:
            if identity != self.ble.address:
                return f"identity address is {identity}, the config names {self.ble.address}"
            return None
        bound = self.adapter.bonds.identity_of(self.ble.app_id or "")
        if bound is not None and bound != identity:
            return f"app id {self.ble.app_id} is bound to {bound}, this device is {identity}"
        return None

    async def _challenge(self, client: BleakClient, identity: str) -> str | None:
        assert self.ble.challenge is not None and self._key is not None
        uuid = self.ble.challenge.characteristic
        nonce = secrets.token_bytes(gatt.NONCE_SIZE)
        try:
            async with self.gatt_ops:
                await client.write_gatt_char(uuid, nonce, response=True)
                answer = bytes(await client.read_gatt_char(uuid))
        except (BleakError, TimeoutError, OSError, EOFError) as err:
            return f"challenge not answered: {_why(err)}"
        if gatt.check_response(self._key, nonce, identity, answer):
            self.answers.append(answer)
            return None
        if answer in self.answers:
            return "challenge answer is a replay of an earlier one"
        return "challenge answer does not match the device key"

    # -- data --

    async def _serve(self, client: BleakClient, lost: asyncio.Event) -> None:
        for row, decoder in self.notify_rows:
            callback = self._on_notify(decoder)
            try:
                async with self.gatt_ops:
                    await client.start_notify(row.uuid, callback, bluez={"use_start_notify": False})
            except (BleakError, TimeoutError, OSError, EOFError) as err:
                raise DeviceUnavailable(
                    self.device.id, self.endpoint, f"subscribe {row.uuid}: {_why(err)}"
                ) from err
        self.health.up()
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(lost.wait())]
        if self.poll_rows:
            waits.append(asyncio.ensure_future(self._poll(client)))
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
        raise DeviceUnavailable(self.device.id, self.endpoint, "link lost")

    def _on_notify(self, decoder: gatt.Decoder) -> Callable[[Any, bytearray], None]:
        device_id = self.device.id
        names = decoder.names
        sink = self.adapter.sink
        health = self.health

        def on_notify(_char: Any, data: bytearray) -> None:
            ts_ms = int(time.time() * 1000)
            try:
                values = decoder.decode(data)
            except ValueError as err:
                self._malformed(err)
                return
            health.reads_ok += 1
            sink(Scan(device_id, ts_ms, names, values))

        return on_notify

    def _malformed(self, err: Exception) -> None:
        health = self.health
        health.malformed += 1
        if health.malformed == 1 or health.malformed % 1000 == 0:
            log.warning(
                "%s: malformed value (%d so far): %s", self.device.id, health.malformed, err
            )

    async def _read(
        self, client: BleakClient, row: BleCharacteristic, decoder: gatt.Decoder
    ) -> None:
        ts_ms = int(time.time() * 1000)
        try:
            async with self.gatt_ops:
                data = await client.read_gatt_char(row.uuid)
        except (BleakError, TimeoutError, OSError, EOFError) as err:
            self.health.reads_failed += 1
            raise DeviceUnavailable(
                self.device.id, self.endpoint, f"read {row.uuid}: {_why(err)}"
            ) from err
        try:
            values = decoder.decode(data)
        except ValueError as err:
            self._malformed(err)
            return
        self.health.reads_ok += 1
        self.health.up()
        self.adapter.sink(Scan(self.device.id, ts_ms, decoder.names, values))

    async def _poll_once(self, client: BleakClient) -> None:
        for row, decoder in self.poll_rows:
            await self._read(client, row, decoder)

    async def _poll(self, client: BleakClient) -> None:
        loop = asyncio.get_running_loop()
        due = [loop.time()] * len(self.poll_rows)
        while True:
            index = min(range(len(due)), key=due.__getitem__)
            await asyncio.sleep(max(0.0, due[index] - loop.time()))
            row, decoder = self.poll_rows[index]
            await self._read(client, row, decoder)
            due[index] = max(due[index] + row.period, loop.time())


def _why(err: BaseException) -> str:
    if isinstance(err, BleakDBusError):
        detail = err.dbus_error_details
        return f"{err.dbus_error}" + (f": {detail}" if detail else "")
    if isinstance(err, TimeoutError):
        return "timed out"
    return str(err) or type(err).__name__
