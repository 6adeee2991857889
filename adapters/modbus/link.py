"""Modbus links: one task per link (:class:`ModbusBus`), the devices on it as schedules.

A link is one connection (:class:`~.transport.ModbusTransport`: a TCP socket, a serial port,
RTU through a TCP socket), shared by the units on it, and one request is on the wire at a time.
:class:`ModbusLink` is one device on a link: its unit id, its learnt read plan, unreadable
points, misbehaviour counts, health, requests queue and admission. What is read next is
decided by the pure :class:`~.schedule.Schedule`; a unit that times out is backed off and
probed rarely, so the other units on the link keep their rate. A device given with its own
``host`` is the one unit of its own (implicit) TCP link: :meth:`ModbusLink.run` runs that.

Reads follow the coalesced plan from :mod:`adapters.modbus.registers`, on a drift-free schedule
per block; a read that overruns its period skips the missed ticks instead of bursting.

Requests in (:meth:`ModbusLink.read`, :meth:`ModbusLink.write`) wait in the device's queue,
which the link's task serves between its reads, on the same connection.

A wrong answer is counted as malformed (against the device whose request it failed) and
dropped, never a reading; one that leaves a TCP stream out of step closes the connection, and
the link is reconnected with backoff. A device's fault
is logged once per transition (:class:`~adapters.modbus.checks.Misbehaviour`), never as a
traceback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
import zlib
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field, replace
from struct import error as struct_error
from typing import Any

from adapters.base import Admit, DeviceHealth, NotWritable, ScanSink
from adapters.modbus.checks import Misbehaviour
from adapters.modbus.config import (
    TRANSPORTS,
    ModbusEndpoint,
    ModbusIdentity,
    ModbusLinkConfig,
    Point,
    implicit_link,
)
from adapters.modbus.identity import Identification, collect_evidence
from adapters.modbus.plan import (
    ILLEGAL_ADDRESS,
    RETRY_ON,
    SPLIT_ON,
    UNAVAILABLE_ON,
    decode_learnt,
    encode_learnt,
    learnt_from,
    map_key,
    plan_from,
    split_refused,
)
from adapters.modbus.planstore import PlanStore
from adapters.modbus.registers import ReadBlock, encode_value, plan_reads
from adapters.modbus.schedule import Schedule
from adapters.modbus.security import ROLE_REFUSED, TlsRefused
from adapters.modbus.transport import (
    ModbusTransport,
    OnRequest,
    Reply,
    Target,
    WrongAnswer,
)
from gateway.core.backoff import backoff_delay
from gateway.core.errors import DeviceUnavailable
from gateway.core.readings import BAD, GOOD, UNAVAILABLE, Scan

log = logging.getLogger(__name__)

# Exception 05/06 (acknowledge, busy): tries again after these delays, within the period.
RETRY_DELAYS = (0.02, 0.04, 0.08)

# Exception 0A/0B (gateway path unavailable, target device failed to respond): the device
# behind a TCP gateway is silent; once it answers again, its identity is checked again.
GATEWAY_NO_ANSWER = frozenset({0x0A, 0x0B})

# A security event: (kind, device id, reason, **fields), as gateway.events records it.
OnEvent = Callable[..., None]


@dataclass(slots=True)
class _Request:
    """A read of ``blocks``, or (``write``) registers to write, then those blocks read back."""

    blocks: list[ReadBlock]
    names: tuple[str, ...]
    write: tuple[Point, list[int]] | None = None
    done: asyncio.Future[Scan] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ModbusLink:
    """One device (``device_id`` at ``endpoint``, reading ``points``): a unit on a link.

    A device with its own ``host``: run :meth:`run` in a task until cancelled (its own link).
    A unit of a shared link: give it, with the others, to a :class:`ModbusBus` and run that.
    :meth:`read` and :meth:`write` from any other task."""

    def __init__(
        self,
        device_id: str,
        endpoint: ModbusEndpoint,
        points: Sequence[Point],
        sink: ScanSink,
        admit: Admit,
        health: DeviceHealth,
        *,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        phases: int = 1,
        report_every: float = 60.0,
        settle: float = 10.0,
        on_event: OnEvent | None = None,
        plans: PlanStore | None = None,
        transport: str = TRANSPORTS["tcp"],
        identity: ModbusIdentity | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.device_id = device_id
        self.identity = identity
        self._check_due = 0.0  # loop time of the next identity check on this connection
        self._suspect = False  # the device stopped answering for a while: check it again
        # A device with its own host over Modbus/TCP Security: its link's client context.
        self._tls_context = tls_context
        # The TLS check that refused the link last (recorded once until a read passes), and
        # the blocks the device refused our role (exception 01 on TLS: once each until read).
        self._tls_refused: str | None = None
        self._role_refused: set[tuple[str, int]] = set()
        self.modbus = endpoint
        self.transport_name = transport  # what the evidence says it was seen on
        self.target = Target(device_id, endpoint.unit, endpoint.label)
        self.bus: ModbusBus | None = None  # the link's task, once the unit is on one
        self.points = {p.name: p for p in points}
        self._sink = sink
        self._admit = admit
        self.health = health
        self._backoff = (backoff_min, backoff_max)
        self._phases = max(1, phases)
        self.endpoint = endpoint.label
        self.blocks = plan_reads(points, **_limits(endpoint))
        self._configured = _spans(self.blocks)  # the plan the config alone gives
        self._plans = plans
        self._plan_key = map_key(device_id, points, _limits(endpoint))
        self.unreadable: dict[str, int] = {}  # points the device never answers (name -> code)
        if plans is not None:
            learnt = decode_learnt(plans.load(self._plan_key), self.points)
            if learnt is not None:
                self.blocks = plan_from(learnt, self.points)
                self.unreadable = dict(learnt.unreadable)
                for name in self.unreadable:
                    self._report_unreadable(name, self.unreadable[name])
        # The plan each connection starts from: what was kept (or configured). What a
        # connection learns is kept only once the device has also answered a read correctly on
        # it, so a device that refuses everything for a while (booting, its own slave absent)
        # teaches nothing that outlives the connection.
        self._kept_blocks = list(self.blocks)
        self._kept_unreadable = dict(self.unreadable)
        self._good_at_connect = 0
        self._learnt_unanswered = False  # this connection split blocks before any good read
        self.misbehaviour = Misbehaviour(device_id, every=report_every, settle=settle)
        self._violation_recorded = False  # this episode's wrong-answers event is recorded
        self._on_event = on_event
        self.transport: ModbusTransport | None = None  # while connected, admitted, answering
        self._requests: asyncio.Queue[_Request] = asyncio.Queue()
        self._reads_at_connect = 0
        self._stopped = False  # told its end (stopped() runs once)

    @property
    def attempt(self) -> int:
        """Connections in a row of this device's link that delivered no reading."""
        return 0 if self.bus is None else self.bus.attempt

    # -- requests in --

    async def read(self, points: Sequence[str]) -> Scan:
        """A fresh read of ``points`` (all of them if empty), through the poll loop."""
        names = tuple(points) or tuple(self.points)
        unknown = [n for n in names if n not in self.points]
        if unknown:
            raise KeyError(f"{self.device_id} has no point {unknown[0]!r}")
        return await self._submit(_Request(self._blocks_for(names), names))

    async def write(self, point: str, value: Any) -> Scan:
        """Write ``value`` to a holding register (FC 6/16) or coil (FC 5/15) point, then read
        it back: the scan holds what the device holds now."""
        row = self.points.get(point)
        if row is None:
            raise KeyError(f"{self.device_id} has no point {point!r}")
        if not row.writable:
            raise NotWritable(self.device_id, point, f"{row.table} points are read-only")
        if (row.type == "bool") != isinstance(value, bool) and not (
            row.type == "bool" and value in (0, 1)
        ):
            want = "true or false" if row.type == "bool" else "a number"
            raise ValueError(f"{point} is a {row.type} point: write {want}, not {value!r}")
        try:
            words = encode_value(row, value)
        except (struct.error, OverflowError, TypeError) as err:
            # A value the register cannot hold: the caller's error, not the device's.
            raise ValueError(
                f"{value!r} does not fit {point} ({row.type}, scale {row.scale:g}): {err}"
            ) from err
        return await self._submit(
            _Request(self._blocks_for((point,)), (point,), write=(row, words))
        )

    def _blocks_for(self, names: Sequence[str]) -> list[ReadBlock]:
        """The reads of a request, planned as the polls learnt to read this device: points it
        never answers are left out (their values stay None, the scan BAD), and once it has
        refused a read, gaps are not bridged and no read is larger than the largest that
        worked."""
        rows = [self.points[n] for n in dict.fromkeys(names) if n not in self.unreadable]
        limits = _limits(self.modbus)
        if self.unreadable or _spans(self.blocks) != self._configured:
            limits["max_gap"] = 0
            largest = max((b.count for b in self.blocks if b.table in _WORDS), default=0)
            if largest:
                limits["max_registers"] = min(limits["max_registers"], largest)
        return plan_reads(rows, **limits)

    async def _submit(self, request: _Request) -> Scan:
        if self.transport is None:
            raise DeviceUnavailable(
                self.device_id, self.endpoint, "not connected", cause="unavailable"
            )
        self._requests.put_nowait(request)
        if self.bus is not None:
            self.bus.wake(self)  # the link's task serves it now, between reads
        return await request.done

    def _fail_requests(self, err: BaseException) -> None:
        if self.bus is not None:
            self.bus.served(self)  # nothing of this unit's is waiting any more
        while not self._requests.empty():
            request = self._requests.get_nowait()
            if not request.done.done():
                request.done.set_exception(err)

    async def _serve(self, transport: ModbusTransport, request: _Request) -> None:
        if request.done.done():  # the caller gave up
            return
        try:
            if request.write is not None:
                row, words = request.write
                table = row.table
                reply = await transport.write(self.target, table, row.address, words)
                if reply is None or reply.exception is not None:
                    # The device refused this write (an exception, or a wrong echo that left
                    # the stream in step): the request fails, the link and its polls go on.
                    if not request.done.done():
                        request.done.set_exception(
                            DeviceUnavailable(
                                self.device_id,
                                self.endpoint,
                                f"write {table}@{row.address}: {_what(reply)}",
                                cause="malformed" if reply is None else "exception",
                            )
                        )
                    return
            ts_ms = int(time.time() * 1000)
            values: dict[str, Any] = {}
            quality = BAD if any(n in self.unreadable for n in request.names) else GOOD
            for block in request.blocks:
                reply = await transport.read(self.target, block.table, block.address, block.count)
                if reply is None or reply.exception is not None:
                    quality = BAD
                    continue
                values.update(zip(block.names, block.decode(reply.values), strict=True))
        except BaseException as err:
            if not request.done.done():
                request.done.set_exception(err)
            raise
        if not request.done.done():
            request.done.set_result(
                Scan(
                    self.device_id,
                    ts_ms,
                    request.names,
                    [values.get(n) for n in request.names],
                    quality,
                )
            )

    # -- the loop: a device that gives its own host is the one unit of its own link --

    async def run(self) -> None:
        """Poll until cancelled; returns early only if the device is refused admission."""
        if self.modbus.link is not None:
            raise TypeError(
                f"{self.device_id} is unit {self.modbus.unit} of link {self.modbus.link!r}: "
                "run that link's ModbusBus"
            )
        bus = ModbusBus(
            implicit_link(self.device_id, self.modbus),
            [self],
            backoff_min=self._backoff[0],
            backoff_max=self._backoff[1],
            tls_context=self._tls_context,
        )
        await bus.run()

    # -- what the link's task calls --

    async def admit_unit(self, transport: ModbusTransport) -> bool:
        """Ask the gate to admit this unit, seen on ``transport``'s link; a refused unit is
        quarantined (False) and not polled again in this run. The one place that builds this
        device's evidence: the endpoint, the fingerprint its identity method reads (FC 43
        objects, identity registers), and what a TLS link's handshake proved (recorded with
        the admission, never pinned). Runs at each connection before any read of the unit is
        sunk, and from the link's loop (:meth:`identity_due`) before the unit's next read."""
        evidence = await collect_evidence(
            UnitSource(transport, self.target), self.device_id, self.endpoint, self.identity
        )
        evidence = replace(evidence, transport=self.transport_name)
        if transport.peer:
            evidence = replace(evidence, fingerprint={**transport.peer, **evidence.fingerprint})
        refusal = self._admit(evidence)
        if refusal is not None:
            self.health.quarantine(refusal)
            return False
        self._suspect = False
        if self.identity is not None and not self.identity.none:
            self._check_due = asyncio.get_running_loop().time() + self.identity.recheck
        return True

    def unchecked(self) -> None:
        """The unit's identity could not be read at connect: checked before its first read."""
        self._suspect = True

    def identity_due(self, now: float) -> bool:
        """Is the fingerprint to be checked before this unit's next read: its recheck period
        passed, or it comes back after failed reads (a backoff, a gateway's 0x0A/0x0B)?"""
        if self.identity is None or self.identity.none:
            return False
        return self._suspect or now >= self._check_due

    def tls_refused(self, err: TlsRefused) -> None:
        """The link's handshake was refused: a security event once per kind of refusal until
        a read passes (an expired certificate, then an impostor's, is two events)."""
        if self._tls_refused != err.check and self._on_event is not None:
            self._on_event(
                "modbus-tls-refused", self.device_id, err.detail, check=err.check,
                endpoint=self.endpoint,
            )  # fmt: skip
        self._tls_refused = err.check

    def _refused_role(self, block: ReadBlock) -> None:
        """Exception 01 on a Modbus/TCP Security link: the device's rules do not allow this
        request to the role in our certificate. A security event once per block until it
        is read again."""
        key = (block.table, block.address)
        if key in self._role_refused or self._on_event is None:
            return
        self._role_refused.add(key)
        self._on_event(
            "modbus-role-refused",
            self.device_id,
            f"the device refused our role's read of {block.table} {block.address} "
            f"(count {block.count}) with exception 0x01 (illegal function): check the role "
            "in tls.cert and the device's rules",
            endpoint=self.endpoint,
            table=block.table,
            address=block.address,
        )

    def connected(self) -> None:
        """A new connection of the link: start from the kept plan."""
        self._reads_at_connect = self._good_at_connect = self.health.reads_ok
        self._restore_kept()

    @property
    def read_on_connection(self) -> bool:
        """The device delivered a reading on the current connection."""
        return self.health.reads_ok > self._reads_at_connect

    def stopped(self, err: DeviceUnavailable) -> None:
        """The link stopped (its task ends) or the unit left it (quarantined at a recheck):
        requests fail, an open episode is told, once."""
        self.transport = None
        if self._stopped:
            return
        self._stopped = True
        self._fail_requests(err)
        line = self.misbehaviour.at_stop(time.monotonic())
        if line is not None:
            log.warning("%s", line)

    def unavailable(self, err: DeviceUnavailable) -> None:
        """The device (or its link) cannot be read: down, its waiting requests fail."""
        self.transport = None
        self.health.down(err.reason)
        self._fail_requests(err)

    def out_of_step(self, err: WrongAnswer) -> None:
        """The link's stream went out of step (counted and told as it arrived)."""
        self.transport = None
        self._fail_requests(err)

    def next_request(self) -> _Request | None:
        return None if self._requests.empty() else self._requests.get_nowait()

    @property
    def has_requests(self) -> bool:
        return not self._requests.empty()

    def probe(self) -> None:
        """The unit is probed after a backoff: from the kept plan again, and (it did not
        answer for a while: whatever answers now may be another device) its identity."""
        self._good_at_connect = self.health.reads_ok
        self._restore_kept()
        self._suspect = True

    def start(self, schedule: Schedule, key: Hashable, now: float) -> None:
        """Put this unit's blocks on ``schedule``. A fleet started together reads, seals and
        publishes in one burst per period, and the last of a large burst waits for all the
        others: each device starts in one of ``phases`` slots of its shortest period (at most
        1 s, so a slow poll is not put off)."""
        spread = min(1.0, min((b.period for b in self.blocks), default=1.0))
        phases = self._phases
        phase = zlib.crc32(self.device_id.encode()) % phases / phases * spread
        schedule.add(key, len(self.blocks), now + phase)

    def _wrong(self, cause: str) -> None:
        """The transport dropped a response (or bytes nobody asked for): count it, tell it."""
        health = self.health
        health.malformed += 1
        health.malformed_causes[cause] = health.malformed_causes.get(cause, 0) + 1
        self._bad(cause, violation=True)

    def _bad(self, cause: str, *, violation: bool = False) -> None:
        """One wrong answer: told when an episode starts, then only in the periodic counts.

        A protocol violation (an answer that does not match its request) is also a security
        event, once per episode. A Modbus exception reply (illegal address, busy) is the
        device speaking the protocol correctly about a map or a load problem: logged and
        counted, not a security event."""
        line = self.misbehaviour.bad(cause, time.monotonic())
        if line is not None:
            log.warning("%s", line)
        if violation and not self._violation_recorded and self._on_event is not None:
            self._violation_recorded = True
            self._on_event("wrong-answers", self.device_id, cause, endpoint=self.endpoint)

    def _good(self) -> None:
        counts = dict(self.misbehaviour.counts)
        line = self.misbehaviour.good(time.monotonic())
        if line is not None:
            log.info("%s", line)
            recorded, self._violation_recorded = self._violation_recorded, False
            if recorded and self._on_event is not None:
                self._on_event(
                    "wrong-answers-ended",
                    self.device_id,
                    "answering correctly again",
                    endpoint=self.endpoint,
                    counts=counts,
                )

    async def _retry(
        self, transport: ModbusTransport, block: ReadBlock, reply: Reply, deadline: float
    ) -> Reply | None:
        """Exception 05/06 (acknowledge, busy): the same read again after a short backoff,
        never past the block's next due time."""
        loop = asyncio.get_running_loop()
        for delay in RETRY_DELAYS:
            if loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay)
            again = await transport.read(self.target, block.table, block.address, block.count)
            if again is None or again.exception not in RETRY_ON:
                return again
            reply = again
        return reply

    def _split(self, index: int, code: int) -> int | None:
        """Replace the refused block at ``index`` by its halves (or drop its one unreadable
        point), keep what was learnt; returns how many blocks took its place (None: the plan
        stays, the block is read again at its next period)."""
        split = split_refused(self.blocks[index], code, self.points, max_gap=self.modbus.max_gap)
        answered = self.health.reads_ok > self._good_at_connect  # the device answers: a map
        if not answered:
            self._learnt_unanswered = True
        if split.unreadable is not None:
            if code == ILLEGAL_ADDRESS:
                self.unreadable[split.unreadable] = code
                self._report_unreadable(split.unreadable, code)
            else:
                # 03 on one point's own read: not a limit to learn; keep reading it.
                return None
        self.blocks[index : index + 1] = split.blocks
        if answered:
            self._kept_blocks, self._kept_unreadable = list(self.blocks), dict(self.unreadable)
            if self._plans is not None:
                learnt = learnt_from(self.blocks, self.unreadable)
                self._plans.save(self._plan_key, encode_learnt(learnt))
        return len(split.blocks)

    def _restore_kept(self) -> None:
        """Back to the plan that was kept; problems told for points it reads are withdrawn."""
        for name, code in self.unreadable.items():
            if name not in self._kept_unreadable:
                problem = self._problem(name, code)
                if problem in self.health.config_problems:
                    self.health.config_problems.remove(problem)
        self.blocks = list(self._kept_blocks)
        self.unreadable = dict(self._kept_unreadable)
        self._learnt_unanswered = False

    def _problem(self, name: str, code: int) -> str:
        point = self.points[name]
        return (
            f"point {name!r} ({point.table} {point.address}) cannot be read: "
            f"Modbus exception 0x{code:02X}; check the register map"
        )

    def _report_unreadable(self, name: str, code: int) -> None:
        problem = self._problem(name, code)
        log.warning("%s: %s", self.device_id, problem)
        if problem not in self.health.config_problems:
            self.health.config_problems.append(problem)

    async def poll_block(
        self, transport: ModbusTransport, schedule: Schedule, key: Hashable, index: int
    ) -> None:
        """Read block ``index`` (due now on ``schedule``), hand on what it holds, and move the
        schedule on. Raises :class:`DeviceUnavailable` when the device does not answer (or
        refuses every point before answering once), :class:`WrongAnswer` when the stream is out
        of step."""
        loop = asyncio.get_running_loop()
        device_id = self.device_id
        health = self.health
        block = self.blocks[index]
        due = schedule.due(key, index)
        ts_ms = int(time.time() * 1000)
        try:
            reply = await transport.read(self.target, block.table, block.address, block.count)
            if reply is not None and reply.exception in RETRY_ON:
                reply = await self._retry(transport, block, reply, due + block.period)
        except WrongAnswer:
            raise
        except DeviceUnavailable:
            health.reads_failed += 1
            raise
        now = loop.time()
        if reply is not None and schedule.answered(key, now):
            due = schedule.due(key, index)
        if schedule.advance(key, index, block.period, now):
            health.overruns += 1
        if reply is None:
            return
        if reply.exception is not None:
            health.reads_failed += 1
            if reply.exception in GATEWAY_NO_ANSWER:
                self._suspect = True
            what = _what(reply)
            health.last_error = f"{what} on {block.table}@{block.address}"
            self._bad(what)
            if reply.exception == ROLE_REFUSED and getattr(transport.link, "tls", None):
                self._refused_role(block)
            if reply.exception in SPLIT_ON:
                replaced = self._split(index, reply.exception)
                if replaced is not None:
                    # Read again at once as the halves; nothing of this period is lost.
                    schedule.replace(key, index, replaced, now)
                    if not self.blocks and health.reads_ok == self._good_at_connect:
                        # Not one correct answer on this connection: the device, not its map.
                        # Backed off (or reconnected), then the kept plan is probed again.
                        raise DeviceUnavailable(
                            device_id,
                            self.endpoint,
                            "every point answered exception 0x02 (illegal address)",
                            cause="exception",
                        )
                    return
            if reply.exception in UNAVAILABLE_ON:
                self._sink(_unavailable(device_id, ts_ms, block))
            return
        try:
            values = block.decode(reply.values)
        except (ValueError, struct_error, TypeError) as err:
            log.debug("%s: undecodable values: %s", device_id, err)
            self._wrong("undecodable values")
            return
        health.read_ok()
        # Only an answer ends a TLS refusal: on TLS 1.3 a device refuses our certificate
        # after the handshake has passed on our side.
        self._tls_refused = None
        if self._role_refused:
            self._role_refused.discard((block.table, block.address))
        if self.misbehaviour.since is not None:
            self._good()
        self._sink(Scan(device_id, ts_ms, block.names, values))
        if self._learnt_unanswered:
            # The device answers now; what it refused before it had answered once on this
            # connection (booting, its own slave absent) may not be its map: probe the
            # kept plan again, and learn only from refusals that follow an answer.
            log.info("%s: answering now; probing again what it refused before", device_id)
            self._restore_kept()
            schedule.reset(key, len(self.blocks), now)


