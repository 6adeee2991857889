"""The control room's shell: a decoded command is weighed by the policy, carried out on the
device's link, answered, and recorded as a security event.

One :class:`Control` per gateway. A session hands it what arrived on its device's connection
(:meth:`method`, :meth:`c2d`, :meth:`desired`); the work runs on tasks the control owns, not the
session's, so a connection that drops mid-write does not cut the write short (its answer is
lost, as IoT Hub times the call out; a C2D message is redelivered and found done).

Writes and reads go through the link's own request queue, served by the task that polls the
device between its reads: a serial bus keeps one request on the wire, and telemetry keeps its
schedule.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.base import DeviceLink, NotWritable
from gateway.control.commands import Answer, Refused, decode_c2d, decode_desired, decode_method
from gateway.control.commands import error as error_answer
from gateway.core import codec, policy
from gateway.core.errors import DeviceUnavailable
from gateway.core.policy import Command, Decision, DevicePolicy, DeviceState, Switches

log = logging.getLogger("fieldgate.control")

EventSink = Callable[..., None]
# The device's status as the ``status`` method answers it (health, identity, store depth).
StatusOf = Callable[[str], dict[str, Any]]
# The device's section of its twin's reported properties (what changes only at transitions).
SectionOf = Callable[[str], dict[str, Any]]
# Registers a callback for changes of that section.
Watch = Callable[[str, Callable[[], None]], None]

C2D_FILE = "c2d-messages.jsonl"
C2D_KEEP = 4096  # message ids remembered (IoT Hub holds at most 50 pending per device)


@dataclass
class _Device:
    policy: DevicePolicy
    link: DeviceLink | None = None
    points: frozenset[str] = frozenset()
    # Monotonic times of the writes and reads tried in the last RATE_WINDOW.
    writes: deque[float] = field(default_factory=deque)
    reads: deque[float] = field(default_factory=deque)
    # Twin points carried out in this run: name -> (value, desired $version).
    applied: dict[str, tuple[Any, int]] = field(default_factory=dict)
    # The last outcome of each desired point, as reported (kept across connections).
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Desired points that could not be carried out because the device was not up: tried
    # again when it is.
    waiting: dict[str, Command] = field(default_factory=dict)
    changed: list[Callable[[], None]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Whether the health watch is set: a link restarted by a reload is attached again.
    watched: bool = False


class C2dLedger:
    """Which C2D message ids were taken: a line when one starts, a line when it ends, each
    written through to disk before the write (and before the PUBACK) it guards.

    A redelivered id that ended is acknowledged and not carried out again. One that started and
    never ended (the gateway stopped in between) is not carried out again either: a command that
    drives equipment is better missed, and said so, than done twice.
    """

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = state_dir / C2D_FILE
        self._seen: dict[tuple[str, str], str] = {}
        data = self.path.read_bytes() if self.path.exists() else b""
        lines = data.splitlines()
        for line in lines:
            try:
                row = codec.loads(line)
                self._seen[(row["device"], row["mid"])] = row["state"]
            except (codec.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a crash
        if len(lines) > 2 * C2D_KEEP:
            self._compact()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if data and not data.endswith(b"\n") and len(lines) <= 2 * C2D_KEEP:
            os.write(self._fd, b"\n")  # end the cut line, so the next one stands alone

    def _compact(self) -> None:
        keep = list(self._seen.items())[-C2D_KEEP:]
        self._seen = dict(keep)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(
            b"".join(codec.dumps({"device": d, "mid": m, "state": s}) + b"\n" for (d, m), s in keep)
        )
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable
        finally:
            os.close(fd)

    def state(self, device_id: str, mid: str) -> str | None:
        return self._seen.get((device_id, mid))

    def mark(self, device_id: str, mid: str, state: str) -> None:
        # Two small fsyncs per message on the loop: C2D is throttled by IoT Hub to a few
        # messages per second per hub unit, so this is not a hot path.
        self._seen[(device_id, mid)] = state
        os.write(self._fd, codec.dumps({"device": device_id, "mid": mid, "state": state}) + b"\n")
        os.fsync(self._fd)
        if len(self._seen) > 2 * C2D_KEEP:
            os.close(self._fd)
            self._compact()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Control:
    def __init__(
        self,
        switches: Switches,
        policies: Mapping[str, DevicePolicy],
        *,
        record: EventSink,
        status_of: StatusOf,
        section_of: SectionOf,
        watch: Watch,
        state_dir: Path,
        timeout: float = 10.0,
    ) -> None:
        self._section_of = section_of
        self._watch = watch
        self.switches = switches
        self._devices = {d: _Device(p) for d, p in policies.items()}
        self._record = record
        # (channel, outcome) -> commands this run, as their command-* events say (the metrics
        # read it at scrape time): a dict entry per pair, a handful in all.
        self.counts: dict[tuple[str, str], int] = {}
        self._status_of = status_of
        self._timeout = timeout
        self._ledger = C2dLedger(state_dir)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._c2d_running: dict[tuple[str, str], asyncio.Future[Any]] = {}

    def attach(self, device_id: str, link: DeviceLink, points: frozenset[str]) -> None:
        """The link that carries out ``device_id``'s commands, and the points its table names
        (set when the links are made)."""
        device = self._devices[device_id]
        device.link, device.points = link, points
        if not device.watched:
            device.watched = True
            self._watch(device_id, lambda: self._health_changed(device_id))

    def add_device(self, device_id: str, device_policy: DevicePolicy) -> None:
        """A reload added or changed a device: it starts afresh (no twin points applied, no
        outcomes), like a device at a start."""
        self._devices[device_id] = _Device(device_policy)

    def remove_device(self, device_id: str) -> None:
        """A reload removed a device: its commands are no longer carried out (its session
        ends; work already started on its link finishes or fails on its own)."""
        self._devices.pop(device_id, None)

    def _health_changed(self, device_id: str) -> None:
        device = self._devices.get(device_id)  # None: a reload removed it
        if (
            device is not None
            and device.waiting
            and device.link is not None
            and device.link.health.state == "up"
        ):
            self._spawn(self._retry_waiting(device_id), f"twin-retry[{device_id}]")

    def close(self) -> None:
        for task in self._tasks:
            task.cancel("stop: the gateway is stopping")
        self._ledger.close()

    def _spawn(self, coro: Any, name: str) -> asyncio.Future[Any]:
        # Owned here, not by the session that asked: see the module's docstring.
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return asyncio.shield(task)

    # -- what sessions hand in (uplink.session.CommandPort) -----------------------------------

    def reported(self, device_id: str) -> dict[str, Any]:
        """The device's reported properties as fieldgate owns them: its health and identity
        (``fieldgate``) and the last outcome of each desired point (``points``)."""
        doc: dict[str, Any] = {"fieldgate": self._section_of(device_id)}
        outcomes = self._devices[device_id].outcomes
        if outcomes:
            doc["points"] = dict(outcomes)
        return doc

    def watch(self, device_id: str, changed: Callable[[], None]) -> None:
        self._watch(device_id, changed)
        self._devices[device_id].changed.append(changed)

    async def method(self, device_id: str, name: str, payload: bytes, rid: str) -> Answer:
        """A direct method call on ``device_id``'s identity; always an answer."""
        try:
            command = decode_method(device_id, name, payload, rid)
        except Refused as err:
            self._refused_request(device_id, "method", name, err.answer)
            return err.answer
        result: Answer = await self._spawn(self._carry_out(command), f"method[{device_id}]")
        return result

    async def c2d(self, device_id: str, payload: bytes, message_id: str) -> None:
        """A cloud-to-device message: carried out once per message id (see :class:`C2dLedger`);
        returns when it may be acknowledged. A redelivery of a message still being carried
        out waits for it."""
        key = (device_id, message_id)
        running = self._c2d_running.get(key)
        if running is None:
            running = self._spawn(self._c2d(device_id, payload, message_id), f"c2d[{device_id}]")
            self._c2d_running[key] = running
            running.add_done_callback(lambda _: self._c2d_running.pop(key, None))
        await asyncio.shield(running)

    async def desired(self, device_id: str, desired: Any, version: int | None) -> dict[str, Any]:
        """The twin's desired properties (at a GET, or a patch): the reported patch that says
        what was applied, refused or failed."""
        result: dict[str, Any] = await self._spawn(
            self._desired(device_id, desired, version), f"twin[{device_id}]"
        )
        return result

    # -- the work -----------------------------------------------------------------------------

    async def _c2d(self, device_id: str, payload: bytes, message_id: str) -> None:
        if not message_id:
            answer = error_answer(policy.BAD_REQUEST, "a C2D message without a message id")
            self._refused_request(device_id, "c2d", "write", answer)
            return
        seen = self._ledger.state(device_id, message_id)
        if seen is not None:
            if seen == "started":
                self._count("c2d", "outcome-unknown")
                self._record(
                    "command-outcome-unknown",
                    device_id,
                    f"C2D message {message_id} was redelivered after a stop in the middle of "
                    "carrying it out: not carried out again",
                    channel="c2d",
                    ref=message_id,
                )
            else:
                log.info("%s: C2D message %s redelivered, done before", device_id, message_id)
            return
        try:
            command = decode_c2d(device_id, payload, message_id)
        except Refused as err:
            self._refused_request(device_id, "c2d", "write", err.answer, ref=message_id)
            self._ledger.mark(device_id, message_id, str(err.answer.status))
            return

        def started() -> None:
            # Right before the device is asked, inside the device's turn: a stop while the
            # command only waited leaves no "started" behind.
            self._ledger.mark(device_id, message_id, "started")

        answer = await self._carry_out(command, before=started)
        self._ledger.mark(device_id, message_id, str(answer.status))

    async def _desired(self, device_id: str, desired: Any, version: int | None) -> dict[str, Any]:
        decoded = decode_desired(device_id, desired, version)
        device = self._devices[device_id]
        points: dict[str, Any] = {}
        for name, answer in decoded.refused.items():
            self._refused_request(device_id, "twin", "write", answer, ref=str(decoded.version))
            # IoT Hub takes no "$", "." or space in a property name.
            points[name or "_error"] = _reported(None, decoded.version, answer)
        for command in decoded.commands:
            assert command.point is not None
            done = device.applied.get(command.point)
            if done is not None and _identical(done[0], command.value):
                continue  # carried out in this run already: a twin GET after a reconnect
            points[command.point] = await self._twin_write(device, command, decoded.version)
        device.outcomes.update(points)
        self._notify(device)
        return {"points": points} if points else {}

    async def _twin_write(self, device: _Device, command: Command, version: int) -> dict[str, Any]:
        assert command.point is not None
        device.waiting.pop(command.point, None)
        answer = await self._carry_out(command)
        if answer.status == policy.OK:
            device.applied[command.point] = (command.value, version)
        elif answer.body.get("rule") == "device.state":
            # Not up yet (starting, reconnecting): carried out when it is.
            device.waiting[command.point] = command
        return _reported(command.value, version, answer)

    async def _retry_waiting(self, device_id: str) -> None:
        device = self._devices[device_id]
        waiting, device.waiting = device.waiting, {}
        for command in waiting.values():
            assert command.point is not None
            version = int(command.ref) if command.ref.isdigit() else 0
            device.outcomes[command.point] = await self._twin_write(device, command, version)
        self._notify(device)

    def _notify(self, device: _Device) -> None:
        for changed in device.changed:
            changed()

    def _state(self, device: _Device) -> DeviceState:
        link = device.link
        return DeviceState(
            device.points if link is not None else frozenset(),
            link.health.state if link is not None else "down",
            tuple(device.writes),
            tuple(device.reads),
        )

    async def _carry_out(
        self, command: Command, before: Callable[[], None] | None = None
    ) -> Answer:
        device = self._devices[command.device_id]
        async with device.lock:  # one command of a device at a time, in arrival order
            now = time.monotonic()
            for window in (device.writes, device.reads):
                while window and now - window[0] >= policy.RATE_WINDOW:
                    window.popleft()
            decision = policy.decide(
                command, device.policy, self.switches, self._state(device), now
            )
            if not decision.allowed:
                answer = error_answer(decision.status, decision.reason, rule=decision.rule)
                self._event("refused", command, answer, decision)
                return answer
            if command.action == "write":
                device.writes.append(now)  # counted when tried: a failing write still drives
                if command.channel != "twin" and command.point is not None:
                    # Written by another channel: the twin's value is to be applied again.
                    device.applied.pop(command.point, None)
            elif command.action == "read":
                device.reads.append(now)
            if before is not None:
                before()
            try:
                answer = await self._perform(command, device)
            except Exception as err:  # every failure is answered, never raised to a session
                answer = _failure(command, err, self._timeout)
                self._event("failed", command, answer, decision)
                return answer
            self._event("accepted", command, answer, decision)
            return answer

    async def _perform(self, command: Command, device: _Device) -> Answer:
        link = device.link
        assert link is not None  # decide() refused a device without one
        if command.action == "status":
            return Answer(policy.OK, self._status_of(command.device_id))
        async with asyncio.timeout(self._timeout):
            if command.action == "read":
                scan = await link.read(command.points)
                return Answer(
                    policy.OK,
                    {
                        "values": dict(zip(scan.names, scan.values, strict=True)),
                        "quality": scan.quality,
                        "ts": scan.ts_ms,
                    },
                )
            assert command.point is not None
            scan = await link.write(command.point, command.value)
        read_back = dict(zip(scan.names, scan.values, strict=True)).get(command.point)
        return Answer(
            policy.OK,
            {
                "point": command.point,
                "value": command.value,
                "read_back": read_back,
                "exact": _same(command.value, read_back),
                "quality": scan.quality,
            },
        )

    # -- the record ---------------------------------------------------------------------------

    def _count(self, channel: str, outcome: str) -> None:
        key = (channel, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _event(self, outcome: str, command: Command, answer: Answer, decision: Decision) -> None:
        body = answer.body
        reason = str(body.get("error", "")) or (
            f"{command.action} {command.point} = {command.value!r}"
            if command.action == "write"
            else command.action
        )
        self._count(command.channel, outcome)
        self._record(
            f"command-{outcome}",
            command.device_id,
            reason,
            channel=command.channel,
            command=command.action,
            point=command.point,
            value=command.value,
            points=list(command.points) or None,
            rule=body.get("rule", decision.rule) or None,
            outcome=outcome,
            status=answer.status,
            read_back=body.get("read_back"),
            ref=command.ref,
        )

    def _refused_request(
        self, device_id: str, channel: str, name: str, answer: Answer, ref: str = ""
    ) -> None:
        self._count(channel, "refused")
        self._record(
            "command-refused",
            device_id,
            str(answer.body.get("error", "")),
            channel=channel,
            command=name[:64],
            rule="request",
            outcome="refused",
            status=answer.status,
            ref=ref,
        )


def _identical(a: Any, b: Any) -> bool:
    """Equal and of one type: True is not 1, 1 is not 1.0 (each encodes differently)."""
    return type(a) is type(b) and bool(a == b)


def _same(value: Any, read_back: Any) -> bool:
    if isinstance(value, bool) or isinstance(read_back, bool):
        return bool(value) == bool(read_back) and read_back is not None
    if isinstance(value, int | float) and isinstance(read_back, int | float):
        return math.isclose(value, read_back, rel_tol=1e-6, abs_tol=1e-9)
    return bool(value == read_back)


def _failure(command: Command, err: Exception, timeout: float) -> Answer:
    if isinstance(err, TimeoutError):
        text = f"{command.device_id} did not answer within {timeout:g} s"
        if command.action == "write":
            # The request may have been on the wire: the device may hold the value now.
            text += "; the write may have reached the device (read it before writing again)"
        return error_answer(policy.TIMEOUT, text)
    if isinstance(err, NotWritable):
        return error_answer(policy.FORBIDDEN, str(err), rule="points.writable")
    if isinstance(err, DeviceUnavailable):
        status = (
            policy.CONFLICT
            if err.cause in ("unavailable", "refused", "lost")
            else (policy.TIMEOUT if err.cause == "timeout" else policy.DEVICE_FAILED)
        )
        return error_answer(status, err.reason, cause=err.cause)
    if isinstance(err, KeyError):
        return error_answer(policy.NOT_FOUND, str(err.args[0]) if err.args else str(err))
    if isinstance(err, ValueError | OverflowError | TypeError):
        # The value cannot be encoded for the point (out of its type's range, not a number).
        return error_answer(policy.BAD_REQUEST, f"{command.point}: {err}")
    log.exception("%s: %s failed", command.device_id, command.action)
    return error_answer(policy.DEVICE_FAILED, f"{type(err).__name__}: {err}")


def _reported(value: Any, version: int, answer: Answer) -> dict[str, Any]:
    body = answer.body
    if answer.status == policy.OK:
        return {
            "status": "applied",
            "value": value,
            "read_back": body.get("read_back"),
            "version": version,
        }
    return {
        "status": "refused" if answer.status in (400, 403, 404) else "failed",
        "value": value,
        "code": answer.status,
        "rule": body.get("rule"),
        "reason": body.get("error"),
        "version": version,
    }
