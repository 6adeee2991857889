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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from gateway.config import HubConfig
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


# backoff_delay's attempt number from which its ceiling is the maximum, whatever the minimum.
REFUSED_ATTEMPT = 30


@dataclass(slots=True)
class SessionStats:
    connected: bool = False
    connects: int = 0
    envelopes_acked: int = 0
    readings_acked: int = 0
    last_error: str | None = None


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
    ) -> None:
        self.device_id = device_id
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

    def finish(self) -> None:
        """The queue was closed: stop retrying once nothing is left for this device (a session
        waiting to reconnect would otherwise hold the stop for the whole grace)."""
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
            server_hostname=hub.hostname,
            username=iothub_username(hub.hostname, self.device_id),
            keepalive=hub.keepalive,
            connect_timeout=hub.connect_timeout,
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
                publisher.add_done_callback(lambda _: watcher.cancel("publisher done"))
        except* UplinkError as group:
            raise group.exceptions[0] from None
        return True

    async def _publish(self, client: MqttClient) -> None:
        window = _Window()
        limit = self._hub.max_inflight
        device = self.device_id
        while True:
            while window.count >= limit:
                window.slot.clear()
                await window.slot.wait()
            items = await self._queue.lease(device, limit - window.count)
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
