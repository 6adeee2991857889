"""Pure BLE pieces: GATT decode tables, the HMAC challenge, addresses. No I/O, no bleak.

A characteristic's value is decoded by a frozen :class:`Decoder` built from the config's decode
table: one ``struct`` format and one row (name, scale, offset) per field. The challenge is
HMAC-SHA256(device key, nonce || identity address), the same function on both sides, so the
simulator's peripherals and the gateway cannot drift apart.
"""

from __future__ import annotations

import hashlib
import hmac
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
# counter u32, temperature 0.01 degC, humidity 0.01 %RH, battery %
MEASUREMENT_FORMAT = "<IhHB"
# supply mV, uptime s
STATUS_FORMAT = "<HI"


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
