"""One BLE device's link: find, connect, collect evidence, serve notifications and polls.

Before any of its data flows, a connection's evidence goes to the auth gate, which decides
(with :mod:`adapters.ble.admission`): the identity address BlueZ shows, how the bond was made
(fieldgate pairs through its own agent, so it knows: authenticated means the passkey was
entered; a bond made elsewhere counts as Just Works), the identity the app id was bound to
before, and the answer to a fresh challenge nonce. A refused device is held off for
``ble.hold_off`` seconds, doubling with each further refusal: failures are rate-limited.

Requests (a fresh read, a write of a value the decode table marks writable) are served on the
link's connection beside its polls and notifications, within its GATT operation limit: a write
and its read back are one unit, one at a time per link, and a refused write fails the request,
never the connection.

Notifications use AcquireNotify (a socket per characteristic) where the device offers it,
which carries four times what D-Bus signals do. Malformed values are counted and logged (first,
then every 1,000th); the link stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from adapters.base import DeviceHealth, Evidence, NotWritable
from adapters.ble import admission, bluez, gatt
from adapters.ble.config import BleCharacteristic, BleEndpoint
from gateway.core.backoff import backoff_delay
from gateway.core.errors import DeviceCause, DeviceRefused, DeviceUnavailable
from gateway.core.readings import BAD, GOOD, Scan
from gateway.core.tasks import raise_if_cancelled

if TYPE_CHECKING:
    from adapters.ble.adapter import BleAdapter

log = logging.getLogger("adapters.ble")

HOLD_OFF_MAX = 24 * 3600.0


def decoder_for(row: BleCharacteristic) -> gatt.Decoder:
    return gatt.Decoder(
        row.format, tuple(gatt.Field(v.name, v.scale, v.offset) for v in row.values)
    )


class BleLink:
    def __init__(
        self,
        adapter: BleAdapter,
        device_id: str,
        ble: BleEndpoint,
        health: DeviceHealth,
        *,
        rotate: bool,
    ) -> None:
        self.adapter = adapter
        self.device_id = device_id
        self.ble = ble
        self.health = health
        self.rotate = rotate
        self.endpoint = self.ble.label
        self.found_device: bluez.Found | None = None
        self._found = asyncio.Event()
        self.notify_rows = [
            (r, decoder_for(r)) for r in self.ble.characteristics if r.mode == "notify"
        ]
        self.poll_rows = [(r, decoder_for(r)) for r in self.ble.characteristics if r.mode == "poll"]
        self.gatt_ops = asyncio.Semaphore(adapter.section.max_gatt_ops)
        # One write and its read back at a time: another write to the characteristic between
        # them would make the read back report a value this write did not set.
        self._writing = asyncio.Lock()
        self.refusals = 0
        # The connection, while it is up and admitted: requests (read, write) go through it.
        self.connection: bluez.Connection | None = None
        self._rows_of = {
            value.name: (row, decoder)
            for row, decoder in ((r, decoder_for(r)) for r in self.ble.characteristics)
            for value in row.values
        }

    @property
    def needs_device(self) -> bool:
        return self.found_device is None

    def found(self, device: bluez.Found) -> None:
        if self.found_device is None:
            self.found_device = device
            self._found.set()
            self.adapter.check_complete()

    def _lost(self) -> None:
        """BlueZ no longer knows the device (removed after discovery): find it again."""
        self.found_device = None
        self._found.clear()
        self.adapter.want()

    async def run(self) -> None:
        attempt = 0
        next_poll = 0.0
        self.adapter.want()
        while True:
            # bleak and dbus-fast await with wait_for in places: a stop must not be lost there.
            raise_if_cancelled("bleak")
            if self.found_device is None:
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
                raise DeviceUnavailable(self.device_id, self.endpoint, "link lost", cause="lost")
            except DeviceRefused as refused:
                self.refusals += 1
                hold = min(HOLD_OFF_MAX, self.adapter.section.hold_off * 2 ** (self.refusals - 1))
                self.health.quarantine(f"{refused.reason}; next attempt in {hold:.0f} s")
                await _pause(hold)
                continue
            except DeviceUnavailable as err:
                self.health.down(err.reason)
            except bluez.DeviceGone:
                self.health.down("BlueZ no longer knows the device; discovering it again")
                self._lost()
            except Exception as err:
                # A bug must cost this device a reconnect, never the other devices their data.
                log.exception("%s: BLE link failed", self.device_id)
                self.health.down(f"internal error: {err!r}")
            attempt += 1
            section = self.adapter.section
            await _pause(backoff_delay(attempt, section.backoff_min, section.backoff_max))

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        adapter = self.adapter
        if self.rotate:
            async with adapter.slots:
                yield
        else:
            async with adapter.held_slots, adapter.slots:
                yield

    @contextlib.contextmanager
    def _unavailable(self) -> Iterator[None]:
        """A radio failure of this device's link, as :class:`DeviceUnavailable` (the one
        translation of BlueZ's errors in the link's session; :mod:`.bluez` maps bleak's and
        D-Bus's). A request the peripheral refused with an ATT error has cause "exception"
        (the device answered, with a no), any other failure "radio"."""
        try:
            yield
        except bluez.DeviceGone:
            raise
        except bluez.BlueZError as err:
            cause: DeviceCause = "exception" if isinstance(err, bluez.AttError) else "radio"
            raise DeviceUnavailable(self.device_id, self.endpoint, err.reason, cause=cause) from err

    @contextlib.contextmanager
    def _request(self, what: str) -> Iterator[None]:
        """A request's failure (``what``: "write setpoint") as :class:`DeviceUnavailable` for
        its caller: "``what`` refused: ATT error ..." (cause "exception") or "``what``
        failed: ..." (cause "radio"; the device gone from BlueZ too: that is the session's to
        handle, the caller only learns that its request failed)."""
        try:
            yield
        except bluez.AttError as err:
            raise DeviceUnavailable(
                self.device_id, self.endpoint, f"{what} refused: {err.detail}", cause="exception"
            ) from err
        except bluez.BlueZError as err:
            raise DeviceUnavailable(
                self.device_id,
                self.endpoint,
                f"{what} failed: {err.detail or err.reason}",
                cause="radio",
            ) from err

    async def _session(self) -> None:
        """Connect, admit, serve; returns after one poll round (rotating), else on link loss."""
        assert self.found_device is not None
        lost = asyncio.Event()
        adapter = self.adapter
        link = bluez.Connection(
            self.found_device, adapter.name, adapter.section.connect_timeout, lost.set
        )
        try:
            async with adapter.connect_lock:
                with self._unavailable():
                    await link.connect()
                evidence = await self._bond(link)
            if evidence.refusal is None and self.ble.challenge is not None:
                evidence = await self._challenge(link, evidence)
            refusal = adapter.admit(evidence)
            if refusal is not None:
                raise DeviceRefused(self.device_id, refusal)
            if self.ble.app_id is not None:
                adapter.bonds.bind(evidence.fingerprint[admission.IDENTITY], self.ble.app_id)
            self.refusals = 0
            self.connection = link
            if self.rotate:
                await self._poll_once(link)
                return
            await self._serve(link, lost)
        finally:
            self.connection = None
            await link.disconnect()

    # -- evidence --

    def _evidence(self, identity: str, level: str, refusal: str | None = None) -> Evidence:
        fingerprint = {admission.IDENTITY: identity, admission.BOND: level}
        if self.ble.app_id is not None:
            bound = self.adapter.bonds.identity_of(self.ble.app_id)
            if bound is not None:
                fingerprint[admission.BOUND] = bound
        return Evidence(self.device_id, "ble", self.endpoint, fingerprint, refusal=refusal)

    async def _bond(self, link: bluez.Connection) -> Evidence:
        """Pair if the config asks for a bond and there is none; the identity and the bond."""
        required = self.ble.bond
        bonds = self.adapter.bonds
        with self._unavailable():
            paired = await link.paired()
            if required == "none":
                identity = link.address
                level = (bonds.level(identity) or "just-works") if paired else "none"
                return self._evidence(identity, level)
            if paired:
                identity = await link.identity_address()
                return self._evidence(identity, bonds.level(identity) or "just-works")
        pairing = bluez.Pairing(self.ble.passkey if required == "authenticated" else None)
        agent = self.adapter.agent
        agent.pairing[link.path] = pairing
        try:
            await link.pair()
        except bluez.PairingFailed as err:
            return self._evidence(link.address, "none", refusal=err.reason)
        finally:
            agent.pairing.pop(link.path, None)
        identity = link.address
        level = "authenticated" if pairing.passkey_given else "just-works"
        bonds.record(identity, level)
        log.info("%s: bonded with %s (%s)", self.device_id, identity, level)
        return self._evidence(identity, level)

    async def _challenge(self, link: bluez.Connection, evidence: Evidence) -> Evidence:
        """Write a fresh nonce to the challenge characteristic and read the answer back."""
        assert self.ble.challenge is not None
        uuid = self.ble.challenge.characteristic
        nonce = secrets.token_bytes(gatt.NONCE_SIZE)
        try:
            async with self.gatt_ops:
                await link.write(uuid, nonce)
                answer = await link.read(uuid)
        except bluez.BlueZError as err:
            return Evidence(
                evidence.device_id,
                evidence.transport,
                evidence.endpoint,
                evidence.fingerprint,
                refusal=f"challenge not answered: {err.detail}",
            )
        return Evidence(
            evidence.device_id,
            evidence.transport,
            evidence.endpoint,
            evidence.fingerprint,
            proofs={admission.NONCE: nonce, admission.ANSWER: answer},
        )

    # -- data --

    async def _serve(self, link: bluez.Connection, lost: asyncio.Event) -> None:
        for row, decoder in self.notify_rows:
            async with self.gatt_ops:
                with self._unavailable():
                    await link.start_notify(row.uuid, self._on_notify(decoder))
        self.health.up()
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(lost.wait())]
        if self.poll_rows:
            waits.append(asyncio.ensure_future(self._poll(link)))
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel("the link's session ended")
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
        raise DeviceUnavailable(self.device_id, self.endpoint, "link lost", cause="lost")

    def _on_notify(self, decoder: gatt.Decoder) -> Callable[[bytearray], None]:
        device_id = self.device_id
        names = decoder.names
        sink = self.adapter.sink
        health = self.health

        def on_notify(data: bytearray) -> None:
            ts_ms = int(time.time() * 1000)
            try:
                values = decoder.decode(data)
            except ValueError as err:
                self._malformed(err)
                return
            health.reads_ok += 1
            health.last_ok = ts_ms / 1000  # a notification is a read the device pushed
            sink(Scan(device_id, ts_ms, names, values))

        return on_notify

    def _malformed(self, err: Exception) -> None:
        health = self.health
        health.malformed += 1
        if health.malformed == 1 or health.malformed % 1000 == 0:
            log.warning(
                "%s: malformed value (%d so far): %s", self.device_id, health.malformed, err
            )

    async def _read(
        self, link: bluez.Connection, row: BleCharacteristic, decoder: gatt.Decoder
    ) -> None:
        ts_ms = int(time.time() * 1000)
        try:
            async with self.gatt_ops:
                with self._unavailable():
                    data = await link.read(row.uuid)
        except DeviceUnavailable:
            self.health.reads_failed += 1
            raise
        try:
            values = decoder.decode(data)
        except ValueError as err:
            self._malformed(err)
            return
        self.health.read_ok()
        self.adapter.sink(Scan(self.device_id, ts_ms, decoder.names, values))

    async def _poll_once(self, link: bluez.Connection) -> None:
        for row, decoder in self.poll_rows:
            await self._read(link, row, decoder)

    async def _poll(self, link: bluez.Connection) -> None:
        loop = asyncio.get_running_loop()
        due = [loop.time()] * len(self.poll_rows)
        while True:
            index = min(range(len(due)), key=due.__getitem__)
            await asyncio.sleep(max(0.0, due[index] - loop.time()))
            row, decoder = self.poll_rows[index]
            await self._read(link, row, decoder)
            due[index] = max(due[index] + row.period, loop.time())

    # -- requests in --

    async def read(self, points: Sequence[str]) -> Scan:
        """A fresh read of ``points`` (every value if empty): each characteristic that holds
        one is read once, on the link's connection, within its GATT operation limit."""
        names = tuple(points) or tuple(self._rows_of)
        unknown = [n for n in names if n not in self._rows_of]
        if unknown:
            raise KeyError(f"{self.device_id} has no value {unknown[0]!r}")
        link = self._connected()
        ts_ms = int(time.time() * 1000)
        values: dict[str, Any] = {}
        quality = GOOD
        rows = {self._rows_of[n][0].uuid: self._rows_of[n] for n in names}
        async with self._in_time("read"):
            for row, decoder in rows.values():
                async with self.gatt_ops:
                    with self._request(f"read {row.uuid}"):
                        data = await link.read(row.uuid)
                try:
                    values.update(zip(decoder.names, decoder.decode(data), strict=True))
                except ValueError as err:
                    self._malformed(err)
                    quality = BAD
        return Scan(self.device_id, ts_ms, names, [values.get(n) for n in names], quality)

    async def write(self, point: str, value: Any) -> Scan:
        """Write ``value`` to ``point`` (a GATT write with response to its characteristic,
        which the decode table marks writable), then read the characteristic back on the same
        connection: the scan holds what the device holds now (quality BAD if the read back
        does not decode).

        Raises, before anything is sent: KeyError for a point the device does not have;
        :class:`~adapters.base.NotWritable` for a point on a characteristic not marked
        writable; :class:`~adapters.ble.gatt.InvalidValue` (a ValueError) for a value of the
        wrong type or outside what the characteristic holds; ``DeviceUnavailable`` (cause
        "unavailable") while the device is not connected. Then ``DeviceUnavailable`` with
        cause "exception" when the peripheral refuses the write or the read back with an ATT
        error (the reason carries it), "timeout" past ``ble.request_timeout``, "radio" for
        any other BlueZ failure. None of these ends the link's session.
        """
        entry = self._rows_of.get(point)
        if entry is None:
            raise KeyError(f"{self.device_id} has no value {point!r}")
        row, decoder = entry
        if not row.writable:
            reason = (
                f"its characteristic {row.uuid} is not marked writable in the decode table"
                if any(r.writable for r in self.ble.characteristics)
                else "the decode table marks no writable characteristic"
            )
            raise NotWritable(self.device_id, point, reason)
        data = decoder.encode_value(value)
        self._connected()
        async with self._writing:
            link = self._connected()  # the connection may have changed while waiting
            async with self._in_time(f"write {point}", sent=True), self.gatt_ops:
                with self._request(f"write {point}"):
                    await link.write(row.uuid, data)
                ts_ms = int(time.time() * 1000)
                with self._request(f"write {point} done, but its read back"):
                    back = await link.read(row.uuid)
        try:
            values, quality = decoder.decode(back), GOOD
        except ValueError as err:
            self._malformed(err)
            values, quality = [None], BAD
        return Scan(self.device_id, ts_ms, (point,), values, quality)

    def _connected(self) -> bluez.Connection:
        """The connection requests go through, while it is up and admitted."""
        link = self.connection
        if link is None:
            raise DeviceUnavailable(
                self.device_id, self.endpoint, "not connected", cause="unavailable"
            )
        return link

    @contextlib.asynccontextmanager
    async def _in_time(self, what: str, *, sent: bool = False) -> AsyncIterator[None]:
        """A request past ``ble.request_timeout`` as ``DeviceUnavailable`` (cause "timeout");
        ``sent``: say that the device may have taken it."""
        limit = self.adapter.section.request_timeout
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError as err:
            maybe = "; it may have reached the device" if sent else ""
            raise DeviceUnavailable(
                self.device_id,
                self.endpoint,
                f"{what}: no answer within {limit:g} s{maybe}",
                cause="timeout",
            ) from err


async def _pause(seconds: float) -> None:
    """Sleep between attempts, unless a stop was asked for meanwhile: a cancellation that
    bleak's ``wait_for`` swallowed during the session just ended would otherwise be lost, and
    the stop would wait out a quarantine's hold-off (300 s; seen in CI as a demo that did not
    stop while a peripheral's wrong challenge answer was being judged)."""
    raise_if_cancelled("bleak")
    await asyncio.sleep(seconds)
