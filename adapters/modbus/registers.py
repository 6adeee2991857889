"""Pure Modbus register codec: plan coalesced reads, decode blocks, encode values.

A device's register map (rows of :class:`adapters.modbus.config.Point`) becomes a list of
:class:`ReadBlock`: the fewest requests that cover every point of one table and poll period, at
most 125 registers (2000 bits) each, bridging gaps up to ``max_gap``. Each block carries a
decoder built once: one precompiled ``struct`` per (byte order, word order) group decodes the
whole block in a single C call, so decoding costs per request, not per point.

Word and byte order: ``byte_order`` is the order of the two bytes inside each 16-bit register,
``word_order`` the order of the registers inside a 32/64-bit value. big/big is the Modbus
convention (ABCD); word little is CDAB, byte little is BADC, both little is DCBA.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from adapters.modbus.config import REGISTER_WIDTH, Point

MAX_REGISTERS = 125
MAX_BITS = 2000

_CODE = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "float32": "f",
    "float64": "d",
    "bool": "H",
}
_F32 = struct.Struct(">f")

Decoder = Callable[[Sequence[Any]], list[Any]]


def register_count(point_type: str) -> int:
    return REGISTER_WIDTH[point_type]


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One request: ``count`` registers (or bits) of ``table`` from ``address``."""

    table: str
    address: int
    count: int
    period: float
    names: tuple[str, ...]
    decode: Decoder

    @property
    def bits(self) -> bool:
        return self.table in ("coil", "discrete")


def plan_reads(
    points: Iterable[Point],
    *,
    max_gap: int = 8,
    max_registers: int = MAX_REGISTERS,
    max_bits: int = MAX_BITS,
) -> list[ReadBlock]:
    groups: dict[tuple[str, float], list[Point]] = {}
    for point in points:
        groups.setdefault((point.table, point.period), []).append(point)
    blocks: list[ReadBlock] = []
    for (table, period), members in sorted(groups.items()):
        bits = table in ("coil", "discrete")
        limit = max_bits if bits else max_registers
        members.sort(key=lambda p: (p.address, p.name))
        current: list[Point] = []
        start = end = 0
        for point in members:
            width = 1 if bits else REGISTER_WIDTH[point.type]
            stop = point.address + width
            if current and point.address - end <= max_gap and max(end, stop) - start <= limit:
                current.append(point)
                end = max(end, stop)
                continue
            if current:
                blocks.append(_block(table, period, start, end - start, current))
            current, start, end = [point], point.address, stop
        if current:
            blocks.append(_block(table, period, start, end - start, current))
    return blocks


def _block(table: str, period: float, start: int, count: int, points: list[Point]) -> ReadBlock:
    if table in ("coil", "discrete"):
        names, decode = _bit_decoder(start, points)
    else:
        names, decode = _register_decoder(start, count, points)
    return ReadBlock(table, start, count, period, names, decode)


def _bit_decoder(start: int, points: list[Point]) -> tuple[tuple[str, ...], Decoder]:
    offsets = [p.address - start for p in points]
    names = tuple(p.name for p in points)

    def decode(bits: Sequence[Any]) -> list[Any]:
        return [bool(bits[o]) for o in offsets]

    return names, decode


def _layout(point: Point) -> tuple[bool, str]:
    """(swap the bytes of each register first, then read as '>' or '<')."""
    width = REGISTER_WIDTH[point.type]
    little_bytes = point.byte_order == "little"
    if width == 1:
        return little_bytes, ">"
    little_words = point.word_order == "little"
    if little_words and little_bytes:
        return False, "<"
    if little_words:
        return True, "<"
    return little_bytes, ">"


