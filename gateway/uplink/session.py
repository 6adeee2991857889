"""One IoT Hub device session per identity: lease envelopes, publish, ack at PUBACK.

A session owns nothing durable: what it has leased and not seen acknowledged goes back to the
queue when its connection ends, and is published again on the next connection (at-least-once;
consumers drop duplicates by device, boot id and sequence number).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from gateway.config import HubConfig
from gateway.core import codec, iothub
from gateway.core.backoff import backoff_delay
from gateway.core.errors import UplinkError
from gateway.core.iothub import iothub_username, telemetry_topic
from gateway.store.queue import EnvelopeQueue, Leased
from gateway.uplink.mqtt import MqttClient
from gateway.uplink.throttle import RateLimiter

log = logging.getLogger(__name__)


# TLS 1.2 suites the uplink offers: forward secret (ECDHE) and AEAD (AES-GCM, ChaCha20-Poly1305)
# only, the ones IoT Hub offers too. OpenSSL's default list adds six CBC suites (and DHE), so a
# hub endpoint that offers only CBC would be accepted. TLS 1.3 suites, all AEAD, are kept as
# they are (set_ciphers does not touch them).
# (kind, device_id, reason, **fields): how a session records a security event.
EventSink = Callable[..., None]


class Reply(Protocol):
    """A command's answer: a status and a JSON body."""

    @property
    def status(self) -> int: ...

    def payload(self) -> bytes: ...


class CommandPort(Protocol):
    """Where a session hands what the cloud sent its device (the gateway's control room)."""

    async def method(self, device_id: str, name: str, payload: bytes, rid: str) -> Reply: ...

    async def c2d(self, device_id: str, payload: bytes, message_id: str) -> None: ...

    async def desired(
        self, device_id: str, desired: Any, version: int | None
    ) -> dict[str, Any]: ...

    def reported(self, device_id: str) -> dict[str, Any]:
        """The device's own section of its twin's reported properties (health, identity)."""
        ...

    def watch(self, device_id: str, changed: Callable[[], None]) -> None:
        """Call ``changed`` whenever that section may have changed."""
        ...


# Method calls of one device waiting for their answer; more are answered 429 at once (a flood
# from a stolen cloud credential must not pile up tasks).
MAX_PENDING_METHODS = 32
# Desired patches that cannot be merged (not JSON objects) waiting at most.
MAX_PENDING_PATCHES = 16
# A twin request IoT Hub has not answered in this long is given up (the next connect retries).
TWIN_TIMEOUT = 30.0


# backoff_delay's attempt number from which its ceiling is the maximum, whatever the minimum.
REFUSED_ATTEMPT = 30


@dataclass(slots=True)
class SessionStats:
    connected: bool = False
    connects: int = 0
    envelopes_acked: int = 0
    readings_acked: int = 0
    last_error: str | None = None
    # Connections lost or refused, by the UplinkError's cause (timeout, refused-connack, a TLS
    # refusal such as untrusted, lost: closed by the hub or the network): every attempt that
    # ended in an error counts, whether it got as far as a CONNACK or not.
    disconnects: dict[str, int] = field(default_factory=dict)


class _Window:
    """In-flight publishes of one connection; callbacks from an old connection touch only it."""

    __slots__ = ("count", "slot")

    def __init__(self) -> None:
        self.count = 0
        self.slot = asyncio.Event()


