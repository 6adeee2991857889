"""The register codec against byte layouts written out by hand, and the coalescing rules."""

from __future__ import annotations

import random
import struct

import pytest

from adapters.modbus.registers import (
    encode_value,
    float32_decimals,
    plan_reads,
    shortest_float32,
)
from gateway.config import Point


def point(
    name: str, address: int, kind: str = "uint16", table: str = "holding", **kw: object
) -> Point:
    return Point.model_validate(
        {"name": name, "address": address, "type": kind, "table": table, **kw}
    )


# float32 1.5 is 0x3FC00000: bytes A B C D = 3F C0 00 00.
@pytest.mark.parametrize(
    ("word", "byte", "registers"),
    [
        ("big", "big", [0x3FC0, 0x0000]),  # ABCD
        ("little", "big", [0x0000, 0x3FC0]),  # CDAB
        ("big", "little", [0xC03F, 0x0000]),  # BADC
        ("little", "little", [0x0000, 0xC03F]),  # DCBA
    ],
)
def test_float32_in_every_word_and_byte_order(word: str, byte: str, registers: list[int]) -> None:
    p = point("f", 0, "float32", word_order=word, byte_order=byte)
    assert plan_reads([p])[0].decode(registers) == [1.5]
    assert encode_value(p, 1.5) == registers


@pytest.mark.parametrize(
    ("kind", "registers", "value"),
    [
        ("int16", [0xFFFE], -2),
        ("uint16", [0xFFFE], 65534),
        ("int32", [0xFFFF, 0xFFFD], -3),
        ("uint32", [0x0001, 0x0000], 65536),
        ("float64", [0x4009, 0x21FB, 0x5444, 0x2D18], 3.141592653589793),
        ("bool", [0x0000], False),
        ("bool", [0x0100], True),
    ],
)
def test_each_type_decodes_big_endian(kind: str, registers: list[int], value: object) -> None:
    assert plan_reads([point("x", 10, kind)])[0].decode(registers) == [value]


def test_scale_and_offset_apply_and_invert() -> None:
    p = point("t", 0, "int16", scale=0.1, offset=-40.0)
    assert plan_reads([p])[0].decode([0x0190]) == [0.0]  # 400 * 0.1 - 40
    assert encode_value(p, 0.0) == [400]
    assert plan_reads([p])[0].decode(encode_value(p, 21.7)) == [21.7]


def test_consecutive_points_coalesce_and_gaps_split() -> None:
    points = [point(f"p{i}", i * 2, "float32") for i in range(10)]  # 0..19
    points.append(point("far", 40))
    blocks = plan_reads(points, max_gap=8)
    assert [(b.address, b.count) for b in blocks] == [(0, 20), (40, 1)]
    assert [(b.address, b.count) for b in plan_reads(points, max_gap=30)] == [(0, 41)]


def test_a_block_never_exceeds_125_registers_nor_mixes_tables_or_periods() -> None:
    points = [point(f"p{i}", i * 2, "float32") for i in range(100)]  # 200 registers
    points += [point("in", 0, table="input"), point("slow", 300, period=10.0)]
    points += [point(f"c{i}", i, "bool", table="coil") for i in range(2100)]
    blocks = plan_reads(points)
    assert all(b.count <= 125 for b in blocks if not b.bits)
    assert all(b.count <= 2000 for b in blocks if b.bits)
    assert sum(len(b.names) for b in blocks) == len(points)
    assert len({(b.table, b.period) for b in blocks}) == 4
    assert [b.count for b in blocks if b.table == "holding" and b.period == 1.0] == [124, 76]


def test_block_decodes_every_point_in_place() -> None:
    points = [
        point("a", 0, "float32"),
        point("b", 5, "int16"),
        point("c", 6, "uint32", word_order="little"),
    ]
    block = plan_reads(points)[0]
    registers = [0] * block.count
    for p, v in zip(points, (2.5, -7, 70000), strict=True):
        registers[p.address : p.address + len(encode_value(p, v))] = encode_value(p, v)
    assert dict(zip(block.names, block.decode(registers), strict=True)) == {
        "a": 2.5,
        "b": -7,
        "c": 70000,
    }


def test_short_response_is_refused_not_misread() -> None:
    block = plan_reads([point("a", 0, "float32"), point("b", 2, "float32")])[0]
    with pytest.raises(ValueError, match="returned 3 registers, expected 4"):
        block.decode([0, 0, 0])


def test_coils_decode_from_bits() -> None:
    block = plan_reads([point("x", 3, "bool", table="coil"), point("y", 5, "bool", table="coil")])[
        0
    ]
    assert (block.address, block.count) == (3, 3)
    assert block.decode([True, False, False, False, False, False, False, False]) == [True, False]


def test_float32_decimals_read_back_as_the_same_float32_block_by_block() -> None:
    rng = random.Random(9)
    packer = struct.Struct(">64f")
    extremes = [
        3.4028234663852886e38,
        -3.4028234663852886e38,
        1.401298464324817e-45,
        float("inf"),
        float("-inf"),
        0.0,
        -0.0,
        16777217.0,
    ]
    for _ in range(2000):
        values = [
            struct.unpack(">f", struct.pack(">I", rng.getrandbits(32)))[0] for _ in range(56)
        ] + extremes
        values = [v for v in values if v == v][:64] + [0.0] * (
            64 - len([v for v in values if v == v][:64])
        )
        got = float32_decimals(values, packer)
        assert [struct.pack(">f", v) for v in got] == [struct.pack(">f", v) for v in values]
        # At most nine significant digits each.
        assert all(float(f"{v:.9g}") == v for v in got)


def test_shortest_float32_round_trips_every_value() -> None:
    rng = random.Random(7)
    for _ in range(20000):
        raw = struct.unpack(">f", struct.pack(">I", rng.getrandbits(32)))[0]
        short = shortest_float32(raw)
        if raw != raw:  # NaN stays NaN
            assert short != short
            continue
        assert struct.pack(">f", short) == struct.pack(">f", raw)
        assert len(repr(short)) <= max(len(repr(raw)), 16)
