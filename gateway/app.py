"""The Gateway: builds the rooms from config, wires them, and owns start, reload and stop order.

    adapters -> auth gate -> batcher -> sealer -> queue (store) -> uplink session per device

Start: load keys and identities (a bad one refuses the start), start the uplink sessions, then
the pollers. Each link's poller (a Modbus bus over its devices, a BLE adapter) and each device's
session is a task of its own, so that a reload (:meth:`Gateway.stage`, on SIGHUP, ``fieldgate
reload`` or the module twin) applies a diff: added devices start, removed ones stop polling,
their open batches are flushed and their sessions publish what is left, changed ones restart,
and the others keep their sessions and their rate. Stop (the ``stop`` event, set by SIGTERM or
SIGINT): stop polling, flush every open batch through the sealer into the queue, close the
queue, let each session publish what is left within ``gateway.shutdown_grace`` seconds, then
cancel what remains and report it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.base import DeviceHealth, DeviceLink
from adapters.modbus.admission import ModbusRequirements
from adapters.modbus.config import ModbusLinkConfig
from adapters.modbus.link import ModbusBus, ModbusLink
from adapters.modbus.planstore import PlanStore
from adapters.modbus.security import ModbusTlsError
from adapters.modbus.security import client_context as modbus_tls_context
from gateway.audit.log import AuditSettings
from gateway.audit.room import AuditRoom
from gateway.audit.stream import Send
from gateway.config import BleEndpoint, Config, DeviceConfig, sources, staging
from gateway.config.sources import Candidate, Outcome
from gateway.control.dispatch import Control
from gateway.core import codec
from gateway.core.audit import HeadSigner
from gateway.core.auth import AuthGate, Registration, Requirements
from gateway.core.batcher import Batcher
from gateway.core.envelope import Sealer
from gateway.core.errors import (
    ConfigError,
    FieldgateError,
    KeyringError,
    PkiError,
    StartupError,
    UplinkError,
)
from gateway.core.pipeline import Output, PipelineStep
from gateway.core.policy import DevicePolicy
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
    the store was full, and those delivered by sessions that a reload ended."""

    dropped_envelopes: int = 0
    dropped_readings: int = 0
    # Readings delivered by sessions a reload ended (removed or restarted devices).
    retired_acked: int = 0


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

    def flush_device(self, device_id: str) -> None:
        """Seal one device's open batch now (a reload stops or restarts it)."""
        timer = self._timers.pop(device_id, None)
        if timer is not None:
            timer.cancel()
        envelopes = self._step.flush_device(device_id)
        if envelopes:
            self.sealed.put_nowait(envelopes)


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        adopt_stranded: bool = False,
        enrolment: Enrolment | None = None,
        config_file: Path | None = None,
        config_hash: str = "",
        share: Callable[[Config], Config] | None = None,
        config_source: str | None = None,
        audit_output: Send | None = None,
    ) -> None:
        self.config = config
        # Where the audit stream goes instead of the gateway identity's own session (an IoT
        # Edge module's output: gateway.edge).
        self._audit_output = audit_output
        # What SIGHUP reloads, and the start's config as the events and the status name it
        # (the file; or, say, "twin" with the document's hash for a config from the twin).
        self.config_file = config_file
        self.config_source = config_source or (
            str(config_file) if config_file is not None else "config"
        )
        self.config_hash = config_hash
        self.config_status: Outcome | None = None
        # A worker runs its share of every config it loads (gateway.workers.worker_config).
        self._share = share
        self._hangups: set[asyncio.Task[Outcome]] = set()
        # Digests of the files the running config names (a renewed certificate is a change).
        self._files = staging.Files()
        # One staging at a time; a stop waits for the one under way.
        self._staging = asyncio.Lock()
        self._stopping = False
        self._running = asyncio.Event()  # set once the running set is up (stage() can apply)
        self._ended = asyncio.Event()  # set when run() returns, however
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
        # The running set, set up in _run: what a reload starts and stops.
        self._pipeline: Intake | None = None
        self._uplink: asyncio.TaskGroup | None = None
        self._intake: asyncio.TaskGroup | None = None
        self._session_tasks: dict[str, asyncio.Task[None]] = {}
        self._poller_tasks: dict[str, asyncio.Task[Any]] = {}
        self._pollers: dict[str, _Poller] = {}
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._plans = PlanStore(config.gateway.state_dir)
        self._connects = RateLimiter(config.hub.connect_rate)
        self._sends = RateLimiter(config.hub.send_rate)
        self._twins = RateLimiter(config.control.twin_rate)
        # The gateway's own identity (gateway.cert/key): signs the audit heads, sends the
        # audit stream. Loaded in _prepare.
        self._audit_signer: HeadSigner | None = None
        self._gateway_tls: ssl.SSLContext | None = None
        self.audit: AuditRoom | None = None
        self._audit_session: asyncio.Task[None] | None = None
        # Read by gateway.ops (metrics, status) at scrape time; set in run().
        self.sealer: Sealer | None = None
        self.limiters: dict[str, RateLimiter] = {}
        self.ops: Operations | None = None
        # The audit stream's lag (records pending, oldest age), when the gateway keeps one.
        self.audit_lag: AuditLag | None = None

    @property
    def events(self) -> SecurityEvents:
        if self._events is None:
            cfg = self.config
            streaming = cfg.audit.stream and self._audit_signer is not None
            self._events = SecurityEvents(
                cfg.gateway.state_dir,
                chain_id=cfg.gateway.id,
                signer=self._audit_signer,
                settings=AuditSettings(
                    max_bytes=cfg.audit.max_bytes,
                    head_every=cfg.audit.head_every,
                    head_interval=cfg.audit.head_interval,
                    prune_unsent=not streaming,
                ),
            )
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
        self._prepare_identity(passphrase)
        contexts, self._modbus_tls = _credentials(cfg, passphrase, None, None)
        if cfg.secrets.allow_clear_keys:
            clear = [d.id for d in cfg.devices if not identity.key_is_encrypted(d.key.read_bytes())]
            if clear:
                log.warning(
                    "secrets.allow_clear_keys: %d device keys are in the clear (%s)",
                    len(clear),
                    ", ".join(clear[:5]) + (", ..." if len(clear) > 5 else ""),
                )
        return key, contexts

    def _prepare_identity(self, passphrase: bytes) -> None:
        """The gateway's own key and TLS context; a key that does not load refuses the start."""
        gw = self.config.gateway
        if gw.cert is None or gw.key is None:
            return
        from gateway.identity.auditkeys import load_signer

        try:
            self._audit_signer = load_signer(gw.key, passphrase)
        except PkiError as err:
            raise StartupError(f"gateway.key: {err}") from err
        if self.config.audit.stream and self._audit_output is None:
            try:
                self._gateway_tls = client_context(
                    self.config.hub.ca_file, gw.cert, gw.key, passphrase
                )
            except UplinkError as err:
                why = identity.explain_key_failure(
                    gw.cert.read_bytes(), gw.key.read_bytes(), passphrase
                )
                raise StartupError(f"gateway.cert ({gw.id}): {why}: {err}") from err

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
        try:
            await self._run_all(stop)
        finally:
            self._ended.set()

    async def _run_all(self, stop: asyncio.Event) -> None:
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
                # The start's first record, then the config it loaded.
                self.audit = AuditRoom(cfg, self.events)
                self.audit.started(
                    self.boot_id,
                    self.boot_id if isinstance(queue, Store) else None,
                    self.config_hash or sources.from_config(cfg, self.config_source).hash,
                    self.config_source,
                )
                self._loaded(cfg)
                await self._run(stop, queue, batcher, sealer, contexts)
        finally:
            # However the run ends, the audit log is closed (a head over its tail) and the
            # state is free again.
            if self._events is not None:
                self.events.close()
            release_all(locks)

    def _loaded(self, cfg: Config) -> None:
        """The start's config is loaded: a security event with its hash, and the status file
        that ``fieldgate reload`` reads."""
        self._files = _with_pins(sources.fingerprints(cfg), self.enrolment)
        if not self.config_hash:
            self.config_hash = sources.from_config(cfg, self.config_source).hash
        outcome = Outcome("applied", self.config_source, self.config_hash)
        self.events.record(
            "config-loaded",
            None,
            "started",
            hash=self.config_hash,
            source=self.config_source,
            plan={"added": sorted(d.id for d in cfg.devices if d.enabled)},
        )
        self.config_status = outcome
        self._write_status(outcome)

    def _write_status(self, outcome: Outcome) -> None:
        """``config-status.json``; a full disk loses the file, not the gateway (the outcome is
        in the log and on ``config_status``)."""
        try:
            sources.write_status(self.config.gateway.state_dir, outcome)
        except OSError as err:
            log.error("cannot write %s: %s", sources.STATUS_FILE, err)

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
        room = self.audit
        assert room is not None  # made by run()
        gate = AuthGate(
            [_registration(d, cfg, self.enrolment) for d in cfg.devices], self.events.record
        )
        self.step = PipelineStep(batcher, sealer, gate.admitted)
        self._gate = gate
        pipeline = self._pipeline = Intake(self.step)
        self._connects = RateLimiter(cfg.hub.connect_rate)
        self._sends = RateLimiter(cfg.hub.send_rate)
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
        self._twins = RateLimiter(cfg.control.twin_rate)
        self._contexts = dict(contexts)
        self.limiters = {"connect": self._connects, "send": self._sends, "twin": self._twins}
        ops = self.ops = Operations(self, stop)
        log.info(
            "gateway boot %s: %d devices, hub %s:%d",
            self.boot_id,
            len(contexts),
            cfg.hub.address or cfg.hub.hostname,
            cfg.hub.port,
        )
        pollers = self._pollers_of(cfg, set(staging.tasks(cfg)), self.health, self._modbus_tls)
        audit_sender = room.make_sender(
            self._gateway_tls, self._connects, self._sends, self._audit_output
        )
        if audit_sender is not None:
            self.audit_lag = room.log.lag
        try:
            async with ops.serving(), asyncio.TaskGroup() as uplink:
                self._uplink = uplink
                writer = uplink.create_task(self._write(pipeline, queue), name="store-writer")
                audit_tasks = [uplink.create_task(c, name=n) for n, c in room.tasks()]
                if audit_sender is not None:
                    self._audit_session = uplink.create_task(
                        audit_sender, name=f"audit[{cfg.gateway.id}]"
                    )
                for device_id, context in contexts.items():
                    self._start_session(device_id, context)
                async with asyncio.TaskGroup() as intake:
                    self._intake = intake
                    # One task per link: a device with its own host is its own link (poll[id]),
                    # the devices on a [[links]] entry share it (link[name]); one per BLE
                    # adapter (ble[name]). Each starts and stops on its own at a reload.
                    for poller in pollers.values():
                        self._start_poller(poller)
                    self._running.set()
                    await stop.wait()
                    # A reload under way finishes first: the stop then sees one running set.
                    async with self._staging:
                        self._stopping = True
                    log.info("stopping: polling stops, open batches are flushed")
                    for task in self._poller_tasks.values():
                        task.cancel("stop: polling ends")
                pipeline.flush()
                await pipeline.sealed.join()
                writer.cancel("stop: every sealed envelope is in the store")
                queue.close()
                for session in self.sessions.values():
                    session.finish()
                await room.stopping("stop requested")
                tasks = list(self._session_tasks.values())
                if self._audit_session is not None:
                    tasks.append(self._audit_session)
                await self._drain(queue, tasks)
                for task in audit_tasks:
                    task.cancel("stop: the audit log commits the rest at close")
        finally:
            control.close()

    # -- the running set: one task per session, one per poller --------------------------------

    def _start_session(self, device_id: str, context: ssl.SSLContext) -> None:
        cfg = self.config
        session = DeviceSession(
            device_id,
            cfg.hub,
            context,
            self.ops.observed(self._queue()) if self.ops is not None else self._queue(),
            self._connects,
            self._sends,
            on_event=self.events.record,
            commands=self.control,
            twins=self._twins,
            report_interval=cfg.control.report_interval,
        )
        self.sessions[device_id] = session
        assert self._uplink is not None
        self._session_tasks[device_id] = self._uplink.create_task(
            session.run(), name=f"uplink[{device_id}]"
        )

    async def _stop_session(self, device_id: str, *, drain: bool) -> None:
        """End a device's session. ``drain``: it publishes what is queued for it first, for at
        most ``gateway.shutdown_grace`` seconds (a removed device); whatever is left stays in the
        store. Otherwise it ends now and its leases go back to the queue, for the session that
        replaces it (a changed device)."""
        session = self.sessions.pop(device_id, None)
        task = self._session_tasks.pop(device_id, None)
        if session is None or task is None:
            return
        if drain:
            session.finish()
            grace = self.config.gateway.shutdown_grace
            await asyncio.wait([task], timeout=grace)
        if not task.done():
            task.cancel("reload: the device's session ends")
            await asyncio.wait([task])
        # The stop's summary counts what every session of this run delivered.
        self.counters.retired_acked += session.stats.readings_acked

    def _start_poller(self, poller: _Poller) -> None:
        assert self.control is not None and self._intake is not None
        for device_id, link, points in poller.links:
            self.control.attach(device_id, link, points)
        # A poller that does not end at its cancel is cancelled again, and left behind after
        # a grace: a stuck radio never holds the stop.
        self._poller_tasks[poller.name] = self._intake.create_task(_poll(poller), name=poller.name)
        self._pollers[poller.name] = poller

    @property
    def buses(self) -> list[ModbusBus]:
        """The running Modbus buses (gateway.ops reads their links at scrape time)."""
        return [p.bus for p in self._pollers.values() if p.bus is not None]

    async def _stop_poller(self, name: str) -> None:
        self._pollers.pop(name, None)
        task = self._poller_tasks.pop(name, None)
        if task is not None:
            task.cancel("reload: the link stops")
            await asyncio.wait([task])

    def _pollers_of(
        self,
        cfg: Config,
        names: set[str],
        health: Mapping[str, DeviceHealth],
        modbus_tls: Mapping[str, ssl.SSLContext],
    ) -> dict[str, _Poller]:
        """The pollers named in ``names`` (see :func:`gateway.config.staging.tasks`), built and
        not started: building touches nothing that runs."""
        assert self._pipeline is not None and self._gate is not None
        pipeline, gate = self._pipeline, self._gate
        by_id = {d.id: d for d in cfg.devices}
        links = cfg.modbus_links()
        # Bursts of at most about BURST devices: smaller ones would cost more commits and
        # wake-ups than they save in waiting (3x the CPU on 20 devices, same latency).
        phases = min(MAX_PHASES, max(1, -(-len(links) // BURST)))
        out: dict[str, _Poller] = {}
        configured = {entry.name for entry in cfg.links}  # [[links]]: their own latency series
        for link, devices in links:
            name = staging.task_name(link.name, devices)
            if name not in names:
                continue
            units = [
                ModbusLink(
                    d.id,
                    d.modbus.on(link),
                    d.points,
                    self.audit.sink(pipeline.accept)
                    if self.audit and d.tamper
                    else pipeline.accept,
                    gate.admit,
                    health[d.id],
                    phases=phases,
                    on_event=self._event,
                    plans=self._plans,
                    transport=link.transport,
                    identity=d.identity,
                )
                for d in devices
                if d.modbus is not None
            ]
            bus = ModbusBus(link, units, tls_context=modbus_tls.get(_tls_key(link, devices)))
            if self.ops is not None:
                bus.observe = self.ops.link_observer(link.name, link.name in configured)
            attached: list[tuple[str, DeviceLink, frozenset[str]]] = [
                (u.device_id, u, frozenset(by_id[u.device_id].point_names())) for u in units
            ]
            out[name] = _Poller(name, bus.run, attached, bus)
        for adapter_name, adapter in self._radios(cfg, names, health).items():
            radio: list[tuple[str, DeviceLink, frozenset[str]]] = [
                (b.device_id, b, frozenset(by_id[b.device_id].point_names())) for b in adapter.links
            ]
            out[f"ble[{adapter_name}]"] = _Poller(f"ble[{adapter_name}]", adapter.run, radio)
        return out

    def _queue(self) -> EnvelopeQueue:
        assert self.queue is not None
        return self.queue

    # -- staged config ------------------------------------------------------------------------

    async def stage(
        self,
        new: Config | Mapping[str, Any] | Path,
        source: str,
        *,
        base: Path | None = None,
        sha256: str | None = None,
    ) -> Outcome:
        """Validate a new config (a :class:`Config`, a document as the module twin carries it,
        or a file) and apply it as a diff; one staging at a time. Never raises for a bad
        config: the :class:`Outcome` says applied, refused (nothing changed) or rolled back
        (the last good config runs again). Each ends as a security event and in
        ``state_dir/config-status.json``. ``base``: where a document's relative paths start;
        ``sha256``: the digest a file must have (a twin names a large config by path and
        SHA-256)."""
        async with self._staging:
            outcome = await self._stage(new, source, base, sha256)
        self._report(outcome)
        return outcome

    async def wait_running(self, timeout: float = 120.0) -> None:  # noqa: ASYNC109
        """Until the gateway's running set is up (or ``timeout`` seconds): a staging asked
        for during the start then applies instead of being refused as "not running"."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self._running, self._ended)]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def hangup(self) -> None:
        """SIGHUP: reload the config file, on a task of its own (the signal handler cannot
        wait); reloads run one at a time, in the order asked."""
        task = asyncio.get_running_loop().create_task(self.reload("SIGHUP"), name="reload")
        self._hangups.add(task)
        task.add_done_callback(self._hangups.discard)

    async def reload(self, source: str = "SIGHUP") -> Outcome:
        """Reload the config file the gateway was started with."""
        if self.config_file is None:
            outcome = Outcome(
                "refused", source, None, "the gateway was not started from a config file"
            )
            self._report(outcome)
            return outcome
        return await self.stage(self.config_file, source)

    async def _stage(
        self,
        new: Config | Mapping[str, Any] | Path,
        source: str,
        base: Path | None,
        sha256: str | None = None,
    ) -> Outcome:
        try:
            candidate = _candidate(new, source, base, sha256)
        except ConfigError as err:
            where, _ = sources.refusal(err)
            error = f"{err.path}: " + ("; ".join(err.problems) or "invalid config")
            return Outcome("refused", source, _hash_of(new), error, where)
        if self._share is not None:
            shared = self._share(candidate.config)
            candidate = Candidate(
                shared, candidate.source, candidate.hash, sources.fingerprints(shared)
            )
        if self._intake is None or self._stopping:
            why = "the gateway is stopping" if self._stopping else "the gateway is not running"
            return Outcome("refused", source, candidate.hash, why)
        enrolment = self.enrolment
        if isinstance(new, Path):
            # The pinned fingerprints beside the file are read again with it.
            from gateway.enroll import load_for

            try:
                enrolment = load_for(new)
            except FieldgateError as err:
                return Outcome("refused", source, candidate.hash, str(err), "enrolment")
        files = _with_pins(candidate.files, enrolment)
        old = self.config
        diff = staging.plan(old, candidate.config, self._files, files)
        if not diff.live:
            field = diff.restart[0]
            return Outcome("refused", source, candidate.hash, diff.refusal(), field, diff.summary())
        try:
            prepared = self._prepare_stage(candidate.config, diff, enrolment)
        except StartupError as err:
            # Nothing was touched: the running set is the last good config's.
            return Outcome("rolled-back", source, candidate.hash, str(err), None, diff.summary())
        saved = dict(self._contexts), dict(self._modbus_tls)
        try:
            await self._apply(candidate.config, diff, prepared)
        except Exception as err:
            # Any failure part-way is rolled back: the last good config runs again.
            log.exception("reload from %s failed part-way; restoring the last good config", source)
            self._contexts, self._modbus_tls = saved
            await self._restore(old, diff)
            return Outcome(
                "rolled-back",
                source,
                candidate.hash,
                f"applying failed: {err}",
                None,
                diff.summary(),
            )
        self.config = candidate.config
        self._files = files
        self.enrolment = enrolment
        self.config_hash = candidate.hash
        if self.audit is not None:
            self.audit.reconfigured(candidate.config, candidate.hash)
        return Outcome("applied", source, candidate.hash, None, None, diff.summary())

    def _report(self, outcome: Outcome) -> None:
        kind = {
            "applied": "config-loaded",
            "refused": "config-refused",
            "rolled-back": "config-rolled-back",
        }[outcome.status]
        reason = outcome.error or "applied as a diff"
        fields: dict[str, Any] = {"hash": outcome.hash, "source": outcome.source}
        if outcome.field is not None:
            fields["field"] = outcome.field
        if outcome.plan:
            fields["plan"] = dict(outcome.plan)
        self.events.record(kind, None, reason, **fields)
        self.config_status = outcome
        self._write_status(outcome)

    def _prepare_stage(
        self, cfg: Config, diff: staging.Plan, enrolment: Enrolment | None
    ) -> _Staged:
        """Everything that can fail, done before the running set is touched: the new and
        changed devices' keys and TLS contexts, their registrations, and their pollers."""
        starting = set(diff.added) | set(diff.changed)
        tasks = set(diff.tasks_added) | set(diff.tasks_restarted)
        contexts, modbus_tls = _credentials(cfg, cfg.secrets.passphrase(), starting, tasks)
        by_id = {d.id: d for d in cfg.devices}
        registrations = [_registration(by_id[d], cfg, enrolment) for d in sorted(starting)]
        health = {d: DeviceHealth(d) for d in starting}
        merged = {**self.health, **health}
        try:
            pollers = self._pollers_of(cfg, tasks, merged, {**self._modbus_tls, **modbus_tls})
        except (ImportError, ValueError, OSError) as err:
            raise StartupError(f"cannot build the new pollers: {err}") from err
        policies = {d: by_id[d].control.policy() for d in starting}
        return _Staged(contexts, modbus_tls, registrations, health, pollers, policies)

    async def _apply(self, cfg: Config, diff: staging.Plan, staged: _Staged) -> None:
        """Stop what goes or changes, flush it, then start what comes or changed."""
        assert self._pipeline is not None and self._gate is not None and self.control is not None
        pipeline, gate, control = self._pipeline, self._gate, self.control
        leaving = [*diff.removed, *diff.changed]
        await asyncio.gather(
            *(self._stop_poller(n) for n in (*diff.tasks_removed, *diff.tasks_restarted))
        )
        # Their open batches are sealed into the store before their sessions end.
        for device_id in leaving:
            pipeline.flush_device(device_id)
        await pipeline.sealed.join()
        await asyncio.gather(
            *(self._stop_session(d, drain=True) for d in diff.removed),
            *(self._stop_session(d, drain=False) for d in diff.changed),
        )
        for device_id in leaving:
            gate.forget(device_id)
            control.remove_device(device_id)
            self.health.pop(device_id, None)
            self._contexts.pop(device_id, None)
        # Devices in the registry and not running (disabled ones) are refused as such.
        for device in cfg.devices:
            if not device.enabled:
                gate.register(_registration(device, cfg, self.enrolment))
        for registration in staged.registrations:
            gate.register(registration)
        self.health.update(staged.health)
        self._modbus_tls.update(staged.modbus_tls)
        self.config = cfg
        for device_id, policy_ in staged.policies.items():
            control.add_device(device_id, policy_)
        for device_id, context in staged.contexts.items():
            self._contexts[device_id] = context
            self._start_session(device_id, context)
        for poller in staged.pollers.values():
            self._start_poller(poller)
        log.info(
            "reload applied: %d added, %d removed, %d changed, %d unchanged",
            len(diff.added),
            len(diff.removed),
            len(diff.changed),
            len(diff.unchanged),
        )

    async def _restore(self, old: Config, diff: staging.Plan) -> None:
        """Applying failed part-way: stop whatever the plan touched and start it again from the
        last good config, with the contexts it ran with (no key is decrypted again)."""
        assert self._gate is not None and self.control is not None and self._pipeline is not None
        touched = {*diff.added, *diff.removed, *diff.changed}
        names = {*diff.tasks_added, *diff.tasks_removed, *diff.tasks_restarted}
        for name in names:
            await self._stop_poller(name)
        for device_id in touched:
            self._pipeline.flush_device(device_id)
            await self._stop_session(device_id, drain=False)
        self.config = old
        by_id = {d.id: d for d in old.devices}
        for device_id in sorted(touched):
            self._gate.forget(device_id)
            self.control.remove_device(device_id)
            device = by_id.get(device_id)
            if device is None:
                self.health.pop(device_id, None)
                continue
            self._gate.register(_registration(device, old, self.enrolment))
            if not device.enabled:
                continue
            self.health[device_id] = DeviceHealth(device_id)
            self.control.add_device(device_id, device.control.policy())
            context = self._contexts.get(device_id)
            if context is not None:
                self._start_session(device_id, context)
        running = set(staging.tasks(old))
        for poller in self._pollers_of(
            old, names & running, self.health, self._modbus_tls
        ).values():
            self._start_poller(poller)

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
            "tamper": self.audit.device_tamper(device_id) if self.audit is not None else {},
            "boot_id": self.boot_id,
        }

    def _radios(
        self, cfg: Config, names: set[str], health: Mapping[str, DeviceHealth]
    ) -> dict[str, BleAdapter]:
        """One task per BLE adapter named in ``names`` (``ble[NAME]``), serving its devices."""
        assert self._pipeline is not None and self._gate is not None
        by_adapter: dict[str, dict[str, BleEndpoint]] = {}
        for d in cfg.devices:
            if d.enabled and d.ble is not None and f"ble[{d.ble.adapter}]" in names:
                by_adapter.setdefault(d.ble.adapter, {})[d.id] = d.ble
        if not by_adapter:
            return {}
        from adapters.ble.adapter import BleAdapter  # bleak loads only where BLE is configured

        return {
            name: BleAdapter(
                name,
                cfg.ble,
                devices,
                sink=self._pipeline.accept,
                admit=self._gate.admit,
                unknown=self._gate.unknown,
                health={d: health[d] for d in devices},
                state_dir=cfg.gateway.state_dir,
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
        undelivered = [d for d in queue.depth() if d.queued or d.leased]
        # Envelopes of devices a reload removed, left after their session's grace.
        removed = [d for d in undelivered if d.device_id not in self.sessions]
        left = [d for d in undelivered if d.device_id in self.sessions]
        kept = "kept in the store for the next start" if isinstance(queue, Store) else "lost"
        if left:
            total = sum(d.queued + d.leased for d in left)
            log.warning(
                "shutdown grace of %.1f s passed with %d envelopes undelivered on %d devices (%s)",
                grace,
                total,
                len(left),
                kept,
            )
        if removed:
            log.warning(
                "%d envelopes of %d devices that a reload removed are undelivered (%s): %s",
                sum(d.queued + d.leased for d in removed),
                len(removed),
                kept,
                ", ".join(sorted(d.device_id for d in removed)[:5]),
            )
        if not undelivered:
            log.info("stopped: every envelope was delivered")
        delivered = self.counters.retired_acked + sum(
            s.stats.readings_acked for s in self.sessions.values()
        )
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


@dataclass(frozen=True, slots=True)
class _Poller:
    """A poller task, built and not started: a Modbus bus or a BLE adapter, and the device
    links it carries commands on (attached to the control when it starts)."""

    name: str
    run: Callable[[], Coroutine[Any, Any, Any]]
    links: list[tuple[str, DeviceLink, frozenset[str]]]
    bus: ModbusBus | None = None  # a Modbus poller's bus (its links' metrics read it)


@dataclass(frozen=True, slots=True)
class _Staged:
    """What a reload prepared before touching the running set."""

    contexts: dict[str, ssl.SSLContext]
    modbus_tls: dict[str, ssl.SSLContext]
    registrations: list[Registration]
    health: dict[str, DeviceHealth]
    pollers: dict[str, _Poller]
    policies: dict[str, DevicePolicy]


def _with_pins(files: staging.Files, enrolment: Enrolment | None) -> staging.Files:
    """A device's digest also covers its enrolled fingerprint: a device enrolled again (a
    replaced unit) is changed, and its link checks it against the new pin."""
    devices = {
        d: f"{digest}:{codec.dumps(enrolment.pinned(d) if enrolment else None).hex()}"
        for d, digest in files.devices.items()
    }
    return staging.Files(files.sections, devices)


async def _poll(poller: _Poller) -> Any:
    """The poller's run, made only once its task runs: a task cancelled before its start (a
    reload rolled back at once) leaves no coroutine that was never awaited."""
    return await stops_firmly(poller.run(), poller.name)


def _credentials(
    cfg: Config, passphrase: bytes, devices: set[str] | None, tasks: set[str] | None
) -> tuple[dict[str, ssl.SSLContext], dict[str, ssl.SSLContext]]:
    """The uplink client context of each enabled device in ``devices``, and the Modbus/TCP
    Security client contexts of the links of the poller tasks in ``tasks`` (None: every one).
    A key that does not load raises :class:`StartupError` naming its field and why."""
    contexts = {}
    modbus_tls = {}
    for index, device in enumerate(cfg.devices):
        if not device.enabled:
            continue
        if devices is None or device.id in devices:
            try:
                contexts[device.id] = client_context(
                    cfg.hub.ca_file, device.cert, device.key, passphrase
                )
            except UplinkError as err:
                why = identity.explain_key_failure(
                    device.cert.read_bytes(), device.key.read_bytes(), passphrase
                )
                raise StartupError(f"devices[{index}] ({device.id}): {why}: {err}") from err
        own_task = f"poll[{device.id}]"
        if (
            device.modbus is not None
            and device.modbus.tls is not None
            and (tasks is None or own_task in tasks)
        ):
            try:
                modbus_tls[device.id] = modbus_tls_context(device.modbus.tls, passphrase)
            except ModbusTlsError as err:
                raise StartupError(f"devices[{index}].modbus.{err} ({device.id})") from err
    for index, link in enumerate(cfg.links):
        tls = getattr(link, "tls", None)
        if tls is not None and (tasks is None or f"link[{link.name}]" in tasks):
            try:
                modbus_tls[f"links/{link.name}"] = modbus_tls_context(tls, passphrase)
            except ModbusTlsError as err:
                raise StartupError(f"links[{index}].{err} ({link.name})") from err
    return contexts, modbus_tls


def _candidate(
    new: Config | Mapping[str, Any] | Path, source: str, base: Path | None, sha256: str | None
) -> Candidate:
    if isinstance(new, Config):
        return sources.from_config(new, source)
    if isinstance(new, Path):
        return sources.from_file(new, None if source == "SIGHUP" else source, sha256=sha256)
    return sources.from_document(new, source, base=base)


def _hash_of(new: Config | Mapping[str, Any] | Path) -> str | None:
    """The hash of a refused config, where it has one (a file that can be read)."""
    try:
        if isinstance(new, Path):
            return sources.file_hash(new.read_bytes())
        if isinstance(new, Config):
            return sources.document_hash(new.model_dump(mode="json"))
        return sources.document_hash(new)
    except (OSError, TypeError, ValueError):
        return None