class DeviceSession:
    def __init__(
        self,
        device_id: str,
        hub: HubConfig,
        context: ssl.SSLContext,
        queue: EnvelopeQueue,
        connects: RateLimiter,
        sends: RateLimiter,
        on_event: EventSink | None = None,
        commands: CommandPort | None = None,
        twins: RateLimiter | None = None,
        report_interval: float = 5.0,
    ) -> None:
        self.device_id = device_id
        self._commands = commands
        # Twin reads and reported patches of every session share IoT Hub's twin throttles.
        self._twins = twins or RateLimiter(iothub.TWIN_UPDATES_PER_S / 5)
        self._report_interval = report_interval
        self._twin = _TwinState()
        if commands is not None:
            commands.watch(device_id, self._twin.changed.set)
        self._on_event = on_event or (lambda *a, **k: None)
        # The refusal last recorded as a security event, while the uplink stays down.
        self._refused: tuple[str, int | None] | None = None
        self._hub = hub
        self._context = context
        self._queue = queue
        self._limiter = connects
        self._sends = sends
        self._finishing = asyncio.Event()
        self.stats = SessionStats()
        self._connection: _Connection | None = None

    def finish(self) -> None:
        """No more envelopes will come for this device (the queue was closed, or a reload
        removed the device): publish what is left, then end; stop retrying once nothing is
        left (a session waiting to reconnect would otherwise hold the stop for the whole
        grace)."""
        self._finishing.set()

    def _nothing_left(self) -> bool:
        return self._finishing.is_set() and not self._queue.holds(self.device_id)

    def _client(self) -> MqttClient:
        hub = self._hub
        return MqttClient(
            host=hub.address or hub.hostname,
            port=hub.port,
            client_id=self.device_id,
            ssl_context=self._context,
            server_hostname=hub.server_name or hub.hostname,
            username=iothub_username(hub.hostname, self.device_id),
            keepalive=hub.keepalive,
            connect_timeout=hub.connect_timeout,
            on_message=self._message if self._commands is not None else None,
        )

    async def run(self) -> None:
        """Publish until the queue is closed and drained; reconnect with backoff in between."""
        attempt = 0
        down: str | None = None  # the cause of the failures since the last connection
        while True:
            await self._limiter.acquire()
            refused = False
            try:
                async with self._client() as client:
                    self.stats.connected = True
                    self.stats.connects += 1
                    if attempt or self.stats.connects == 1:
                        log.info("%s: connected to %s", self.device_id, self._hub.hostname)
                    attempt = 0
                    down = None
                    self._refused = None
                    self.stats.last_error = None
                    if await self._pump(client):
                        return
            except UplinkError as err:
                if err.cause != down:
                    # Log the transition, not every retry.
                    log.warning("%s: uplink down: %s", self.device_id, err)
                    down = err.cause
                self.stats.last_error = str(err)
                self.stats.disconnects[err.cause] = self.stats.disconnects.get(err.cause, 0) + 1
                self._record_refusal(err)
                refused = not err.retryable
            finally:
                self.stats.connected = False
                self._queue.release(self.device_id)
            attempt += 1
            # A refusal (certificate, TLS, CONNACK) is not fixed by retrying soon: wait the
            # longest backoff (still with jitter), in case the operator fixes the hub's side.
            delay = backoff_delay(
                max(attempt, REFUSED_ATTEMPT) if refused else attempt,
                self._hub.backoff_min,
                self._hub.backoff_max,
            )
            until = asyncio.get_running_loop().time() + delay
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._finishing.wait()
            if self._nothing_left():
                return
            # Something is left: the rest of the backoff still applies.
            await asyncio.sleep(max(0.0, until - asyncio.get_running_loop().time()))

    def _record_refusal(self, err: UplinkError) -> None:
        """A security event per refusal transition: the same refusal again while down records
        nothing; another refusal, or the first after a connection, records one.

        Network-level failures (hub unreachable, timed out, connection lost after CONNACK)
        are not refusals: they are logged, and leave no security event.
        """
        if not err.refusal:
            return
        key = (err.cause, err.connack)
        if key == self._refused:
            return
        self._refused = key
        hub = self._hub
        # What the library said, for an operator who wants the raw words.
        origin = err.__cause__
        detail = (str(origin) or type(origin).__name__) if origin is not None else str(err)
        self._on_event(
            "uplink-refused",
            self.device_id,
            str(err),
            cause=err.cause,
            endpoint=f"{hub.address or hub.hostname}:{hub.port}",
            hub=hub.hostname,
            detail=detail,
            connack=err.connack,
        )

    async def _pump(self, client: MqttClient) -> bool:
        """True when the queue closed and every envelope was acked; raises on connection loss."""
        try:
            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(_until_closed(client), name=f"watch[{self.device_id}]")
                publisher = tg.create_task(self._publish(client), name=f"publish[{self.device_id}]")
                control = None
                if self._commands is not None:
                    self._connection = _Connection(client)
                    control = tg.create_task(
                        self._control(client, self._commands), name=f"control[{self.device_id}]"
                    )
                    publisher.add_done_callback(lambda _: control.cancel("publisher done"))
                publisher.add_done_callback(lambda _: watcher.cancel("publisher done"))
        except* UplinkError as group:
            raise group.exceptions[0] from None
        finally:
            if self._connection is not None:
                self._connection.end()
                self._connection = None
        return True

    # -- cloud to device ------------------------------------------------------------------------

    def _message(self, topic: str, payload: bytes) -> Any:
        """Routes what the hub sent; returns the awaitable a C2D message's PUBACK waits for."""
        connection = self._connection
        port = self._commands
        if connection is None or port is None:
            return None
        device = self.device_id
        method = iothub.parse_method_request(topic)
        if method is not None:
            name, rid = method
            if len(connection.methods) >= MAX_PENDING_METHODS:
                connection.answer(rid, 429, b'{"error": "too many commands pending"}')
                return None
            connection.spawn(self._method(connection, port, name, rid, payload), connection.methods)
            return None
        twin = iothub.parse_twin_response(topic)
        if twin is not None:
            status, rid, _ = twin
            waiting = connection.twin_requests.pop(rid, None)
            if waiting is not None and not waiting.done():
                waiting.set_result((status, payload))
            return None
        version = iothub.parse_desired_patch(topic)
        if version is not None:
            if connection.queue_desired(payload, version):
                connection.spawn(self._desired_patches(connection, port))
            return None
        if topic.startswith(iothub.c2d_filter(device)[:-1]):
            _, props = iothub.parse_c2d_topic(topic)
            return self._c2d(connection, port, payload, props.get(iothub.C2D_MESSAGE_ID, ""))
        log.warning("%s: ignored a message on %s", device, topic[:200])
        return None

    async def _method(
        self, connection: _Connection, port: CommandPort, name: str, rid: str, payload: bytes
    ) -> None:
        reply = await port.method(self.device_id, name, payload, rid)
        connection.answer(rid, reply.status, reply.payload())

    async def _c2d(
        self, connection: _Connection, port: CommandPort, payload: bytes, message_id: str
    ) -> None:
        # One at a time, in arrival order: MQTT acknowledges QoS 1 messages in the order they
        # came, and the commands of a device are carried out in that order too.
        async with connection.c2d_order:
            await port.c2d(self.device_id, payload, message_id)

    async def _desired_patches(self, connection: _Connection, port: CommandPort) -> None:
        """Carry out the queued desired patches in order, after the twin GET's document."""
        twin = self._twin
        async with connection.desired_order:
            while connection.desired_queue:
                patch, version = connection.desired_queue.popleft()
                if 0 <= version <= twin.version:
                    continue  # carried by the twin GET at connect, or an older patch
                if version >= 0:
                    twin.version = version
                await port.desired(self.device_id, patch, version if version >= 0 else None)
        connection.desired_worker = False

    def _filters(self) -> list[tuple[str, int]]:
        """What a device's session subscribes to: C2D at QoS 1 (acknowledged once carried
        out), method calls and twin traffic at QoS 0 (answered, or asked again)."""
        return [
            (iothub.c2d_filter(self.device_id), 1),
            (iothub.METHOD_REQUESTS, 0),
            (iothub.TWIN_RESPONSES, 0),
            (iothub.TWIN_DESIRED, 0),
        ]

    async def _control(self, client: MqttClient, port: CommandPort) -> None:
        """The control side of a connection. A failure of its own never ends the connection:
        telemetry goes on, and the next connection tries again."""
        try:
            await self._control_side(client, port)
        except UplinkError:
            raise  # the connection itself failed: the session reconnects
        except Exception:
            log.exception("%s: cloud commands stopped on this connection", self.device_id)

    async def _control_side(self, client: MqttClient, port: CommandPort) -> None:
        """Subscribe to what the device may be sent, read its twin, then keep its reported
        properties up to date (on change, at most every ``report_interval``)."""
        device = self.device_id
        connection = self._connection
        assert connection is not None
        granted = await client.subscribe(self._filters())
        if 0x80 in granted:
            # Telemetry goes on; the cloud cannot reach this device on this connection.
            log.warning(
                "%s: the hub refused subscriptions %s: no cloud commands on this connection",
                device,
                [f for (f, _), g in zip(self._filters(), granted, strict=False) if g == 0x80],
            )
            return
        twin = self._twin
        # Patches that arrive meanwhile wait: the GET's document comes first.
        async with connection.desired_order:
            await self._twins.acquire()
            try:
                status, body = await connection.twin_request(iothub.twin_get_topic, b"")
            except TimeoutError:
                status, body = 504, b"no answer"
            if status == 200:
                try:
                    doc = codec.loads(body)
                except codec.JSONDecodeError:
                    doc = None
                desired = doc.get("desired") if isinstance(doc, dict) else None
                version = desired.get("$version") if isinstance(desired, dict) else None
                if isinstance(version, int) and not isinstance(version, bool):
                    twin.version = version
                await port.desired(device, desired, None)
            else:
                log.warning("%s: twin GET answered %d: %s", device, status, body[:200])
        twin.sent = None  # a new connection reports its state in full
        twin.changed.set()
        loop = asyncio.get_running_loop()
        last = -self._report_interval
        while True:
            await twin.changed.wait()
            pause = last + self._report_interval - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            twin.changed.clear()
            patch = twin.take(port.reported(device))
            if not patch:
                continue
            await self._twins.acquire()
            last = loop.time()
            try:
                status, body = await connection.twin_request(
                    iothub.twin_reported_topic, codec.dumps(patch)
                )
            except TimeoutError:
                status, body = 504, b"no answer"
            if status == 204:
                continue
            log.warning("%s: reported properties answered %d: %s", device, status, body[:200])
            if not 400 <= status < 500:
                twin.failed(patch)  # not taken now: sent again with the next change
            # A 4xx would be refused again as it is: dropped (the log says why), so that it
            # cannot hold back every later patch.

    async def _publish(self, client: MqttClient) -> None:
        window = _Window()
        limit = self._hub.max_inflight
        device = self.device_id
        while True:
            while window.count >= limit:
                window.slot.clear()
                await window.slot.wait()
            items = await self._lease(limit - window.count)
            if not items:
                while window.count:
                    window.slot.clear()
                    await window.slot.wait()
                await client.disconnect()
                return
            for item in items:
                await self._sends.acquire()
                await client.writable()
                future = client.publish(
                    telemetry_topic(device, item.envelope.header), item.envelope.body
                )
                assert future is not None
                window.count += 1
                future.add_done_callback(partial(self._acked, window, item))

    async def _lease(self, limit: int) -> list[Leased]:
        """The queue's lease, which also ends (``[]``) once :meth:`finish` was called and
        nothing is pending for this device, though the queue stays open for the others (a
        device removed by a reload). A lease waits only while nothing is pending, so one
        cancelled at the finish has taken nothing. Only a lease that would wait races the
        finish (two tasks per idle wait); one with envelopes pending is taken at once."""
        if not self._finishing.is_set() and not self._queue.pending(self.device_id):
            lease = asyncio.ensure_future(self._queue.lease(self.device_id, limit))
            finishing = asyncio.ensure_future(self._finishing.wait())
            try:
                await asyncio.wait((lease, finishing), return_when=asyncio.FIRST_COMPLETED)
            finally:
                finishing.cancel()
                if not lease.done():
                    lease.cancel()
            if not lease.done():
                await asyncio.wait((lease,))  # the cancel lands at the lease's next await
            if not lease.cancelled():
                return lease.result()
        if not self._queue.pending(self.device_id):
            return []
        return await self._queue.lease(self.device_id, limit)

    def _acked(self, window: _Window, item: Leased, future: asyncio.Future[None]) -> None:
        window.count -= 1
        window.slot.set()
        if future.cancelled() or future.exception() is not None:
            return
        self._queue.ack(self.device_id, item.lease_id)
        self.stats.envelopes_acked += 1
        self.stats.readings_acked += item.envelope.header.count