def _register_decoder(
    start: int, count: int, points: list[Point]
) -> tuple[tuple[str, ...], Decoder]:
    groups: dict[tuple[bool, str], list[Point]] = {}
    for point in points:
        groups.setdefault(_layout(point), []).append(point)
    structs: list[tuple[bool, struct.Struct]] = []
    ordered: list[Point] = []
    for (swap, endian), members in groups.items():
        fmt = endian
        pos = 0
        for point in sorted(members, key=lambda p: p.address):
            offset = (point.address - start) * 2
            if offset < pos:  # overlapping views of the same registers: read separately
                structs.append((swap, struct.Struct(fmt)))
                fmt, pos = endian, 0
            fmt += f"{offset - pos}x" if offset > pos else ""
            fmt += _CODE[point.type]
            pos = offset + REGISTER_WIDTH[point.type] * 2
            ordered.append(point)
        structs.append((swap, struct.Struct(fmt)))
    names = tuple(p.name for p in ordered)
    words_be = struct.Struct(f">{count}H")
    words_le = struct.Struct(f"<{count}H")
    need_swap = any(swap for swap, _ in structs)
    f32 = [i for i, p in enumerate(ordered) if p.type == "float32"]
    f32_pack = struct.Struct(f">{len(f32)}f")
    flags = [i for i, p in enumerate(ordered) if p.type == "bool"]
    scaled = [
        (i, p.scale, p.offset, p.type == "float32")
        for i, p in enumerate(ordered)
        if p.scale != 1.0 or p.offset != 0.0
    ]

    def decode(registers: Sequence[Any]) -> list[Any]:
        if len(registers) < count:
            raise ValueError(f"device returned {len(registers)} registers, expected {count}")
        raw = words_be.pack(*registers[:count])
        swapped = words_le.pack(*registers[:count]) if need_swap else raw
        values: list[Any] = []
        for swap, layout in structs:
            values.extend(layout.unpack_from(swapped if swap else raw))
        if f32:
            rendered = float32_decimals([values[i] for i in f32], f32_pack)
            for i, value in zip(f32, rendered, strict=True):
                values[i] = value
        for i in flags:
            values[i] = values[i] != 0
        for i, scale, offset, single in scaled:
            value = values[i] * scale + offset
            values[i] = float(f"{value:.7g}") if single else float(f"{value:.12g}")
        return values

    return names, decode


def shortest_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32.

    A float32 widened to a Python float prints 17 digits of noise (23.399999618530273); carrying
    them would double the compressed batch. Seven significant digits round-trip almost always;
    the rare value that needs more gets nine, which always do.
    """
    if not math.isfinite(value):
        return value
    short = float(f"{value:.7g}")
    if _F32.pack(short) == _F32.pack(value):
        return short
    return float(f"{value:.9g}")


def float32_decimals(values: list[float], packer: struct.Struct) -> list[float]:
    """float32 values as decimals that read back as the same float32, a block at a time.

    Eight significant digits, or nine where eight do not read back: one ``pack`` of the
    whole block finds those. Measured on noisy values this costs 0.49 us per value against
    0.84 us for :func:`shortest_float32` one by one, and is shorter on average (8.9 characters
    against 9.5), because seven digits rarely suffice and the fallback would be nine.
    """
    short = [float(f"{v:.8g}") for v in values]
    try:
        want, got = packer.pack(*values), packer.pack(*short)
    except (struct.error, OverflowError):
        return [shortest_float32(v) for v in values]
    if want == got:
        return short
    a, b = memoryview(want).cast("I"), memoryview(got).cast("I")
    for i in range(len(values)):
        if a[i] != b[i]:
            short[i] = float(f"{values[i]:.9g}")
    return short


def encode_value(point: Point, value: Any) -> list[int]:
    """Registers that a device holds for ``value`` (the simulator and device writes use this).

    ``scale`` and ``offset`` are undone first, so that decoding returns ``value``.
    """
    if point.type == "bool":
        return [1 if value else 0]
    raw = value
    if point.scale != 1.0 or point.offset != 0.0:
        raw = (value - point.offset) / point.scale
    if point.type not in ("float32", "float64"):
        raw = round(raw)
    swap, endian = _layout(point)
    data = struct.pack(endian + _CODE[point.type], raw)
    words = list(struct.unpack(f"<{len(data) // 2}H" if swap else f">{len(data) // 2}H", data))
    return words
