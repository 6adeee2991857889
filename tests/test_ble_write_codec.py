"""Writes to BLE values, the pure part: a writable decode-table row encoded as the inverse of
its decode, values refused before anything is sent, and rows that cannot be inverted refused in
the config naming the field."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from test_ble_gatt import ble_device
from test_config import good, refused

from adapters.ble import gatt
from adapters.ble.sim.bluetoothd import att_error
from gateway.config import load, render_toml


def one(fmt: str, scale: float = 1.0, offset: float = 0.0) -> gatt.Decoder:
    return gatt.Decoder(fmt, (gatt.Field("v", scale, offset),))


@pytest.mark.parametrize(
    ("fmt", "scale", "offset", "value", "raw"),
    [
        ("<h", 0.01, 0.0, 21.5, 2150),  # 2150.0000000000005 steps in binary: taken as 2150
        ("<h", 0.01, 0.0, -327.68, -32768),
        ("<h", 0.01, 0.0, 327.67, 32767),
        (">H", 0.1, -40.0, 0.3, 403),  # the offset undone first, then the scale
        ("<B", 1.0, 0.0, 255, 255),
        ("<B", 1.0, 0.0, 7.0, 7),  # a whole float is the whole number
        ("!i", 1.0, 0.0, -(2**31), -(2**31)),
        ("<Q", 1.0, 0.0, 2**64 - 1, 2**64 - 1),
        ("<?", 5.0, 0.0, True, True),  # bools pass through, as in the decode
    ],
)
def test_encode_inverts_the_decode_in_the_rows_type_byte_order_scale_and_offset(
    fmt: str, scale: float, offset: float, value: Any, raw: Any
) -> None:
    decoder = one(fmt, scale, offset)
    data = decoder.encode_value(value)
    assert data == struct.pack(fmt, raw)
    assert decoder.decode(data) == [pytest.approx(value)]


def test_float_rows_keep_their_precision_and_their_range() -> None:
    assert one("<f").decode(one("<f").encode_value(70000.5)) == [70000.5]
    assert one("<e", 0.5).encode_value(3) == struct.pack("<e", 6.0)
    assert one(">d").encode_value(1e300) == struct.pack(">d", 1e300)
    with pytest.raises(gatt.InvalidValue, match=r"outside what a float16 holds \(magnitude up"):
        one("<e").encode_value(70000)
    with pytest.raises(gatt.InvalidValue, match="outside what a float32 holds"):
        one("<f").encode_value(1e39)


@pytest.mark.parametrize(
    ("fmt", "scale", "offset", "value", "reason"),
    [
        ("<h", 0.01, 0.0, 327.68, "outside what an int16 holds (-327.68 to 327.67)"),
        ("<B", 1.0, 0.0, 256, "outside what a uint8 holds (0 to 255)"),
        ("<B", 1.0, 0.0, -1, "outside what a uint8 holds (0 to 255)"),
        ("<Q", 1.0, 0.0, 2**64, "outside what a uint64 holds (0 to 18446744073709551615)"),
        ("<H", 0.5, 10.0, 9.5, "outside what a uint16 holds (10 to 32777.5)"),
        ("<h", 0.01, 0.0, 21.505, "an int16 field holds only a whole number of steps of 0.01"),
        ("<H", 0.5, 10.0, 10.25, "a whole number of steps of 0.5 from 10"),
        ("<B", 1.0, 0.0, 1.5, "a uint8 field holds only a whole number"),
        ("<h", 0.01, 0.0, True, "an int16 field takes a number"),
        ("<h", 0.01, 0.0, "21.5", "an int16 field takes a number"),
        ("<h", 0.01, 0.0, None, "an int16 field takes a number"),
        ("<f", 1.0, 0.0, [1.0], "a float32 field takes a number"),
        ("<f", 1.0, 0.0, float("nan"), "not a finite number"),
        ("<h", 1.0, 0.0, float("inf"), "not a finite number"),
        ("<?", 1.0, 0.0, 1, "a bool field takes true or false"),
        ("<?", 1.0, 0.0, "true", "a bool field takes true or false"),
    ],
)
def test_a_value_of_the_wrong_type_or_outside_the_type_is_refused_naming_point_and_why(
    fmt: str, scale: float, offset: float, value: Any, reason: str
) -> None:
    with pytest.raises(gatt.InvalidValue) as refusal:
        one(fmt, scale, offset).encode_value(value)
    err = refusal.value
    assert isinstance(err, ValueError)  # the control path answers it as a bad request
    assert err.point == "v" and err.value is value
    assert reason in err.reason
    assert str(err).startswith(f"v: cannot write {value!r}: ")


def test_a_table_that_cannot_be_inverted_says_why() -> None:
    assert gatt.write_problem("<h") is None
    assert gatt.write_problem(">f") is None
    assert "holds 4 values" in str(gatt.write_problem("<IhHB"))
    assert "holds 2 values" in str(gatt.write_problem("2h"))
    assert "pad bytes" in str(gatt.write_problem("<hx"))
    decoder = gatt.Decoder("<HI", (gatt.Field("a"), gatt.Field("b")))
    with pytest.raises(ValueError, match="holds 2 values"):
        decoder.encode_value(1)


def test_the_simulator_reports_att_errors_the_way_bluez_does() -> None:
    # bleak reads these back into the ATT code (bleak/backends/bluezdbus/utils.py).
    assert (att_error(0x03).name, att_error(0x03).text) == (
        "org.bluez.Error.NotPermitted",
        "Write not permitted",
    )
    assert att_error(0x0D).text == "Invalid Length"
    assert att_error(0x80).name == "org.bluez.Error.Failed"
    assert att_error(0x80).text == "Operation failed with ATT error: 0x80"


SETPOINT_ROW = {"uuid": gatt.SETPOINT, "format": "<h", "values": [{"name": "sp", "scale": 0.01}]}


def config_with(pki_dir: Path, tmp_path: Path, *rows: dict[str, Any]) -> str:
    doc = good(pki_dir, tmp_path)
    device = ble_device(pki_dir)
    device["ble"]["characteristics"] += list(rows)
    doc["devices"].append(device)  # type: ignore[attr-defined]
    return render_toml(doc)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {
                "uuid": gatt.STATUS,
                "format": "<HI",
                "values": [{"name": "v"}, {"name": "w"}],
                "writable": True,
            },
            "devices[4].ble.characteristics[1].writable: cannot be true: "
            "format '<HI' holds 2 values; a write replaces the whole characteristic",
        ),
        (
            {**SETPOINT_ROW, "format": "<hx", "writable": True},
            "devices[4].ble.characteristics[1].writable: cannot be true: "
            "format '<hx' has pad bytes, which a write would overwrite with zeros",
        ),
        (
            {**SETPOINT_ROW, "values": [{"name": "sp", "scale": 0.0}], "writable": True},
            "devices[4].ble.characteristics[1].writable: cannot be true: value 'sp' has scale 0",
        ),
        (
            {**SETPOINT_ROW, "writable": "yes please"},
            "devices[4].ble.characteristics[1].writable: Input should be a valid boolean",
        ),
    ],
)
def test_a_writable_row_whose_decode_cannot_be_inverted_is_refused_naming_the_field(
    pki_dir: Path, tmp_path: Path, row: dict[str, Any], message: str
) -> None:
    assert message in refused(tmp_path, config_with(pki_dir, tmp_path, row))


def test_a_writable_row_loads(pki_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(config_with(pki_dir, tmp_path, {**SETPOINT_ROW, "writable": True}))
    device = load(path, check_files=False).devices[-1]
    assert device.ble is not None
    assert [row.writable for row in device.ble.characteristics] == [False, True]
