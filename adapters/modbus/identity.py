"""A Modbus device's fingerprint: what it says it is, read from the device itself.

Two sources, as configured (:class:`~adapters.modbus.config.ModbusIdentity`):

- **FC 43 / MEI 14** (Read Device Identification): vendor, product code and revision (the
  basic objects), and the regular objects (product name, model name, ...) where the device
  offers them; a long answer says "more follows" and names the next object, which is asked
  for in turn;
- **identity registers**: a serial number in holding or input registers, formatted as ASCII
  (two characters a register, NULs and padding spaces dropped), hex, or one unsigned integer.

A device that answers FC 43 with an exception falls back to its identity registers when they
are configured; with none, the evidence carries a refusal ("no identity: FC 43 answered
exception 0x01"). Whether a fingerprint is the enrolled one is the auth gate's decision
(:mod:`adapters.modbus.admission`); this module only builds it.

The pure part (formats, objects to names, the "more follows" walk) is tested without a loop;
:func:`collect_fingerprint` and :func:`collect_evidence` are the thin I/O shell the link and
``fieldgate enroll`` call, over any transport that offers ``read`` and
``read_device_information`` (:class:`~adapters.modbus.transport.ModbusTransport`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters.modbus.config import FC43_OBJECTS, IDENTITY_NOTES, IdentityRegister, ModbusIdentity
from gateway.core.auth import Evidence
from gateway.core.errors import DeviceUnavailable

BASIC = 0x01  # read device id codes: the basic objects (0-2)
REGULAR = 0x02  # basic and regular objects (0-0x7F)
MORE_FOLLOWS = 0xFF
MAX_REQUESTS = 16  # "more follows" answers followed per read, at most
MAX_VALUE = 128  # characters of one value kept in a fingerprint (and in an event)
ILLEGAL_FUNCTION = 0x01
NO_ANSWER = -1  # Identification.exception of an FC 43 request that timed out
# Exception 0A/0B: a gateway says the device behind it is not answering. 05/06: busy, asked
# again after these delays. Neither is an answer about the device's identity: the read fails
# as a timeout would (the device is backed off and checked again), it is never a refusal.
NOT_THERE = frozenset({0x0A, 0x0B})
BUSY = frozenset({0x05, 0x06})
BUSY_DELAYS = (0.02, 0.04, 0.08, 0.16)


async def _asked(call: Callable[[], Awaitable[Any]], what: str) -> Any:
    """``call()`` (a read through the transport) again while the device answers busy; an
    answer from a gateway that the device is not there, or busy past the retries, raises
    :class:`DeviceUnavailable` (cause ``timeout``)."""
    for delay in (*BUSY_DELAYS, None):
        reply = await call()
        code = None if reply is None else reply.exception
        if code in NOT_THERE:
            why = f"{what}: exception 0x{code:02X}: the device is not answering"
            raise DeviceUnavailable("", "", why, cause="timeout")
        if code not in BUSY:
            return reply
        if delay is None:
            raise DeviceUnavailable(
                "", "", f"{what}: busy (exception 0x{code:02X}) past its retries", cause="timeout"
            )
        await asyncio.sleep(delay)


TRANSPORT = "modbus-tcp"


@dataclass(frozen=True, slots=True)
class Identification:
    """One FC 43 answer: the objects in the order received, whether more follow and from
    which object; or ``exception``, the Modbus exception code the device answered with."""

    objects: tuple[tuple[int, bytes], ...] = ()
    more_follows: bool = False
    next_object: int = 0
    exception: int | None = None


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a device showed: ``values`` (name -> text), or ``refusal`` when it showed nothing
    that can be checked; ``notes`` say how it was read (for the record, never compared)."""

    values: dict[str, str] = field(default_factory=dict)
    refusal: str | None = None
    notes: dict[str, str] = field(default_factory=dict)


# -- pure --


def object_name(object_id: int) -> str:
    return FC43_OBJECTS.get(object_id, f"object_0x{object_id:02X}")


def text(raw: bytes) -> str:
    """An object's or register's bytes as text a log line and an event can hold: UTF-8 where
    it is, escapes where not, control characters escaped, at most :data:`MAX_VALUE` long."""
    value = raw.decode("utf-8", "backslashreplace")
    value = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
    return value.strip()[:MAX_VALUE]


def objects_fingerprint(objects: Sequence[tuple[int, bytes]]) -> dict[str, str]:
    """FC 43 objects as fingerprint values; an object sent twice keeps both, joined by '|'."""
    out: dict[str, str] = {}
    for object_id, raw in objects:
        name = object_name(object_id)
        value = text(raw)
        out[name] = f"{out[name]}|{value}" if name in out else value
    return out


def format_registers(words: Sequence[int], fmt: str) -> str:
    """Identity registers as text: ``ascii`` (high byte first, NULs and padding dropped),
    ``hex`` (four digits a register), ``uint`` (one big-endian integer)."""
    if fmt == "hex":
        return "".join(f"{w & 0xFFFF:04X}" for w in words)
    if fmt == "uint":
        value = 0
        for word in words:
            value = (value << 16) | (word & 0xFFFF)
        return str(value)
    raw = b"".join((w & 0xFFFF).to_bytes(2, "big") for w in words)
    return text(raw.replace(b"\x00", b""))


