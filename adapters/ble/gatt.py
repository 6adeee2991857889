"""Pure BLE pieces: GATT decode tables, the HMAC challenge, addresses. No I/O, no bleak.

A characteristic's value is decoded by a frozen :class:`Decoder` built from the config's decode
table: one ``struct`` format and one row (name, scale, offset) per field. A characteristic the
table marks writable holds exactly one value, so that :meth:`Decoder.encode_value` can invert
the decode (offset and scale undone, the type's range checked, the format's byte order kept);
:func:`write_problem` says why a row cannot be written. The challenge is
HMAC-SHA256(device key, nonce || identity address), the same function on both sides, so the
simulator's peripherals and the gateway cannot drift apart.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

ADDRESS_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
UUID_PATTERN = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"
NONCE_SIZE = 16
RESPONSE_SIZE = 32

# struct codes a decode table may use, and whether the field is an integer.
_CODES = {
    "b": True,
    "B": True,
    "h": True,
    "H": True,
    "i": True,
    "I": True,
    "l": True,
    "L": True,
    "q": True,
    "Q": True,
    "e": False,
    "f": False,
    "d": False,
    "?": True,
}
_FORMAT = re.compile(r"^[<>!]?(\d*[bBhHiIlLqQefd?x])+$")

# The profile of fieldgate's simulated sensors (and of the example configs).
SENSOR_SERVICE = "f1e1d000-6761-7465-8000-000000000001"
MEASUREMENT = "f1e1d000-6761-7465-8000-000000000002"
STATUS = "f1e1d000-6761-7465-8000-000000000003"
CHALLENGE = "f1e1d000-6761-7465-8000-000000000004"
# A writable setpoint: one int16, 0.01 degC (read, write with response).
SETPOINT = "f1e1d000-6761-7465-8000-000000000005"
SETPOINT_FORMAT = "<h"
# counter u32, temperature 0.01 degC, humidity 0.01 %RH, battery %
MEASUREMENT_FORMAT = "<IhHB"
# supply mV, uptime s
STATUS_FORMAT = "<HI"


# A value that differs from a whole number of raw steps by less than this many steps (or, for
# huge raw values, this fraction of them) is taken as that whole number: 21.5 at scale 0.01 is
# 2150.0000000000005 steps in binary floating point.
_STEP_TOLERANCE = 1e-6
_RELATIVE_TOLERANCE = 1e-12


class InvalidValue(ValueError):
    """A value cannot be written to a point: of the wrong type, outside what the characteristic's
    type holds, or between two of the values it can hold. Raised before anything is sent."""

    def __init__(self, point: str, value: Any, reason: str) -> None:
        self.point = point
        self.value = value
        self.reason = reason
        super().__init__(f"{point}: cannot write {value!r}: {reason}")


def struct_fields(fmt: str) -> int:
    """How many values ``fmt`` unpacks to; raises ValueError naming what is wrong."""
    if not _FORMAT.match(fmt):
        raise ValueError(
            f"format {fmt!r} is not a struct format of b B h H i I l L q Q e f d ? x "
            "with an optional byte order < > !"
        )
    try:
        size = struct.calcsize(fmt)
    except struct.error as err:
        raise ValueError(f"format {fmt!r}: {err}") from err
    if size == 0:
        raise ValueError(f"format {fmt!r} reads no bytes")
    return len(_value_codes(fmt))


def _value_codes(fmt: str) -> list[str]:
    """The struct code of each value ``fmt`` unpacks to (repeat counts expanded, pads left out)."""
    codes: list[str] = []
    for number, code in re.findall(r"(\d*)([bBhHiIlLqQefd?x])", fmt):
        if code != "x":
            codes += [code] * (int(number) if number else 1)
    return codes


def write_problem(fmt: str) -> str | None:
    """Why a characteristic of (valid) format ``fmt`` cannot be written as one value, or None.

    A write replaces the whole characteristic, so its decode must be invertible from the one
    value written: a single field, and no pad bytes (the gateway does not know what the device
    keeps in them, and a write would overwrite them with zeros).
    """
    codes = _value_codes(fmt)
    if len(codes) != 1:
        return (
            f"format {fmt!r} holds {len(codes)} values; a write replaces the whole "
            "characteristic, so a writable one must hold exactly one"
        )
    if "x" in fmt:
        return f"format {fmt!r} has pad bytes, which a write would overwrite with zeros"
    return None


def _bits(fmt: str, code: str) -> int:
    """How many bits ``code`` takes in ``fmt``'s byte order and sizes (native without one)."""
    order = fmt[0] if fmt[0] in "<>!" else "@"
    return 8 * struct.calcsize(order + code)


def _int_range(fmt: str, code: str) -> tuple[int, int]:
    """The smallest and largest integer ``code`` holds in ``fmt``."""
    bits = _bits(fmt, code)
    if code.islower():
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _kind(fmt: str, code: str) -> str:
    """How an error names a field's type: an int16, a uint32, a float32, a bool."""
    if code == "?":
        return "a bool"
    bits = _bits(fmt, code)
    if not _CODES[code]:
        return f"a float{bits}"
    return f"an int{bits}" if code.islower() else f"a uint{bits}"


