"""The Gateway: builds the rooms from config, wires them, and owns start and stop order.

    adapters -> auth gate -> batcher -> sealer -> queue (store) -> uplink session per device

Start: load keys and identities (a bad one refuses the start), start the uplink sessions, then
the pollers. Stop (the ``stop`` event, set by SIGTERM, SIGINT or SIGHUP): stop polling, flush
every open batch through the sealer into the queue, close the queue, let each session publish
what is left within ``gateway.shutdown_grace`` seconds, then cancel what remains and report it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapters.base import DeviceHealth
from adapters.modbus.admission import ModbusRequirements
from adapters.modbus.config import ModbusLinkConfig
from adapters.modbus.link import ModbusBus, ModbusLink
from adapters.modbus.planstore import PlanStore
from adapters.modbus.security import ModbusTlsError
from adapters.modbus.security import client_context as modbus_tls_context
from gateway.config import BleEndpoint, Config, DeviceConfig
from gateway.control.dispatch import Control
from gateway.core.auth import AuthGate, Registration, Requirements
from gateway.core.batcher import Batcher
from gateway.core.envelope import Sealer
from gateway.core.errors import KeyringError, StartupError, UplinkError
from gateway.core.pipeline import Output, PipelineStep
from gateway.core.readings import Envelope, Scan
from gateway.core.tasks import stops_firmly
from gateway.enroll import Enrolment
from gateway.events import SecurityEvents
from gateway.identity import checks as identity
from gateway.identity import keyring
from gateway.identity.tls import client_context
from gateway.ops.service import Operations
from gateway.statelock import StateInUse, StateLock, lock_state, release_all
from gateway.store import SeqMarks, Store
from gateway.store.memory import MemoryQueue
from gateway.store.paths import store_path
from gateway.store.queue import EnvelopeQueue
from gateway.uplink.session import DeviceSession

if TYPE_CHECKING:
    from adapters.ble.adapter import BleAdapter
    from gateway.ops.metrics import AuditLag
from gateway.uplink.throttle import RateLimiter

log = logging.getLogger("fieldgate")


# Modbus devices read in lockstep up to BURST of them; larger fleets start in up to MAX_PHASES
# slots of their period. One burst of 1,000 devices put p99 at max_age + 219 ms (profile (b)).
BURST = 128
MAX_PHASES = 8
# Seconds between store commits, at least: groups the commits of a fleet whose envelopes are
# sealed one at a time, for at most this much latency.
COMMIT_INTERVAL = 0.01


@dataclass
class Counters:
    """What the stop's summary line reports besides the readings read: readings dropped when
    the store was full."""

    dropped_envelopes: int = 0
    dropped_readings: int = 0


class Intake:
    """The asyncio shell around the pure :class:`~gateway.core.pipeline.PipelineStep`: one timer per
    device's open batch, and a queue of sealed envelopes that one writer task drains into the
    store (so that store commits group naturally)."""

    def __init__(self, step: PipelineStep) -> None:
        self._step = step
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._loop = asyncio.get_running_loop()
        self.sealed: asyncio.Queue[list[Envelope]] = asyncio.Queue()

    def accept(self, scan: Scan) -> None:
        now = self._loop.time()
        # The age budget runs from the read, not from its arrival here: the read's round trip
        # and any wait on the loop are part of a reading's age.
        read_at = now - max(0.0, time.time() - scan.ts_ms / 1000)
        out = self._step.add(scan, read_at, now)
        if out is not None:
            self._apply(scan.device_id, out)

    def _apply(self, device_id: str, out: Output) -> None:
        if out.envelopes:
            self.sealed.put_nowait(out.envelopes)
        if out.arm is not None:
            timer = self._timers.pop(device_id, None)
            if timer is not None:
                timer.cancel()
            self._timers[device_id] = self._loop.call_at(out.arm, self._expire, device_id)

    def _expire(self, device_id: str) -> None:
        self._timers.pop(device_id, None)
        self._apply(device_id, self._step.expire(device_id, self._loop.time()))

    def flush(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        envelopes = self._step.flush()
        if envelopes:
            self.sealed.put_nowait(envelopes)


class Gateway:
    def __init__(
        self, config: Config, *, adopt_stranded: bool = False, enrolment: Enrolment | None = None
    ) -> None:
        self.config = config
        # The pinned Modbus fingerprints (gateway.enroll); None: nothing is enrolled.
        self.enrolment = enrolment
        # A single process (not a worker): take over what workers of an earlier run left.
        self._adopt_stranded = adopt_stranded
        self.boot_id = ""
        self.counters = Counters()
        self.health = {d.id: DeviceHealth(d.id) for d in config.devices if d.enabled}
        # Opened in run(), after keys and certificates were checked: a refused start writes
        # nothing.
        self._events: SecurityEvents | None = None
        self.queue: EnvelopeQueue | None = None
        self.sessions: dict[str, DeviceSession] = {}
        self._marks: SeqMarks | None = None
        # Modbus/TCP Security client contexts per device, made once at start (the passphrase).
        self._modbus_tls: dict[str, ssl.SSLContext] = {}
        self.step: PipelineStep | None = None
        self.control: Control | None = None
        self._gate: AuthGate | None = None
        # Read by gateway.ops (metrics, status) at scrape time; set in run().
        self.sealer: Sealer | None = None
        self.buses: list[ModbusBus] = []
        self.limiters: dict[str, RateLimiter] = {}
        self.ops: Operations | None = None
        # The audit stream's lag (records pending, oldest age), when the gateway keeps one.
        self.audit_lag: AuditLag | None = None

    @property
    def events(self) -> SecurityEvents:
        if self._events is None:
            self._events = SecurityEvents(self.config.gateway.state_dir)
        return self._events

    def _event(self, kind: str, device_id: str | None, reason: str, **fields: object) -> None:
        """Security events from the queue or store; drops are also counted here."""
        if kind == "envelopes-dropped":
            self.counters.dropped_envelopes += int(fields.get("envelopes", 0))  # type: ignore[call-overload]
            self.counters.dropped_readings += int(fields.get("readings", 0))  # type: ignore[call-overload]
        elif kind in ("store-disk-writable", "store-intake-refused"):  # refused while full
            self.counters.dropped_readings += int(fields.get("refused_readings", 0))  # type: ignore[call-overload]
        self.events.record(kind, device_id, reason, **fields)

    def _prepare(self) -> tuple[bytes, dict[str, ssl.SSLContext]]:
        cfg = self.config
        passphrase = cfg.secrets.passphrase()
        try:
            ring = keyring.load(cfg.sealing.keyring, passphrase)
            key = ring.get(cfg.sealing.key_id)
            self._marks = SeqMarks.from_sealing(cfg.sealing.key_id, ring.keys)
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
                why = identity.explain_key_failure(
                    device.cert.read_bytes(), device.key.read_bytes(), passphrase
                )
                raise StartupError(f"devices[{index}] ({device.id}): {why}: {err}") from err
            if device.modbus is not None and device.modbus.tls is not None:
                try:
                    self._modbus_tls[device.id] = modbus_tls_context(device.modbus.tls, passphrase)
                except ModbusTlsError as err:
                    raise StartupError(f"devices[{index}].modbus.{err} ({device.id})") from err
        for index, link in enumerate(cfg.links):
            tls = getattr(link, "tls", None)
            if tls is not None:
                try:
                    self._modbus_tls[f"links/{link.name}"] = modbus_tls_context(tls, passphrase)
                except ModbusTlsError as err:
                    raise StartupError(f"links[{index}].{err} ({link.name})") from err
        if cfg.secrets.allow_clear_keys:
            clear = [d.id for d in cfg.devices if not identity.key_is_encrypted(d.key.read_bytes())]
            if clear:
                log.warning(
                    "secrets.allow_clear_keys: %d device keys are in the clear (%s)",
                    len(clear),
                    ", ".join(clear[:5]) + (", ..." if len(clear) > 5 else ""),
                )
        return key, contexts

    def _open_queue(self) -> Store | MemoryQueue:
        store = self.config.store
        if store.kind == "memory":
            return MemoryQueue(max_bytes=store.max_bytes, on_event=self._event, policy=store.policy)
        return Store(
            store_path(self.config),
            max_bytes=store.max_bytes,
            policy=store.policy,
            on_event=self._event,
            marks=self._marks,
        )

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        key, contexts = self._prepare()
        locks = self._claim_state()
        try:
            async with self._open_queue() as queue:
                self.queue = queue
                self.boot_id = queue.boot_id
                batcher = Batcher(cfg.batching.max_bytes, cfg.batching.close_after)
                sealer = Sealer(
                    key, cfg.sealing.key_id, queue.boot_id, cfg.batching.max_bytes, queue.next_seq
                )
                self.sealer = sealer
                await self._run(stop, queue, batcher, sealer, contexts)
        finally:
            # However the run ends, the events file is closed and the state is free again.
            if self._events is not None:
                self.events.close()
            release_all(locks)

    def _claim_state(self) -> list[StateLock]:
        """Lock the state folder (and an outside store) before anything there is opened; the
        kernel releases the locks however this process ends. A single process (not a worker)
        then takes over the envelopes that workers of an earlier run left."""
        cfg = self.config
        store_path = cfg.store.path if cfg.store.kind != "memory" else None
        try:
            locks = lock_state(cfg.gateway.state_dir, store_path)
        except StateInUse as err:
            raise StartupError(str(err)) from None
        if self._adopt_stranded:
            from gateway.workers import adopt_stranded

            try:
                adopt_stranded(cfg, 1)
            except BaseException as err:
                release_all(locks)
                if isinstance(err, StateInUse):
                    raise StartupError(str(err)) from None
                raise
        return locks

    async def _run(
        self,
        stop: asyncio.Event,
        queue: EnvelopeQueue,
        batcher: Batcher,
        sealer: Sealer,
        contexts: dict[str, ssl.SSLContext],
    ) -> None:
        cfg = self.config
        gate = AuthGate(
            [_registration(d, cfg, self.enrolment) for d in cfg.devices], self.events.record
        )
        self.step = PipelineStep(batcher, sealer, gate.admitted)
        self._gate = gate
        pipeline = Intake(self.step)
        connects = RateLimiter(cfg.hub.connect_rate)
        sends = RateLimiter(cfg.hub.send_rate)
        control = self.control = Control(
            cfg.control.switches(),
            {d.id: d.control.policy() for d in cfg.devices if d.enabled},
            record=self.events.record,
            status_of=self.device_status,
            section_of=self.reported_section,
            watch=lambda d, changed: self.health[d].watchers.append(changed),
            state_dir=cfg.gateway.state_dir,
            timeout=cfg.control.timeout,
        )
        twins = RateLimiter(cfg.control.twin_rate)
        self.limiters = {"connect": connects, "send": sends, "twin": twins}
        ops = self.ops = Operations(self, stop)
        self.sessions = {
            d: DeviceSession(
                d,
                cfg.hub,
                ctx,
                ops.observed(queue),
                connects,
                sends,
                on_event=self.events.record,
                commands=control,
                twins=twins,
                report_interval=cfg.control.report_interval,
            )
            for d, ctx in contexts.items()
        }
        log.info(
            "gateway boot %s: %d devices, hub %s:%d",
            self.boot_id,
            len(contexts),
            cfg.hub.address or cfg.hub.hostname,
            cfg.hub.port,
        )
        by_id = {d.id: d for d in cfg.devices}
        links = cfg.modbus_links()
        # Bursts of at most about BURST devices: smaller ones would cost more commits and
        # wake-ups than they save in waiting (3x the CPU on 20 devices, same latency).
        phases = min(MAX_PHASES, max(1, -(-len(links) // BURST)))
        plans = PlanStore(cfg.gateway.state_dir)
        buses: list[tuple[str, ModbusBus]] = []
        for link, devices in links:
            units = [
                ModbusLink(
                    d.id,
                    d.modbus.on(link),
                    d.points,
                    pipeline.accept,
                    gate.admit,
                    self.health[d.id],
                    phases=phases,
                    on_event=self._event,
                    plans=plans,
                    transport=link.transport,
                    identity=d.identity,
                )
                for d in devices
                if d.modbus is not None
            ]
            for unit in units:
                control.attach(unit.device_id, unit, frozenset(by_id[unit.device_id].point_names()))
            own = devices[0].modbus is not None and devices[0].modbus.link is None
            buses.append(
                (
                    f"poll[{devices[0].id}]" if own else f"link[{link.name}]",
                    ModbusBus(
                        link, units, tls_context=self._modbus_tls.get(_tls_key(link, devices))
                    ),
                )
            )
        self.buses = [bus for _, bus in buses]
        radios = self._radios(pipeline, gate)
        for adapter in radios.values():
            for ble_link in adapter.links:
                names = frozenset(by_id[ble_link.device_id].point_names())
                control.attach(ble_link.device_id, ble_link, names)
        try:
            async with ops.serving(), asyncio.TaskGroup() as uplink:
                writer = uplink.create_task(self._write(pipeline, queue), name="store-writer")
                session_tasks = [
                    uplink.create_task(s.run(), name=f"uplink[{d}]")
                    for d, s in self.sessions.items()
                ]
                async with asyncio.TaskGroup() as intake:
                    # One task per link: a device with its own host is its own link (poll[id]),
                    # the devices on a [[links]] entry share it (link[name]).
                    # A poller that does not end at its cancel is cancelled again, and left
                    # behind after a grace: a stuck radio never holds the stop.
                    pollers = [
                        intake.create_task(stops_firmly(bus.run(), name), name=name)
                        for name, bus in buses
                    ]
                    pollers += [
                        intake.create_task(
                            stops_firmly(adapter.run(), f"ble[{name}]"), name=f"ble[{name}]"
                        )
                        for name, adapter in radios.items()
                    ]
                    await stop.wait()
                    log.info("stopping: polling stops, open batches are flushed")
                    for task in pollers:
                        task.cancel("stop: polling ends")
                pipeline.flush()
                await pipeline.sealed.join()
                writer.cancel("stop: every sealed envelope is in the store")
                queue.close()
                for session in self.sessions.values():
                    session.finish()
                await self._drain(queue, session_tasks)
        finally:
            control.close()

    def identity_state(self, device_id: str) -> dict[str, Any]:
        gate = self._gate
        if gate is not None and device_id in gate.quarantined:
            return {"state": "quarantined", "reason": gate.quarantined[device_id]}
        admitted = gate is not None and gate.admitted(device_id)
        device = next(d for d in self.config.devices if d.id == device_id)
        # BLE devices are verified by their bond (and challenge), Modbus/TCP Security ones by
        # TLS, the others by their identity reads unless their config says "none".
        verified = (
            device.ble is not None
            or (device.modbus is not None and device.modbus.tls is not None)
            or (device.identity is not None and not device.identity.none)
        )
        return {"state": "admitted" if admitted else "pending", "verified": bool(verified)}

    def reported_section(self, device_id: str) -> dict[str, Any]:
        """The device's section of its twin's reported properties: changes at transitions."""
        health = self.health[device_id]
        return {
            "state": health.state,
            "since": round(health.since, 3),
            "identity": self.identity_state(device_id),
            "boot_id": self.boot_id,
        }

    def device_status(self, device_id: str) -> dict[str, Any]:
        """What the ``status`` method answers: health, identity, store depth, uplink."""
        health = self.health[device_id]
        queue = self.queue
        depth = next(
            (d for d in (queue.depth() if queue is not None else []) if d.device_id == device_id),
            None,
        )
        session = self.sessions.get(device_id)
        return {
            "device": device_id,
            "state": health.state,
            "since": round(health.since, 3),
            "last_error": health.last_error,
            "reads_ok": health.reads_ok,
            "reads_failed": health.reads_failed,
            "malformed": health.malformed,
            "identity": self.identity_state(device_id),
            "store": {
                "queued": depth.queued if depth else 0,
                "leased": depth.leased if depth else 0,
                "bytes": depth.bytes if depth else 0,
            },
            "uplink": {
                "connected": session.stats.connected if session else False,
                "connects": session.stats.connects if session else 0,
                "readings_acked": session.stats.readings_acked if session else 0,
            },
            "boot_id": self.boot_id,
        }

    def _radios(self, pipeline: Intake, gate: AuthGate) -> dict[str, BleAdapter]:
        """One task per BLE adapter, serving that adapter's devices."""
        by_adapter: dict[str, dict[str, BleEndpoint]] = {}
        for d in self.config.devices:
            if d.enabled and d.ble is not None:
                by_adapter.setdefault(d.ble.adapter, {})[d.id] = d.ble
        if not by_adapter:
            return {}
        from adapters.ble.adapter import BleAdapter  # bleak loads only where BLE is configured

        return {
            name: BleAdapter(
                name,
                self.config.ble,
                devices,
                sink=pipeline.accept,
                admit=gate.admit,
                unknown=gate.unknown,
                health=self.health,
                state_dir=self.config.gateway.state_dir,
            )
            for name, devices in by_adapter.items()
        }

    async def _write(self, pipeline: Intake, queue: EnvelopeQueue) -> None:
        sealed = pipeline.sealed
        loop = asyncio.get_running_loop()
        last = -COMMIT_INTERVAL
        while True:
            envelopes = await sealed.get()
            # At most one commit per COMMIT_INTERVAL: envelopes sealed meanwhile join it. A
            # fleet whose reads are spread evenly would otherwise commit (and fsync) each
            # envelope alone: on profile (b), 2.3 times the gateway's CPU.
            pause = last + COMMIT_INTERVAL - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            taken = 1
            while not sealed.empty():
                envelopes = envelopes + sealed.get_nowait()
                taken += 1
            try:
                await asyncio.shield(queue.put(envelopes))
            finally:
                for _ in range(taken):
                    sealed.task_done()
            last = loop.time()

    async def _drain(self, queue: EnvelopeQueue, sessions: list[asyncio.Task[None]]) -> None:
        grace = self.config.gateway.shutdown_grace
        _, pending = await asyncio.wait(sessions, timeout=grace) if sessions else (set(), set())
        for task in pending:
            task.cancel(f"stop: shutdown grace of {grace:.1f} s passed")
        left = [d for d in queue.depth() if d.queued or d.leased]
        if left:
            total = sum(d.queued + d.leased for d in left)
            kept = "kept in the store for the next start" if isinstance(queue, Store) else "lost"
            log.warning(
                "shutdown grace of %.1f s passed with %d envelopes undelivered on %d devices (%s)",
                grace,
                total,
                len(left),
                kept,
            )
        else:
            log.info("stopped: every envelope was delivered")
        delivered = sum(s.stats.readings_acked for s in self.sessions.values())
        step = self.step
        unavailable = step.unavailable if step is not None else 0
        log.info(
            "readings: %d read, %d delivered, %d dropped%s",
            step.readings if step is not None else 0,
            delivered,
            self.counters.dropped_readings,
            # A point that could not be read travels as an unavailable marker: counted in
            # both figures, so the line also says how many of them carry no value.
            f" ({unavailable} of them unavailable: no value)" if unavailable else "",
        )


def _tls_key(link: ModbusLinkConfig, devices: list[DeviceConfig]) -> str:
    """Where :meth:`Gateway._prepare` keeps a link's TLS client context: under the device's
    id for a device's own host, under ``links/NAME`` for a configured link."""
    own = devices[0].modbus is not None and devices[0].modbus.link is None
    return devices[0].id if own else f"links/{link.name}"


def _registration(
    device: DeviceConfig, config: Config, enrolment: Enrolment | None = None
) -> Registration:
    """What the registry (the config, and the enrolled fingerprints) says of a device."""
    requirements: Requirements | None = None
    if device.modbus is not None and device.identity is not None:
        hint = enrolment.hint if enrolment is not None else "fieldgate enroll --config FILE"
        pinned = enrolment.pinned(device.id) if enrolment is not None else None
        requirements = ModbusRequirements(device.identity.verified, pinned, hint)
    if device.ble is not None:
        from adapters.ble.admission import BleRequirements

        ble = device.ble
        key_file = ble.challenge.key_file if ble.challenge is not None else None
        requirements = BleRequirements.of(ble.address, ble.app_id, ble.bond, key_file)
    transport = config.transport_of(device)
    return Registration(device.id, transport, device.endpoint, device.enabled, requirements)