def next_request(answer: Identification, asked: int, requests: int) -> int | None:
    """The object to ask for next after ``answer`` (to a request from object ``asked``), or
    None when the walk is complete. A device that says more follows but names an object at or
    before the one asked for would loop: raises ``ValueError``."""
    if not answer.more_follows:
        return None
    if answer.next_object <= asked:
        raise ValueError(
            f"FC 43 says more follows from object 0x{answer.next_object:02X}, "
            f"not after 0x{asked:02X}"
        )
    if requests >= MAX_REQUESTS:
        raise ValueError(f"FC 43 still says more follows after {MAX_REQUESTS} requests")
    return answer.next_object


def comparable(fingerprint: Mapping[str, str]) -> dict[str, str]:
    """The values of a fingerprint that identify the device (not how they were read)."""
    return {k: v for k, v in fingerprint.items() if k not in IDENTITY_NOTES}


def no_identity(code: int) -> str:
    if code == NO_ANSWER:
        return "no identity: FC 43 not answered"
    return f"no identity: FC 43 answered exception 0x{code:02X}"


# -- the I/O shell --


class IdentitySource(Protocol):
    """What collecting needs of a connection (a :class:`ModbusTransport`)."""

    async def read(self, table: str, address: int, count: int) -> Any: ...

    async def read_device_information(
        self, read_code: int, object_id: int = 0
    ) -> Identification | None: ...


async def read_objects(source: IdentitySource) -> Identification:
    """Every basic and regular object the device offers, following "more follows"; a device
    that refuses the regular code is asked for the basic objects. An exception, or a wrong
    answer (``None`` from the transport: exception 0), comes back as ``exception``."""

    def ask(code: int, object_id: int) -> Awaitable[Identification | None]:
        return _asked(
            lambda: source.read_device_information(code, object_id), "device identification"
        )

    read_code = REGULAR
    first = await ask(read_code, 0)
    if first is None or first.exception is not None:
        read_code = BASIC
        first = await ask(read_code, 0)
    if first is None:
        return Identification(exception=0)
    if first.exception is not None:
        return first
    objects = list(first.objects)
    answer, asked, requests = first, 0, 1
    while True:
        try:
            nxt = next_request(answer, asked, requests)
        except ValueError:
            return Identification(exception=0)
        if nxt is None:
            return Identification(tuple(objects))
        again = await ask(read_code, nxt)
        if again is None or again.exception is not None:
            return Identification(exception=0 if again is None else again.exception)
        objects.extend(again.objects)
        answer, asked, requests = again, nxt, requests + 1


async def read_register(source: IdentitySource, register: IdentityRegister) -> str | None:
    """One identity register's value, or None if the device did not answer it correctly."""
    reply = await _asked(
        lambda: source.read(register.table, register.address, register.count),
        f"identity register {register.name}",
    )
    if reply is None or reply.exception is not None:
        return None
    return format_registers(reply.values, register.format)


async def collect_fingerprint(source: IdentitySource, identity: ModbusIdentity) -> Fingerprint:
    """Read a device's fingerprint as ``identity`` configures it."""
    values: dict[str, str] = {}
    notes: dict[str, str] = {}  # keys: IDENTITY_NOTES
    fc43_failed: int | None = None
    if identity.fc43:
        try:
            answer = await read_objects(source)
        except DeviceUnavailable as err:
            # Some devices never answer a function code they lack (the spec says exception
            # 01). With identity registers to fall back on, read those; without, the device
            # is unavailable (reconnected with backoff), not refused.
            if err.cause != "timeout" or not identity.registers:
                raise
            answer = Identification(exception=NO_ANSWER)
        if answer.exception == NO_ANSWER:
            fc43_failed = NO_ANSWER
            notes["fc43"] = "no answer"
        elif answer.exception is None:
            values.update(objects_fingerprint(answer.objects))
            notes["identity_source"] = "fc43"
        else:
            fc43_failed = answer.exception
            notes["fc43"] = f"exception 0x{answer.exception:02X}"
    unread: list[str] = []
    for register in identity.registers:
        value = await read_register(source, register)
        if value is None:
            unread.append(register.name)
        else:
            values[register.name] = value
    if identity.registers:
        both = identity.fc43 and fc43_failed is None
        notes["identity_source"] = "fc43+registers" if both else "registers"
    if fc43_failed is not None and not identity.registers:
        return Fingerprint(refusal=no_identity(fc43_failed), notes=notes)
    if unread and not values:
        why = f"no identity: identity registers {', '.join(unread)} not answered"
        if fc43_failed is not None:
            why = f"{no_identity(fc43_failed)}; identity registers {', '.join(unread)} not answered"
        return Fingerprint(refusal=why, notes=notes)
    return Fingerprint(values, notes=notes)


async def collect_evidence(
    source: IdentitySource, device_id: str, endpoint: str, identity: ModbusIdentity | None
) -> Evidence:
    """The evidence the gate judges for one connection: the endpoint, and the fingerprint
    when the device has an identity method (``identity = "none"``: nothing is read)."""
    if identity is None or identity.none:
        return Evidence(device_id, TRANSPORT, endpoint)
    found = await collect_fingerprint(source, identity)
    return Evidence(
        device_id,
        TRANSPORT,
        endpoint,
        fingerprint={**found.notes, **found.values},
        refusal=found.refusal,
    )
