"""Pure: how a read plan changes when a device refuses a coalesced read.

A real device's map has holes (registers that answer exception 02, illegal data address, to any
read touching them) and a per-request limit below the protocol's 125 registers (exception 03,
illegal data value, above it). A refused read is split in two, by points, and each half is
planned again; a single point refused with 02 can never be read and is set aside as a
configuration problem. What was learnt (the blocks that work, the points that never do) is a
:class:`Learnt` value that the link keeps in the state directory and starts from next time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from adapters.modbus.config import Point
from adapters.modbus.registers import ReadBlock, plan_reads

ILLEGAL_ADDRESS = 0x02
ILLEGAL_VALUE = 0x03
ACKNOWLEDGE = 0x05
BUSY = 0x06
SPLIT_ON = frozenset({ILLEGAL_ADDRESS, ILLEGAL_VALUE})
RETRY_ON = frozenset({ACKNOWLEDGE, BUSY})
# A read still refused with these (after its splits or retries) is sent on as a scan of quality
# 'unavailable'. Other exception answers (01 illegal function, 04 device failure, 0A/0B gateway
# path/target) stay what they were before issue 11: counted and logged, the period's values
# simply absent, as the hostile-device tests require of a device answering 0x0B.
UNAVAILABLE_ON = SPLIT_ON | RETRY_ON


@dataclass(frozen=True, slots=True)
class Learnt:
    """Point groups known to read together (each group one request), and points never
    readable (name -> the exception code)."""

    groups: tuple[tuple[str, ...], ...] = ()
    unreadable: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Split:
    """The blocks that replace a refused one, and the point set aside (if the block was one
    point refused with 02)."""

    blocks: list[ReadBlock]
    unreadable: str | None = None


def split_refused(
    block: ReadBlock, code: int, points: Mapping[str, Point], *, max_gap: int
) -> Split:
    """The next plan for ``block``, refused with exception ``code`` (02 or 03)."""
    rows = sorted((points[n] for n in block.names), key=lambda p: (p.address, p.name))
    if len(rows) == 1:
        # One point's own read refused: 02 means it is not there; 03 on a single point is the
        # device refusing the point's width, not a limit to learn by splitting further.
        return Split([], rows[0].name)
    half = len(rows) // 2
    blocks: list[ReadBlock] = []
    for part in (rows[:half], rows[half:]):
        # Each half is one request: it spans less than the refused block did.
        blocks.extend(plan_reads(part, max_gap=65535, max_registers=65535, max_bits=65535))
    return Split(blocks)


def learnt_from(blocks: Sequence[ReadBlock], unreadable: Mapping[str, int]) -> Learnt:
    return Learnt(tuple(b.names for b in blocks), dict(unreadable))


def plan_from(learnt: Learnt, points: Mapping[str, Point]) -> list[ReadBlock]:
    """The blocks of a learnt plan (each group one request, as it was read before)."""
    blocks: list[ReadBlock] = []
    for group in learnt.groups:
        rows = [points[n] for n in group]
        blocks.extend(plan_reads(rows, max_gap=65535, max_registers=65535, max_bits=65535))
    return blocks


def map_key(device_id: str, points: Sequence[Point], limits: Mapping[str, int]) -> str:
    """The device's id and a hash of its point map and read limits: a changed map (or limit)
    starts afresh."""
    doc = json.dumps(
        [sorted(p.model_dump(mode="json").items()) for p in points] + [sorted(limits.items())],
        sort_keys=True,
        default=str,
    )
    return f"{device_id}:{hashlib.sha256(doc.encode()).hexdigest()[:16]}"


def encode_learnt(learnt: Learnt) -> dict[str, object]:
    return {"groups": [list(g) for g in learnt.groups], "unreadable": dict(learnt.unreadable)}


def decode_learnt(doc: object, points: Mapping[str, Point]) -> Learnt | None:
    """A stored plan, or None when it does not fit the points (read nothing from it then)."""
    if not isinstance(doc, dict):
        return None
    groups, unreadable = doc.get("groups"), doc.get("unreadable")
    if not isinstance(groups, list) or not isinstance(unreadable, dict):
        return None
    seen: set[str] = set()
    out: list[tuple[str, ...]] = []
    for group in groups:
        if not isinstance(group, list) or not group:
            return None
        if not all(isinstance(n, str) and n in points and n not in seen for n in group):
            return None
        if len({(points[n].table, points[n].period) for n in group}) != 1:
            return None
        seen.update(group)
        out.append(tuple(group))
    bad: dict[str, int] = {}
    for name, code in unreadable.items():
        if name not in points or name in seen or not isinstance(code, int):
            return None
        bad[name] = code
        seen.add(name)
    if seen != set(points):
        return None
    return Learnt(tuple(out), bad)
