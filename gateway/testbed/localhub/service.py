"""The hub side of the stand-in: subscribe as ``hub-service``, open, record and account.

Every telemetry message is recorded raw (topic, arrival time, body) to a JSON-lines file that
``fieldgate open`` reads later, and opened on arrival with the sealing keyring so the stand-in
can show per-device readings, sequence gaps, duplicates and read-to-hub latency.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.audit.files import P_STREAM, AuditFileError
from gateway.consumer import (
    Opened,
    SequenceTracker,
    audit_message,
    open_all,
    open_message,
    read_record,
)
from gateway.core import iothub
from gateway.core.errors import EnvelopeError, UplinkError
from gateway.identity import keyring as keyring_mod
from gateway.identity.pki import SERVICE_IDENTITY, Pki, ensure_hub_identity
from gateway.identity.tls import client_context
from gateway.uplink.mqtt import MqttClient

log = logging.getLogger("fieldgate.localhub")

TELEMETRY = iothub.ALL_TELEMETRY
MODULE_TELEMETRY = iothub.ALL_MODULE_TELEMETRY


@dataclass
class DeviceView:
    envelopes: int = 0
    readings: int = 0
    duplicates: int = 0
    refused: int = 0
    conflicts: int = 0  # envelopes reusing sequence numbers with other content
    last: dict[str, Any] = field(default_factory=dict)
    last_ts_ms: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=4096))


class HubService:
    def __init__(
        self,
        pki: Pki,
        *,
        host: str,
        port: int,
        record: Path | None = None,
        on_opened: Callable[[Opened, int], None] | None = None,
        identity: str = SERVICE_IDENTITY,
    ) -> None:
        self.pki = pki
        self.host = host
        self.port = port
        self.identity = identity
        passphrase = pki.passphrase()
        self.keyring = keyring_mod.load(pki.keyring, passphrase)
        cert, key = ensure_hub_identity(pki.root, identity)
        self._context = client_context(pki.root_cert, cert, key, passphrase)
        self._on_opened = on_opened
        self.tracker = SequenceTracker()
        if record is not None and record.exists():
            # The record is the hub's memory: what arrived before this start is not a gap.
            open_all(read_record(record), self.keyring, self.tracker)
        self._record: IO[bytes] | None = open(record, "ab") if record else None
        self.devices: dict[str, DeviceView] = {}
        self.audit_items: dict[str, int] = {}  # audit records and heads received per gateway
        self.refused: list[str] = []
        self.connected = asyncio.Event()
        # Set at every message opened: for waiting until something has arrived.
        self.opened = asyncio.Event()
        self._client: MqttClient | None = None

    def _message(self, topic: str, body: bytes) -> None:
        # Arrival is when the read that carried this message returned, not when this handler
        # got to it: a burst of envelopes must not count the consumer's own work as latency.
        client = self._client
        now = client.read_at if client is not None and client.read_at else time.time()
        if self._record is not None:
            self._record.write(
                orjson.dumps({"t": now, "topic": topic, "body": base64.b64encode(body).decode()})
                + b"\n"
            )
            self._record.flush()
        if P_STREAM in topic and self._audit(topic, body):
            return
        if topic.split("/", 3)[2:3] == ["modules"]:
            return  # another module output (IoT Edge): recorded, not an envelope
        device = topic.split("/")[1] if topic.startswith("devices/") else "?"
        view = self.devices.setdefault(device, DeviceView())
        try:
            opened = open_message(topic, body, self.keyring, received=now)
        except EnvelopeError as err:
            view.refused += 1
            self.refused.append(f"{topic}: {err}")
            log.warning("refused a message on %s: %s", topic, err)
            return
        before = len(self.tracker.conflicts)
        fresh = self.tracker.add(opened)
        self.opened.set()
        view.envelopes += 1
        if len(self.tracker.conflicts) > before:
            h = opened.header
            view.conflicts += 1
            line = (
                f"{topic}: CONFLICT boot {h.boot_id} seq {h.first_seq}..{h.first_seq + h.count - 1}"
                " seen before with other content"
            )
            self.refused.append(line)
            log.warning("%s", line)
            # Flagged, not shown as the device's latest values nor timed as fresh readings.
            fresh = []
        else:
            view.readings += len(fresh)
            view.duplicates += len(opened.readings) - len(fresh)
        for reading in fresh:
            view.last[reading.point] = reading.value
        if fresh:
            view.last_ts_ms = fresh[-1].ts_ms
            now_ms = now * 1000
            # Latency per scan (the first reading of each read), not per point: same clock.
            view.latencies_ms.extend(now_ms - r.ts_ms for r in fresh[:: max(1, len(fresh) // 16)])
        if self._on_opened is not None:
            # The metered size: body plus the properties riding in the topic.
            self._on_opened(opened, len(body) + len(topic.split("/", 4)[-1]))

    def _audit(self, topic: str, body: bytes) -> bool:
        """An audit stream message: counted per gateway (its chain is checked from the record
        by ``fieldgate audit verify``), never opened as an envelope."""
        try:
            found = audit_message(topic, body)
        except AuditFileError as err:
            self.refused.append(f"{topic}: {err}")
            log.warning("refused an audit message on %s: %s", topic, err)
            return True
        if found is None:
            return False
        gateway, items = found
        self.audit_items[gateway] = self.audit_items.get(gateway, 0) + len(items)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Stay subscribed until ``stop`` is set, reconnecting if the broker goes away."""

        def make() -> MqttClient:
            client = MqttClient(
                host=self.host,
                port=self.port,
                client_id=self.identity,
                ssl_context=self._context,
                server_hostname="localhost",
                clean_session=False,
                on_message=self._message,
            )
            self._client = client
            return client

        async def subscribe(client: MqttClient) -> None:
            granted = await client.subscribe([(TELEMETRY, 1), (MODULE_TELEMETRY, 1)])
            if granted != [1, 1]:
                raise UplinkError(f"subscription refused: {granted}", retryable=False)

        await stay_subscribed("hub service", make, subscribe, self.connected, stop)

    def close(self) -> None:
        if self._record is not None:
            self._record.close()
            self._record = None


async def stay_subscribed(
    name: str,
    make: Callable[[], MqttClient],
    subscribe: Callable[[MqttClient], Awaitable[None]],
    connected: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """A service-side client of the stand-in: connected and subscribed until ``stop``,
    reconnecting half a second after the broker went away (``connected`` says which)."""
    while not stop.is_set():
        try:
            async with make() as client:
                await subscribe(client)
                connected.set()
                stop_task = asyncio.ensure_future(stop.wait())
                try:
                    watched: list[asyncio.Future[Any]] = [stop_task, client.closed]
                    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop_task.cancel()
        except UplinkError as err:
            connected.clear()
            log.warning("%s: %s", name, err)
            try:
                async with asyncio.timeout(0.5):
                    await stop.wait()
            except TimeoutError:
                pass
