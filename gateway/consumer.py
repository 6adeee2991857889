"""The cloud consumer's side: open telemetry messages and account for every sequence number.

Use it where IoT Hub messages are read (an Event Hubs consumer, a Function, the local hub
stand-in)::

    opened = open_message(topic_or_device, properties, body, keyring)
    tracker.add(opened)          # duplicates are reported, gaps can be listed

Delivery is at-least-once: an envelope may arrive twice after a reconnect. (device, boot id,
sequence number) identifies every reading, so :class:`SequenceTracker` tells a duplicate from
new data. A resent envelope is byte-identical to the first, so the tracker keeps a short digest
of every envelope's body: the same sequence numbers with other content are a **conflict**
(somebody reused numbers), counted and reported, never taken for duplicates.

The gateway's audit stream arrives beside telemetry, under the gateway's own identity and marked
``fg-stream=audit``: :func:`open_all` leaves it out, :class:`AuditConsumer` checks it as it
arrives (hash chain, signed heads, order), naming the first bad record.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.audit.files import P_STREAM, STREAM_AUDIT, parse_line
from gateway.core.audit import AuditRecord, ChainVerifier, Head, HeadVerifier, Verdict
from gateway.core.envelope import open_envelope
from gateway.core.errors import EnvelopeError
from gateway.core.iothub import parse_sender_topic, parse_telemetry_topic
from gateway.core.readings import Header, Reading
from gateway.identity.keyring import Keyring


@dataclass(frozen=True, slots=True)
class Opened:
    device_id: str
    header: Header
    readings: list[Reading]
    received: float
    digest: int = 0  # 64 bits of BLAKE2b over the body: tells a resend from other content


@dataclass(frozen=True, slots=True)
class Conflict:
    """An envelope whose sequence numbers were seen before with other content."""

    device_id: str
    boot_id: str
    first_seq: int
    count: int
    received: float


def body_digest(body: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "big")


def open_message(
    topic: str, body: bytes, keyring: Keyring, *, received: float | None = None
) -> Opened:
    """Open a message as it arrived on ``devices/{id}/messages/events/{properties}``.

    The device id is taken from the topic (IoT Hub sets it from the authenticated connection),
    never from anything the payload says.
    """
    try:
        device_id, props = parse_telemetry_topic(topic)
        header = Header.from_properties(props)
    except ValueError as err:
        raise EnvelopeError(str(err)) from err
    readings = open_envelope(device_id, header, body, keyring)
    return Opened(
        device_id,
        header,
        readings,
        time.time() if received is None else received,
        body_digest(body),
    )


@dataclass
class _Stream:
    # Sorted, merged [start, end) intervals of sequence numbers seen.
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    duplicates: int = 0
    # first_seq -> digests of every body seen there: the first one, and any conflicting one
    # (a resend of a conflicting envelope is a duplicate of it, not a new conflict).
    digests: dict[int, set[int]] = field(default_factory=dict)

    def add(self, first: int, count: int, *, duplicate: bool = True) -> int:
        """Record [first, first + count); return how many of them were seen before.

        ``duplicate=False`` (a conflict): covered, but not counted as duplicates."""
        end = first + count
        starts, ends = self.starts, self.ends
        if not starts or first >= ends[-1]:
            if starts and first == ends[-1]:
                ends[-1] = end
            else:
                starts.append(first)
                ends.append(end)
            return 0
        seen = 0
        i = bisect.bisect_right(starts, first) - 1
        j = i if i >= 0 else 0
        lo, hi = first, end
        while j < len(starts) and starts[j] <= end:
            if ends[j] >= first:
                seen += max(0, min(end, ends[j]) - max(first, starts[j]))
                lo, hi = min(lo, starts[j]), max(hi, ends[j])
                del starts[j], ends[j]
            else:
                j += 1
        k = bisect.bisect_left(starts, lo)
        starts.insert(k, lo)
        ends.insert(k, hi)
        if duplicate:
            self.duplicates += seen
        return seen

    def covered(self, seq: int) -> bool:
        i = bisect.bisect_right(self.starts, seq) - 1
        return i >= 0 and seq < self.ends[i]

    def overlaps(self, first: int, count: int) -> bool:
        if not self.starts or first >= self.ends[-1]:
            return False
        i = bisect.bisect_right(self.starts, first + count - 1) - 1
        return i >= 0 and self.ends[i] > first

    def gaps(self) -> list[tuple[int, int]]:
        """Holes between the first and the last sequence number seen, as [start, end)."""
        holes = [(self.ends[i], self.starts[i + 1]) for i in range(len(self.starts) - 1)]
        if self.starts and self.starts[0] > 0:
            holes.insert(0, (0, self.starts[0]))
        return holes

    def count(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))

    def count_below(self, limit: int) -> int:
        """How many sequence numbers below ``limit`` were seen."""
        return sum(max(0, min(e, limit) - s) for s, e in zip(self.starts, self.ends, strict=True))


class SequenceTracker:
    """Per (device, boot id): which readings arrived, which twice, which are missing."""

    def __init__(self) -> None:
        self.streams: dict[tuple[str, str], _Stream] = {}
        self.conflicts: list[Conflict] = []

    def add(self, opened: Opened) -> list[Reading]:
        """Record an envelope; return its readings not seen before (deduplicated).

        Only a byte-identical resend is a duplicate. An envelope that overlaps numbers seen
        before with other content is a conflict: it is appended to :attr:`conflicts` and
        **all** its readings are returned (they are not duplicates of anything), to be flagged:
        ``conflicts`` grew by one.
        """
        key = (opened.device_id, opened.header.boot_id)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = _Stream()
        first, count = opened.header.first_seq, opened.header.count
        if not stream.overlaps(first, count):
            stream.add(first, count)
            stream.digests.setdefault(first, set()).add(opened.digest)
            return opened.readings
        known = stream.digests.setdefault(first, set())
        if opened.digest not in known:
            known.add(opened.digest)
            self.conflicts.append(
                Conflict(opened.device_id, opened.header.boot_id, first, count, opened.received)
            )
            stream.add(first, count, duplicate=False)
            return opened.readings
        fresh = [r for r in opened.readings if not stream.covered(r.seq)]
        stream.add(first, count)
        return fresh

    @property
    def conflicting_readings(self) -> int:
        return sum(c.count for c in self.conflicts)

    def gaps(self) -> dict[tuple[str, str], list[tuple[int, int]]]:
        return {k: g for k, s in self.streams.items() if (g := s.gaps())}

    @property
    def duplicates(self) -> int:
        return sum(s.duplicates for s in self.streams.values())

    def unique_readings(self) -> int:
        return sum(s.count() for s in self.streams.values())


def audit_message(topic: str, body: bytes) -> tuple[str, list[AuditRecord | Head]] | None:
    """The sending gateway and the items of an audit stream message (``fg-stream=audit``),
    or None for any other message. A malformed one raises AuditFileError naming the line."""
    if P_STREAM not in topic:
        return None
    device_id, props = parse_sender_topic(topic)
    if props.get(P_STREAM) != STREAM_AUDIT:
        return None
    items: list[AuditRecord | Head] = []
    for number, line in enumerate(body.splitlines(), start=1):
        if line.strip():
            items.append(parse_line(line, f"{device_id} audit message line {number}"))
    return device_id, items


@dataclass
class AuditConsumer:
    """A cloud service's check of audit streams as they arrive: one streaming verifier per
    sending gateway (the hub authenticated the connection, so the chain must be the sender's
    own), its public key looked up by gateway id (from its certificate)."""

    key_of: Callable[[str], HeadVerifier]
    verifiers: dict[str, ChainVerifier] = field(default_factory=dict)

    def add(self, topic: str, body: bytes) -> Verdict | None:
        """Feed one message; the first failing verdict of its gateway, else None."""
        found = audit_message(topic, body)
        if found is None:
            return None
        gateway, items = found
        verifier = self.verifiers.get(gateway)
        if verifier is None:
            verifier = self.verifiers[gateway] = ChainVerifier(self.key_of(gateway), gateway)
        failure = None
        for item in items:
            got = verifier.add(item) if isinstance(item, AuditRecord) else verifier.add_head(item)
            failure = failure or got
        return failure


def open_all(
    messages: Iterable[tuple[str, bytes, float]],
    keyring: Keyring,
    tracker: SequenceTracker | None = None,
) -> tuple[list[Opened], list[str]]:
    """Open many messages; returns (opened, one error line per refused message)."""
    opened, errors = [], []
    for topic, body, received in messages:
        if P_STREAM in topic and audit_message(topic, body) is not None:
            continue  # the audit stream: AuditConsumer checks it
        try:
            item = open_message(topic, body, keyring, received=received)
        except EnvelopeError as err:
            device = topic.split("/", 2)[1] if topic.count("/") >= 2 else topic
            # Most refusals already name the device ("plc-4 seq 12: ..."); do not repeat it.
            errors.append(str(err) if str(err).startswith(device) else f"{device}: {err}")
            continue
        if tracker is not None:
            tracker.add(item)
        opened.append(item)
    return opened, errors


def read_record(path: Path) -> list[tuple[str, bytes, float]]:
    """Messages from a record file (JSON lines of ``{"t", "topic", "body"}``, the body in
    base64, as ``fieldgate localhub --record`` writes them and ``fieldgate open`` reads them),
    as (topic, body, arrival time). The standard ``json`` reads them: orjson has its owner
    module, and a record is read once, not on a hot path."""
    out = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            doc = json.loads(line)
            out.append((doc["topic"], base64.b64decode(doc["body"]), float(doc["t"])))
    return out
