"""The Gateway: builds the rooms from config, wires them, and owns start and stop order.

    adapters -> auth gate -> batcher -> sealer -> queue (store) -> uplink session per device

Start: load keys and identities (a bad one refuses the start), start the uplink sessions, then
the pollers. Stop (the ``stop`` event, set by SIGTERM/SIGINT): stop polling, flush every open
batch through the sealer into the queue, close the queue, let each session publish what is left
within ``gateway.shutdown_grace`` seconds, then cancel what remains and report it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from dataclasses import dataclass, field

from adapters.base import DeviceHealth
from adapters.modbus.client import ModbusPoller
from gateway import keyring
from gateway.auth import AuthGate, Registration
from gateway.batcher import Batch, Batcher
from gateway.config import Config
from gateway.envelope import Sealer
from gateway.errors import FieldgateError, KeyringError, UplinkError
from gateway.events import SecurityEvents
from gateway.queue import EnvelopeQueue, MemoryQueue
from gateway.readings import Envelope, Scan
from gateway.uplink.session import ConnectLimiter, DeviceSession, client_context

log = logging.getLogger("fieldgate")


class StartupError(FieldgateError):
    """The gateway cannot start with this config and these files (exit code 2)."""


@dataclass
class Counters:
    scans: int = 0
    readings: int = 0
    refused_scans: int = 0
    envelopes_sealed: int = 0
    dropped_envelopes: int = 0
    dropped_readings: int = 0
    started: float = field(default_factory=time.time)


class Pipeline:
    """gate -> batcher -> sealer, on the event loop, per scan; sealed envelopes go to a queue
    that one writer task drains into the store (so that store commits group naturally)."""

    def __init__(
        self, gate: AuthGate, batcher: Batcher, sealer: Sealer, counters: Counters
    ) -> None:
        self._gate = gate
        self._batcher = batcher
        self._sealer = sealer
        self._counters = counters
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._loop = asyncio.get_running_loop()
        self.sealed: asyncio.Queue[list[Envelope]] = asyncio.Queue()

    def accept(self, scan: Scan) -> None:
        counters = self._counters
        if not self._gate.admitted(scan.device_id):
            counters.refused_scans += 1
            return
        counters.scans += 1
        counters.readings += len(scan.values)
        self._add(scan)

    def _add(self, scan: Scan) -> None:
        closed, opened = self._batcher.add(scan, self._loop.time())
        if opened:
            self._arm(scan.device_id)
        if closed is not None:
            self._emit(closed)

    def _arm(self, device_id: str) -> None:
        timer = self._timers.pop(device_id, None)
        if timer is not None:
            timer.cancel()
        deadline = self._batcher.deadline(device_id)
        if deadline is not None:
            self._timers[device_id] = self._loop.call_at(deadline, self._expire, device_id)

    def _expire(self, device_id: str) -> None:
        self._timers.pop(device_id, None)
        batch = self._batcher.take(device_id)
        if batch is not None:
            self._emit(batch)

    def _emit(self, batch: Batch, *, final: bool = False) -> None:
        envelopes, leftover = self._sealer.seal(batch, final=final)
        self._counters.envelopes_sealed += len(envelopes)
        self.sealed.put_nowait(envelopes)
        # Scans that did not fit go to the head of the next batch, ahead of newer ones.
        if leftover and self._batcher.requeue(batch.device_id, leftover, self._loop.time()):
            self._arm(batch.device_id)

    def flush(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for batch in self._batcher.take_all():
            self._emit(batch, final=True)


class Gateway:
    def __init__(
        self, config: Config, *, boot_id: str | None = None, queue: EnvelopeQueue | None = None
    ) -> None:
        self.config = config
        self.boot_id = boot_id or secrets.token_hex(8)
        self.counters = Counters()
        self.health = {d.id: DeviceHealth(d.id) for d in config.devices if d.enabled}
        # Opened in run(), after keys and certificates were checked: a refused start writes
        # nothing.
        self._events: SecurityEvents | None = None
        self.queue: EnvelopeQueue = queue or MemoryQueue(on_drop=self._dropped)
        self.sessions: dict[str, DeviceSession] = {}

    @property
    def events(self) -> SecurityEvents:
        if self._events is None:
            self._events = SecurityEvents(self.config.gateway.state_dir)
        return self._events

    def _dropped(self, device_id: str, envelopes: int, readings: int) -> None:
        self.counters.dropped_envelopes += envelopes
        self.counters.dropped_readings += readings
        self.events.record(
            "envelope-dropped",
            device_id,
            "queue full: dropped oldest",
            envelopes=envelopes,
            readings=readings,
        )

    def _prepare(self) -> tuple[Batcher, Sealer, dict[str, ssl.SSLContext]]:
        cfg = self.config
        passphrase = cfg.secrets.passphrase()
        try:
            ring = keyring.load(cfg.sealing.keyring, passphrase)
            key = ring.get(cfg.sealing.key_id)
        except KeyringError as err:
            raise StartupError(f"sealing.keyring: {err}") from err
        contexts = {}
        for index, device in enumerate(cfg.devices):
            if not device.enabled:
                continue
            try:
                contexts[device.id] = client_context(
                    cfg.hub.ca_file, device.cert, device.key, passphrase
                )
            except UplinkError as err:
                raise StartupError(f"devices[{index}] ({device.id}): {err}") from err
        batcher = Batcher(cfg.batching.max_bytes, cfg.batching.max_age)
        return batcher, Sealer(key, cfg.sealing.key_id, self.boot_id, batcher), contexts

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        batcher, sealer, contexts = self._prepare()
        gate = AuthGate(
            [Registration(d.id, "modbus-tcp", d.modbus.label, d.enabled) for d in cfg.devices],
            self.events,
        )
        pipeline = Pipeline(gate, batcher, sealer, self.counters)
        limiter = ConnectLimiter(cfg.hub.connect_rate)
        self.sessions = {
            d: DeviceSession(d, cfg.hub, ctx, self.queue, limiter) for d, ctx in contexts.items()
        }
        log.info(
            "gateway boot %s: %d devices, hub %s:%d",
            self.boot_id,
            len(contexts),
            cfg.hub.address or cfg.hub.hostname,
            cfg.hub.port,
        )
        async with asyncio.TaskGroup() as uplink:
            writer = uplink.create_task(self._write(pipeline), name="store-writer")
            session_tasks = [
                uplink.create_task(s.run(), name=f"uplink[{d}]") for d, s in self.sessions.items()
            ]
            async with asyncio.TaskGroup() as intake:
                pollers = [
                    intake.create_task(
                        ModbusPoller(d, pipeline.accept, gate.admit, self.health[d.id]).run(),
                        name=f"poll[{d.id}]",
                    )
                    for d in cfg.devices
                    if d.enabled
                ]
                await stop.wait()
                log.info("stopping: polling stops, open batches are flushed")
                for task in pollers:
                    task.cancel()
            pipeline.flush()
            await pipeline.sealed.join()
            writer.cancel()
            self.queue.close()
            await self._drain(session_tasks)
        self.events.close()

    async def _write(self, pipeline: Pipeline) -> None:
        sealed = pipeline.sealed
        while True:
            envelopes = await sealed.get()
            taken = 1
            while not sealed.empty():
                envelopes = envelopes + sealed.get_nowait()
                taken += 1
            try:
                await asyncio.shield(self.queue.put(envelopes))
            finally:
                for _ in range(taken):
                    sealed.task_done()

    async def _drain(self, sessions: list[asyncio.Task[None]]) -> None:
        grace = self.config.gateway.shutdown_grace
        _, pending = await asyncio.wait(sessions, timeout=grace) if sessions else (set(), set())
        for task in pending:
            task.cancel()
        left = [d for d in self.queue.depth() if d.queued or d.leased]
        if left:
            total = sum(d.queued + d.leased for d in left)
            log.warning(
                "shutdown grace of %.1f s passed with %d envelopes undelivered on %d devices",
                grace,
                total,
                len(left),
            )
        else:
            log.info("stopped: every envelope was delivered")
        delivered = sum(s.stats.readings_acked for s in self.sessions.values())
        log.info(
            "readings: %d read, %d delivered, %d dropped",
            self.counters.readings,
            delivered,
            self.counters.dropped_readings,
        )