class ModbusBus:
    """One link's task: its connection, shared by the units (devices) on it, with one request
    on the wire at a time. Run :meth:`run` in a task until cancelled.

    A connection that fails (refused, lost, out of step) takes every unit down, and the link
    reconnects with backoff. A unit that does not answer is backed off on the schedule while
    others on the link answer; when none does, the link reconnects. Each unit is admitted by
    the gate at each connection, before any of its reads.
    """

    def __init__(
        self,
        link: ModbusLinkConfig,
        units: Sequence[ModbusLink],
        *,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.link = link
        self.name = link.name
        self._tls_context = tls_context  # a tcp link with tls: Modbus/TCP Security
        self.units = {u.device_id: u for u in units}
        for unit in units:
            unit.bus = self
        self._backoff = (backoff_min, backoff_max)
        self._waiter: asyncio.Future[None] | None = None  # the task's wait between reads
        self._last: ModbusLink | None = None  # whose request went out last
        self._turn = 0  # round robin over the units' requests
        # Units that may have requests waiting (a cheap test before every read).
        self._pending: set[str] = set()
        self.attempt = 0  # connections in a row that delivered no reading: the backoff step
        self.schedule: Schedule | None = None  # the current connection's
        # Each request's seconds on the wire (the transport's on_request): set by the gateway
        # when metrics are on, read at each connection; None costs one test per request.
        self.observe: OnRequest | None = None

    def served(self, unit: ModbusLink) -> None:
        """``unit`` has no request waiting (its queue was failed)."""
        self._pending.discard(unit.device_id)

    def wake(self, unit: ModbusLink) -> None:
        """``unit`` has a request: serve it now, between reads."""
        self._pending.add(unit.device_id)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def run(self) -> None:
        """Poll until cancelled; returns early only if every unit is refused admission."""
        try:
            await self._run()
        finally:
            for unit in self.units.values():
                unit.stopped(
                    DeviceUnavailable(unit.device_id, unit.endpoint, "link stopped", cause="lost")
                )

    async def _run(self) -> None:
        self.attempt = 0
        active = list(self.units.values())  # the units not refused admission
        while active:
            for unit in active:
                unit.connected()
            try:
                async with ModbusTransport(
                    self.link, self._wrong, self._tls_context, self.observe
                ) as transport:
                    active, silent = await self._admit(transport, active)
                    if not active:
                        return
                    await self._poll(transport, active, silent)
            except WrongAnswer as err:
                # Counted and logged as it arrived; the connection is out of step.
                for unit in active:
                    unit.out_of_step(err)
            except TlsRefused as err:
                for unit in active:
                    unit.unavailable(_for(unit, err))
                    unit.tls_refused(err)
            except DeviceUnavailable as err:
                for unit in active:
                    unit.unavailable(_for(unit, err))
            except Exception as err:
                # A bug must cost this link a reconnect, never the other links their data.
                log.exception("%s: poller failed", self.name)
                for unit in active:
                    unit.unavailable(
                        DeviceUnavailable(
                            unit.device_id,
                            unit.endpoint,
                            f"internal error: {err!r}",
                            cause="internal",
                        )
                    )
            finally:
                self.schedule = None
            # The backoff grows until a connection delivers a reading, so that a link that
            # breaks every connection it is given is not reconnected at the shortest delay.
            if any(u.read_on_connection for u in active):
                self.attempt = 0
            self.attempt += 1
            await asyncio.sleep(backoff_delay(self.attempt, *self._backoff))

    def _wrong(self, cause: str, target: Target | None) -> None:
        """The transport dropped an answer: counted against the unit it was for (bytes no
        request waited for: against the unit asked last)."""
        unit = self.units.get(target.device_id) if target is not None else self._last
        if unit is None:
            unit = next(iter(self.units.values()))
        unit._wrong(cause)

    async def _admit(
        self, transport: ModbusTransport, units: list[ModbusLink]
    ) -> tuple[list[ModbusLink], set[str]]:
        """Each unit through the gate on a new connection: (those not refused, those of them
        that did not answer their identity read). A unit that does not answer costs the others
        its timeout once, as in the polls: it stays on the link, backed off, and its identity
        is checked (and it is admitted) when a probe finds it answering. When none answers,
        the link itself is in question: the error is raised (reconnect)."""
        kept: list[ModbusLink] = []
        silent: set[str] = set()
        failed: DeviceUnavailable | None = None
        for unit in units:
            try:
                if await unit.admit_unit(transport):
                    kept.append(unit)
            except DeviceUnavailable as err:
                if isinstance(err, WrongAnswer) or err.cause != "timeout":
                    raise
                failed = err
                unit.unavailable(_for(unit, err))
                unit.unchecked()
                kept.append(unit)
                silent.add(unit.device_id)
        if failed is not None and len(silent) == len(kept):
            raise failed
        return kept, silent

    async def _poll(
        self, transport: ModbusTransport, units: list[ModbusLink], silent: Collection[str] = ()
    ) -> None:
        loop = asyncio.get_running_loop()
        schedule = self.schedule = Schedule(first=self._backoff[0], cap=self._backoff[1])
        now = loop.time()
        for unit in units:
            unit.start(schedule, unit.device_id, now)
            if unit.device_id in silent:
                schedule.failed(unit.device_id, now)  # backed off until a probe finds it
            else:
                unit.transport = transport
        while True:
            due = schedule.next(loop.time())
            wait = 3600.0 if due is None else due.at - loop.time()
            served = await self._next_request(wait, units)
            if served is not None:
                unit, request = served
                self._last = unit
                try:
                    try:
                        admitted = not unit.identity_due(loop.time()) or await self._recheck(
                            transport, unit, units, schedule
                        )
                    except BaseException as err:  # the check failed: so does this request
                        if not request.done.done():
                            request.done.set_exception(err)
                        raise
                    if not admitted:
                        if not request.done.done():  # quarantined: this request fails too
                            request.done.set_exception(
                                DeviceUnavailable(
                                    unit.device_id, unit.endpoint, "refused", cause="refused"
                                )
                            )
                        if not units:
                            return
                        continue
                    await unit._serve(transport, request)
                except DeviceUnavailable as err:
                    if isinstance(err, WrongAnswer) or err.cause != "timeout":
                        raise
                    self._unit_failed(unit, err, schedule)
                continue
            if due is None:
                continue
            unit = self.units[str(due.unit)]
            index = due.index
            if due.probe:
                # Backed off until now: probe the kept plan's first block.
                unit.probe()
                schedule.reset(due.unit, len(unit.blocks), due.at)
                if not unit.blocks:
                    schedule.answered(due.unit, loop.time())
                    continue
                index = 0
            self._last = unit
            try:
                if unit.identity_due(loop.time()) and not await self._recheck(
                    transport, unit, units, schedule
                ):
                    if not units:
                        return  # every unit of the link is quarantined
                    continue
                await unit.poll_block(transport, schedule, due.unit, index)
            except DeviceUnavailable as err:
                if isinstance(err, WrongAnswer) or err.cause not in ("timeout", "exception"):
                    raise
                self._unit_failed(unit, err, schedule)
                continue
            if due.probe and schedule.backed_off(due.unit):
                # The probe's answer was wrong (a CRC error, a mismatch that keeps the line in
                # step): still not answering for itself; probed again later, not at once.
                schedule.failed(due.unit, loop.time())
                continue
            if unit.transport is None and not schedule.backed_off(due.unit):
                unit.transport = transport  # it answers again: requests are served

    async def _recheck(
        self,
        transport: ModbusTransport,
        unit: ModbusLink,
        units: list[ModbusLink],
        schedule: Schedule,
    ) -> bool:
        """Check ``unit``'s identity again before its next read; False: the gate refused it
        (quarantined, recorded): it leaves the link's units and schedule for this run, and
        its waiting requests fail."""
        if await unit.admit_unit(transport):
            return True
        schedule.remove(unit.device_id)
        units.remove(unit)
        unit.stopped(
            DeviceUnavailable(
                unit.device_id,
                unit.endpoint,
                unit.health.last_error or "refused by the gate",
                cause="refused",
            )
        )
        return False

    def _unit_failed(self, unit: ModbusLink, err: DeviceUnavailable, schedule: Schedule) -> None:
        """``unit`` did not answer: backed off while another unit on the link is polled at its
        rate; when none is, the link itself is in question (``err`` is raised: reconnect)."""
        key = unit.device_id
        if not [k for k in schedule.polled() if k != key]:
            raise err
        schedule.failed(key, asyncio.get_running_loop().time())
        unit.unavailable(err)

    async def _next_request(
        self, wait: float, units: list[ModbusLink]
    ) -> tuple[ModbusLink, _Request] | None:
        """The next request of any unit (in turn), if one comes within ``wait`` seconds.

        The wait costs what ``asyncio.sleep`` costs (a future and a timer), since it runs
        before every read. A timeout around ``Queue.get`` (a cancellation per poll) was
        measured on profile (a): the gateway's CPU per point against the gateway before issue 9
        went from 1.19 to 1.12 times with this wait (benchmarks/e2e.py, medians of 3)."""
        if wait > 0 and not self._pending:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(wait, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if not self._pending:
            return None
        count = len(units)
        for step in range(count):
            unit = units[(self._turn + step) % count]
            request = unit.next_request()
            if request is not None:
                self._turn = (self._turn + step + 1) % count
                if not unit.has_requests:
                    self._pending.discard(unit.device_id)
                return unit, request
        self._pending.clear()  # none of them has one (a stopped unit's were failed)
        return None


class UnitSource:
    """One unit's side of a shared transport, as identity collection reads it (the link, and
    ``fieldgate enroll``)."""

    def __init__(self, transport: ModbusTransport, target: Target) -> None:
        self._transport = transport
        self._target = target

    async def read(self, table: str, address: int, count: int) -> Reply | None:
        return await self._transport.read(self._target, table, address, count)

    async def read_device_information(
        self, read_code: int, object_id: int = 0
    ) -> Identification | None:
        return await self._transport.read_device_information(self._target, read_code, object_id)


def _for(unit: ModbusLink, err: DeviceUnavailable) -> DeviceUnavailable:
    """A link's failure as the unit's own (its id and endpoint in the error its callers see)."""
    if err.device_id == unit.device_id:
        return err
    return DeviceUnavailable(unit.device_id, unit.endpoint, err.reason, cause=err.cause)


_WORDS = frozenset({"holding", "input"})  # tables of registers (coils and inputs: bits)


def _spans(blocks: Sequence[ReadBlock]) -> list[tuple[str, int, int]]:
    return [(b.table, b.address, b.count) for b in blocks]


def _unavailable(device_id: str, ts_ms: int, block: ReadBlock) -> Scan:
    """A block that could not be read this period: its points, no values."""
    return Scan(device_id, ts_ms, block.names, [None] * len(block.names), UNAVAILABLE)


def _limits(endpoint: ModbusEndpoint) -> dict[str, int]:
    return {
        "max_gap": endpoint.max_gap,
        "max_registers": endpoint.max_registers,
        "max_bits": endpoint.max_bits,
    }


def _what(reply: Reply | None) -> str:
    if reply is None:
        return "wrong answer"
    code = reply.exception
    return f"Modbus exception 0x{code:02X}" if code else "exception"


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