# The largest finite magnitude of each float code (beyond it struct refuses or gives inf).
_FLOAT_MAX = {"e": 65504.0, "f": 3.4028234663852886e38, "d": float("inf")}


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True, slots=True)
class Decoder:
    """Values of one characteristic: ``struct`` unpack, then scale and offset per field."""

    fmt: str
    fields: tuple[Field, ...]
    _struct: struct.Struct = dc_field(init=False, repr=False, compare=False)
    # (index, scale, offset) of the fields that are not passed through as read
    _scaled: tuple[tuple[int, float, float], ...] = dc_field(init=False, repr=False, compare=False)
    _codes: tuple[str, ...] = dc_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = struct.Struct(self.fmt)
        # Bools pass through; so do fields without scale or offset.
        codes = _value_codes(self.fmt)
        scaled = tuple(
            (i, f.scale, f.offset)
            for i, (f, code) in enumerate(zip(self.fields, codes, strict=False))
            if code != "?" and not (f.scale == 1.0 and f.offset == 0.0)
        )
        object.__setattr__(self, "_struct", compiled)
        object.__setattr__(self, "_scaled", scaled)
        object.__setattr__(self, "_codes", tuple(codes))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def size(self) -> int:
        return self._struct.size

    def decode(self, data: bytes | bytearray) -> list[Any]:
        """The engineering values; raises ValueError for a value of the wrong length."""
        if len(data) != self._struct.size:
            raise ValueError(f"{len(data)} bytes, the decode table expects {self._struct.size}")
        out = list(self._struct.unpack(data))
        for i, scale, offset in self._scaled:
            out[i] = out[i] * scale + offset
        return out

    def encode(self, values: Sequence[Any]) -> bytes:
        """The inverse of :meth:`decode` for raw (unscaled) values: the peripherals' side."""
        return self._struct.pack(*values)

    def encode_value(self, value: Any) -> bytes:
        """The bytes a writable (one-value) characteristic holds when it reads as ``value``:
        offset and scale undone, then packed in the format's type and byte order, so that
        :meth:`decode` gives ``value`` back (to the type's precision).

        Raises :class:`InvalidValue` (a ValueError) for a value of the wrong type (a bool field
        takes only true or false, a number field only numbers), one outside the type's range,
        not finite, or, for an integer field, not a whole number of raw steps; and ValueError
        for a table that is not writable (the config refuses those).
        """
        problem = write_problem(self.fmt)
        if problem is not None:
            raise ValueError(problem)
        code, name = self._codes[0], self.fields[0].name
        if code == "?":
            if not isinstance(value, bool):
                raise InvalidValue(name, value, "a bool field takes true or false")
            return self._struct.pack(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidValue(name, value, f"{_kind(self.fmt, code)} field takes a number")
        if not math.isfinite(value):
            raise InvalidValue(name, value, "not a finite number")
        field = self.fields[0]
        raw: int | float = value
        if field.scale != 1.0 or field.offset != 0.0:
            if field.scale == 0.0:
                raise ValueError(f"{name}: scale 0 cannot be inverted")
            raw = (value - field.offset) / field.scale
        if not math.isfinite(raw):  # a tiny scale made it overflow
            raise InvalidValue(name, value, f"outside what {_kind(self.fmt, code)} holds")
        if _CODES[code]:
            return self._struct.pack(self._whole(name, value, raw, code))
        largest = _FLOAT_MAX[code]
        if not abs(raw) <= largest:
            raise InvalidValue(
                name,
                value,
                f"outside what {_kind(self.fmt, code)} holds (magnitude up to {largest:g})",
            )
        return self._struct.pack(raw)

    def _whole(self, name: str, value: Any, raw: int | float, code: str) -> int:
        """``raw`` as the integer the field holds: whole (to a millionth of a step), in range."""
        low, high = _int_range(self.fmt, code)
        if isinstance(raw, int):
            whole = raw
        else:
            whole = round(raw)
            if abs(raw - whole) > max(_STEP_TOLERANCE, abs(raw) * _RELATIVE_TOLERANCE):
                field = self.fields[0]
                step = (
                    f"a whole number of steps of {field.scale:g}"
                    + (f" from {field.offset:g}" if field.offset else "")
                    if field.scale != 1.0 or field.offset != 0.0
                    else "a whole number"
                )
                raise InvalidValue(name, value, f"{_kind(self.fmt, code)} field holds only {step}")
        if not low <= whole <= high:
            field = self.fields[0]
            if field.scale == 1.0 and field.offset == 0.0:
                span = f"{low} to {high}"
            else:
                ends = sorted((low * field.scale + field.offset, high * field.scale + field.offset))
                span = f"{ends[0]:g} to {ends[1]:g}"
            raise InvalidValue(name, value, f"outside what {_kind(self.fmt, code)} holds ({span})")
        return whole


def address_bytes(address: str) -> bytes:
    """``AA:BB:CC:DD:EE:FF`` as the six bytes it names, most significant first."""
    if not re.match(ADDRESS_PATTERN, address):
        raise ValueError(f"not a Bluetooth address: {address!r}")
    return bytes.fromhex(address.replace(":", ""))


def challenge_response(key: bytes, nonce: bytes, identity_address: str) -> bytes:
    """What a genuine peripheral answers to ``nonce``: binds the key, the nonce and the address."""
    return hmac.new(key, nonce + address_bytes(identity_address), hashlib.sha256).digest()


def check_response(key: bytes, nonce: bytes, identity_address: str, response: bytes) -> bool:
    """Constant-time comparison of a peripheral's answer with the expected one."""
    return hmac.compare_digest(challenge_response(key, nonce, identity_address), bytes(response))


def read_key(text_or_bytes: bytes) -> bytes:
    """A challenge key file: hex text (64+ hex digits) or raw bytes (32+)."""
    stripped = text_or_bytes.strip()
    try:
        key = bytes.fromhex(stripped.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = text_or_bytes
    if len(key) < 32:
        raise ValueError(f"a challenge key must hold at least 32 bytes, this one has {len(key)}")
    return key


def device_path(adapter: str, address: str) -> str:
    """BlueZ's object path for a device: ``/org/bluez/hci0/dev_AA_BB_CC_DD_EE_FF``."""
    return f"/org/bluez/{adapter}/dev_{address.upper().replace(':', '_')}"