async def _until_closed(client: MqttClient) -> None:
    await client.closed


class _TwinState:
    """A device's twin as its sessions know it: the desired version carried out, and the
    reported properties last taken by the hub (patches are the difference)."""

    def __init__(self) -> None:
        self.version = -1
        self.changed = asyncio.Event()
        self.sent: dict[str, Any] | None = None  # None: report everything

    def take(self, reported: dict[str, Any]) -> dict[str, Any]:
        """The patch from what was sent to ``reported``: changed sections and points."""
        sent = self.sent or {}
        patch: dict[str, Any] = {}
        if reported.get("fieldgate") != sent.get("fieldgate"):
            patch["fieldgate"] = reported.get("fieldgate")
        before = sent.get("points", {})
        points = {k: v for k, v in reported.get("points", {}).items() if before.get(k) != v}
        if points:
            patch["points"] = points
        self.sent = {
            "fieldgate": reported.get("fieldgate"),
            "points": {**before, **points},
        }
        return patch

    def failed(self, patch: dict[str, Any]) -> None:
        """Not taken: what it carried counts as not sent (it goes with the next patch)."""
        if self.sent is None:
            return
        if "fieldgate" in patch:
            self.sent["fieldgate"] = None
        for name in patch.get("points", {}):
            self.sent["points"].pop(name, None)


