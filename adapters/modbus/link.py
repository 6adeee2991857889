"""One Modbus TCP device's link: connect, ask the gate, poll on schedule, serve requests.

Each device has its own task and its own connection (:class:`~.transport.ModbusTransport`,
held by the link while it is open), so a dead or slow device only ever delays itself. Reads
follow the coalesced plan from :mod:`adapters.modbus.registers`, on a drift-free schedule per
block; a read that overruns its period skips the missed ticks instead of bursting.

Requests in (:meth:`ModbusLink.read`, :meth:`ModbusLink.write`) wait in a queue that the poll
loop serves between its reads, on the same connection: one request is on the wire at a time,
as a serial bus will need.

A wrong answer is counted as malformed and dropped, never a reading; one that leaves the stream
out of step closes the connection, and the device is reconnected with backoff. A device's fault
is logged once per transition (:class:`~adapters.modbus.checks.Misbehaviour`), never as a
traceback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from struct import error as struct_error
from typing import Any

from adapters.base import Admit, DeviceHealth, NotWritable, ScanSink
from adapters.modbus.checks import Misbehaviour
from adapters.modbus.config import ModbusEndpoint, ModbusIdentity, Point
from adapters.modbus.identity import collect_evidence
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
from adapters.modbus.security import ROLE_REFUSED, TlsRefused
from adapters.modbus.transport import ModbusTransport, Reply, WrongAnswer
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
    """One device (``device_id`` at ``endpoint``, reading ``points``). Run :meth:`run` in a
    task until cancelled; :meth:`read` and :meth:`write` from any other task."""

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
        tls_context: ssl.SSLContext | None = None,
        identity: ModbusIdentity | None = None,
    ) -> None:
        self.device_id = device_id
        self.identity = identity
        self._check_due = 0.0  # loop time of the next identity check on this connection
        self._suspect = False  # the device stopped answering for a while: check it again
        self.modbus = endpoint
        self.points = {p.name: p for p in points}
        self._sink = sink
        self._admit = admit
        self.health = health
        self._backoff = (backoff_min, backoff_max)
        self._phases = max(1, phases)
        self.endpoint = endpoint.label
        self.blocks = plan_reads(points, **_limits(endpoint))
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
        # Modbus/TCP Security: the client context (endpoint.tls), the check that refused the
        # device last (recorded once until a handshake passes), and the blocks the device
        # refused our role (exception 01 on a TLS link: recorded once each until read).
        self._tls_context = tls_context
        self._tls_refused: str | None = None
        self._role_refused: set[tuple[str, int]] = set()
        self.transport: ModbusTransport | None = None  # while connected and admitted
        self._requests: asyncio.Queue[_Request] = asyncio.Queue()
        self._waiter: asyncio.Future[None] | None = None  # the poll loop's wait between reads
        self.attempt = 0  # connections in a row that delivered no reading: the backoff step

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
        words = encode_value(row, value)
        return await self._submit(
            _Request(self._blocks_for((point,)), (point,), write=(row, words))
        )

    def _blocks_for(self, names: Sequence[str]) -> list[ReadBlock]:
        rows = [self.points[n] for n in dict.fromkeys(names)]
        return plan_reads(rows, **_limits(self.modbus))

    async def _submit(self, request: _Request) -> Scan:
        if self.transport is None:
            raise DeviceUnavailable(
                self.device_id, self.endpoint, "not connected", cause="unavailable"
            )
        self._requests.put_nowait(request)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)  # the poll loop serves it now, between reads
        return await request.done

    def _fail_requests(self, err: BaseException) -> None:
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
                reply = await transport.write(table, row.address, words)
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
            quality = GOOD
            for block in request.blocks:
                reply = await transport.read(block.table, block.address, block.count)
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

    # -- the loop --

    async def run(self) -> None:
        """Poll until cancelled; returns early only if the device is refused admission."""
        try:
            await self._run()
        finally:
            self._fail_requests(
                DeviceUnavailable(self.device_id, self.endpoint, "link stopped", cause="lost")
            )
            line = self.misbehaviour.at_stop(time.monotonic())
            if line is not None:
                log.warning("%s", line)

    async def _run(self) -> None:
        self.attempt = 0
        while True:
            reads_before = self._good_at_connect = self.health.reads_ok
            self._restore_kept()
            try:
                async with ModbusTransport(
                    self.device_id, self.modbus, self._wrong, self._tls_context
                ) as transport:
                    if not await self._verify(transport):
                        return
                    self.transport = transport
                    try:
                        await self._poll(transport)
                    finally:
                        self.transport = None
            except Quarantined as err:
                self._fail_requests(err)
                return
            except WrongAnswer as err:
                # Counted and logged as it arrived; the connection is out of step.
                self._fail_requests(err)
            except TlsRefused as err:
                self.health.down(err.reason)
                self._fail_requests(err)
                if self._tls_refused is None and self._on_event is not None:
                    self._on_event(
                        "modbus-tls-refused",
                        self.device_id,
                        err.detail,
                        check=err.check,
                        endpoint=self.endpoint,
                    )
                self._tls_refused = err.check
            except DeviceUnavailable as err:
                self.health.down(err.reason)
                self._fail_requests(err)
            except Exception as err:
                # A bug must cost this device a reconnect, never the other devices their data.
                log.exception("%s: poller failed", self.device_id)
                self.health.down(f"internal error: {err!r}")
                self._fail_requests(
                    DeviceUnavailable(
                        self.device_id, self.endpoint, f"internal error: {err!r}", cause="internal"
                    )
                )
            # The backoff grows until a connection delivers a reading, so that a device that
            # breaks every connection it is given is not reconnected at the shortest delay.
            if self.health.reads_ok > reads_before:
                self.attempt = 0
            self.attempt += 1
            await asyncio.sleep(backoff_delay(self.attempt, *self._backoff))

    # -- identity: checked at connect, on coming back, every identity.recheck seconds --

    async def _verify(self, transport: ModbusTransport) -> bool:
        """Collect this connection's evidence and ask the gate; False: refused (quarantined,
        the gate recorded why). Runs before any read of the connection is sunk, and from the
        poll loop (:meth:`_identity_due`) before the next read is taken."""
        evidence = await collect_evidence(transport, self.device_id, self.endpoint, self.identity)
        if transport.peer:  # what a TLS device proved: recorded with the admission, not pinned
            evidence = replace(evidence, fingerprint={**transport.peer, **evidence.fingerprint})
        refusal = self._admit(evidence)
        if refusal is not None:
            self.health.quarantine(refusal)
            return False
        self._suspect = False
        if self.identity is not None and not self.identity.none:
            self._check_due = asyncio.get_running_loop().time() + self.identity.recheck
        return True

    async def _recheck(self, transport: ModbusTransport, request: _Request | None) -> None:
        """The poll loop's check: raises :class:`Quarantined` (failing ``request``, taken from
        the queue but not served) when the gate refuses the device now; a failed check fails
        ``request`` too, as :meth:`_serve` would."""
        try:
            if await self._verify(transport):
                return
            raise Quarantined(
                self.device_id, self.endpoint, self.health.last_error or "refused", cause="refused"
            )
        except BaseException as err:
            if request is not None and not request.done.done():
                request.done.set_exception(err)
            raise

    def _identity_due(self, now: float) -> bool:
        """Is the fingerprint to be checked before the next read: its recheck period passed, or
        the device comes back after failed reads (:meth:`_suspect_identity`)?"""
        if self.identity is None or self.identity.none:
            return False
        return self._suspect or now >= self._check_due

    def _suspect_identity(self) -> None:
        """The device did not answer for itself (a gateway's 0x0A/0x0B: its serial device is
        silent): whatever answers next may be another device."""
        self._suspect = True

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

    async def _next_request(self, wait: float) -> _Request | None:
        """The next request, if one comes within ``wait`` seconds.

        The wait costs what ``asyncio.sleep`` costs (a future and a timer), since it runs
        before every read. A timeout around ``Queue.get`` (a cancellation per poll) was
        measured on profile (a): the gateway's CPU per point against the gateway before issue 9
        went from 1.19 to 1.12 times with this wait (benchmarks/e2e.py, medians of 3)."""
        if self._requests.empty() and wait > 0:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(wait, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return None if self._requests.empty() else self._requests.get_nowait()

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
            again = await transport.read(block.table, block.address, block.count)
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

    async def _poll(self, transport: ModbusTransport) -> None:
        loop = asyncio.get_running_loop()
        device_id = self.device_id
        misbehaviour = self.misbehaviour
        # A fleet started together reads, seals and publishes in one burst per period, and the
        # last of a large burst waits for all the others. Each device starts in one of
        # ``phases`` slots of its shortest period (at most 1 s, so a slow poll is not put off).
        spread = min(1.0, min((b.period for b in self.blocks), default=1.0))
        phases = self._phases
        phase = zlib.crc32(device_id.encode()) % phases / phases * spread
        start = loop.time() + phase
        due = [start] * len(self.blocks)
        sink = self._sink
        health = self.health
        while True:
            if not due:  # every point is unreadable
                if health.reads_ok == self._good_at_connect:
                    # Not one correct answer on this connection: the device, not its map.
                    # Reconnect (with backoff), and probe the kept plan again.
                    raise DeviceUnavailable(
                        device_id,
                        self.endpoint,
                        "every point answered exception 0x02 (illegal address)",
                        cause="exception",
                    )
                request = await self._next_request(3600.0)
                if self._identity_due(loop.time()):
                    await self._recheck(transport, request)
                if request is not None:
                    await self._serve(transport, request)
                continue
            index = min(range(len(due)), key=due.__getitem__)
            block = self.blocks[index]
            request = await self._next_request(due[index] - loop.time())
            if self._identity_due(loop.time()):
                await self._recheck(transport, request)
            if request is not None:
                await self._serve(transport, request)
                continue
            ts_ms = int(time.time() * 1000)
            try:
                reply = await transport.read(block.table, block.address, block.count)
                if reply is not None and reply.exception in RETRY_ON:
                    reply = await self._retry(transport, block, reply, due[index] + block.period)
            except WrongAnswer:
                raise
            except DeviceUnavailable:
                health.reads_failed += 1
                raise
            next_due = due[index] + block.period
            now = loop.time()
            if next_due < now:
                health.overruns += 1
                next_due = now + block.period - (now - due[index]) % block.period
            due[index] = next_due
            if reply is None:
                continue
            if reply.exception is not None:
                health.reads_failed += 1
                if reply.exception in GATEWAY_NO_ANSWER:
                    self._suspect_identity()
                what = _what(reply)
                health.last_error = f"{what} on {block.table}@{block.address}"
                self._bad(what)
                if reply.exception == ROLE_REFUSED and self.modbus.tls is not None:
                    self._refused_role(block)
                if reply.exception in SPLIT_ON:
                    replaced = self._split(index, reply.exception)
                    if replaced is not None:
                        # Read again at once as the halves; nothing of this period is lost.
                        due[index : index + 1] = [now] * replaced
                        continue
                if reply.exception in UNAVAILABLE_ON:
                    sink(_unavailable(device_id, ts_ms, block))
                continue
            try:
                values = block.decode(reply.values)
            except (ValueError, struct_error, TypeError) as err:
                log.debug("%s: undecodable values: %s", device_id, err)
                self._wrong("undecodable values")
                continue
            health.reads_ok += 1
            health.up()
            # Only an answer ends a TLS refusal: on TLS 1.3 a device refuses our certificate
            # after the handshake has passed on our side.
            self._tls_refused = None
            if self._role_refused:
                self._role_refused.discard((block.table, block.address))
            if misbehaviour.since is not None:
                self._good()
            sink(Scan(device_id, ts_ms, block.names, values))
            if self._learnt_unanswered:
                # The device answers now; what it refused before it had answered once on this
                # connection (booting, its own slave absent) may not be its map: probe the
                # kept plan again, and learn only from refusals that follow an answer.
                log.info("%s: answering now; probing again what it refused before", device_id)
                self._restore_kept()
                due = [now] * len(self.blocks)

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


class Quarantined(DeviceUnavailable):
    """The gate refused the device on a recheck: polling ends for this run."""


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