class _Connection:
    """What one connection of a session has going: command tasks, twin requests, answers."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.methods: set[asyncio.Task[None]] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.twin_requests: dict[str, asyncio.Future[tuple[int, bytes]]] = {}
        self.c2d_order = asyncio.Lock()
        self.desired_order = asyncio.Lock()
        self.desired_queue: deque[tuple[Any, int]] = deque()
        self.desired_worker = False
        self._rid = 0

    def queue_desired(self, payload: bytes, version: int) -> bool:
        """Queue a desired patch; True when a worker must be started. Patches that follow
        each other merge into one (IoT Hub's merge semantics), so a flood cannot pile up."""
        try:
            patch = codec.loads(payload)
        except codec.JSONDecodeError:
            patch = None
        queue = self.desired_queue
        if queue and isinstance(patch, dict) and isinstance(queue[-1][0], dict):
            merged = _merge(queue[-1][0], patch)
            queue[-1] = (merged, version)
        elif len(queue) < MAX_PENDING_PATCHES:
            queue.append((patch, version))
        else:
            log.warning("desired patch %d dropped: %d waiting", version, len(queue))
        if self.desired_worker:
            return False
        self.desired_worker = True
        return True

    def spawn(self, coro: Any, also: set[asyncio.Task[None]] | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        for bucket in (self.tasks, also):
            if bucket is not None:
                bucket.add(task)
                task.add_done_callback(bucket.discard)
        task.add_done_callback(_log_failure)

    def answer(self, rid: str, status: int, payload: bytes) -> None:
        if self.client.closed.done():
            return  # the hub times the call out
        try:
            self.client.publish(iothub.method_response_topic(status, rid), payload, qos=0)
        except UplinkError:
            pass

    async def twin_request(self, topic: Callable[[str], str], payload: bytes) -> tuple[int, bytes]:
        self._rid += 1
        rid = str(self._rid)
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.twin_requests[rid] = future
        self.client.publish(topic(rid), payload, qos=0)
        try:
            async with asyncio.timeout(TWIN_TIMEOUT):
                return await future
        finally:
            self.twin_requests.pop(rid, None)

    def end(self) -> None:
        for task in self.tasks:
            task.cancel("the connection ended")
        for future in self.twin_requests.values():
            future.cancel()


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(into)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("command task %s failed", task.get_name(), exc_info=task.exception())
