"""What a Modbus device is, as config: its endpoint (its own TCP host, plain or Modbus/TCP
Security with :class:`ModbusTls`, or a unit on one of the configured links: ``tcp``, ``rtu``,
``rtu-over-tcp``), how it is verified (:class:`ModbusIdentity`) and its register map (rows of
:class:`Point`). The adapter's own models, so that the adapter builds on ``gateway.core`` only;
``gateway.config`` composes them into a device entry.
"""

from __future__ import annotations

import abc
import re
import ssl
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Table = Literal["holding", "input", "coil", "discrete"]
PointType = Literal["int16", "uint16", "int32", "uint32", "float32", "float64", "bool"]
Order = Literal["big", "little"]

# Registers (16-bit words) each type occupies; a bool occupies one register or one bit.
REGISTER_WIDTH: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "float64": 4,
    "bool": 1,
}

# The point names the gateway accepts: safe in a message, a log line and a metric label.
NAME_PATTERN = r"^[A-Za-z0-9_.:/-]+$"


class _Model(BaseModel):
    # No float here means anything as nan or inf: a scale of nan would turn every reading into nan.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Point(_Model):
    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    address: int = Field(ge=0, le=65535)
    table: Table = "holding"
    type: PointType = "uint16"
    word_order: Order = "big"
    byte_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    period: float = Field(default=1.0, ge=0.01, le=86_400, description="seconds between polls")
    unit: str | None = Field(default=None, max_length=16)

    @model_validator(mode="after")
    def _fits(self) -> Point:
        if self.table in ("coil", "discrete") and self.type != "bool":
            raise ValueError(
                f"table {self.table!r} holds bits; type must be 'bool', not {self.type!r}"
            )
        if self.address + REGISTER_WIDTH[self.type] > 65536:
            raise ValueError(f"{self.type} at address {self.address} runs past register 65535")
        return self

    @property
    def writable(self) -> bool:
        """Holding registers and coils take writes; input registers and discrete inputs do not."""
        return self.table in ("holding", "coil")


def _span(point: Point) -> str:
    if point.table in ("coil", "discrete"):
        return f"{point.table} {point.address}"
    last = point.address + REGISTER_WIDTH[point.type] - 1
    where = f"{point.address}" if last == point.address else f"{point.address}-{last}"
    return f"{point.table} {where}"


def overlapping_points(points: Sequence[Point]) -> str | None:
    """Two points of one device that read the same register or bit, named, or None."""

    def end(point: Point) -> int:
        bits = point.table in ("coil", "discrete")
        return point.address + (1 if bits else REGISTER_WIDTH[point.type])

    order = sorted(range(len(points)), key=lambda i: (points[i].table, points[i].address))
    widest: int | None = None  # the point reaching furthest so far, in the current table
    for i in order:
        point = points[i]
        if widest is not None and points[widest].table != point.table:
            widest = None
        if widest is not None and point.address < end(points[widest]):
            first, second = sorted((widest, i))
            a, b = points[first], points[second]
            return (
                f"points[{second}] {b.name!r} ({_span(b)}) overlaps points[{first}] {a.name!r} "
                f"({_span(a)})"
            )
        if widest is None or end(point) > end(points[widest]):
            widest = i
    return None


def too_wide(points: Sequence[Point], max_registers: int) -> str | None:
    """The first point that one read of at most ``max_registers`` registers cannot hold."""
    for index, point in enumerate(points):
        width = REGISTER_WIDTH[point.type]
        if point.table in ("holding", "input") and width > max_registers:
            return (
                f"points[{index}] {point.name!r} ({point.type}) takes {width} registers, more "
                f"than max_registers = {max_registers} allows in one read"
            )
    return None


def point_problems(points: Sequence[Point]) -> str | None:
    """What is wrong with a device's register map as a whole (a name twice, an overlap)."""
    seen: set[str] = set()
    for point in points:
        if point.name in seen:
            return f"point name {point.name!r} is used twice"
        seen.add(point.name)
    return overlapping_points(points)


class ModbusEndpoint(_Model):
    """A device's ``modbus`` table: either its own TCP endpoint (``host``, ``port``: one
    connection for this device alone, an implicit ``tcp`` link) or a unit on a configured link
    (``link``, the name of a ``[[links]]`` entry, which then owns host, port and timeout)."""

    host: str | None = Field(default=None, min_length=1)
    # 502: Modbus TCP. A device speaking Modbus/TCP Security (``tls``) listens on 802.
    port: int = Field(default=502, ge=1, le=65535)
    link: str | None = Field(default=None, description="the name of a [[links]] entry")
    # Modbus TCP carries a one-byte unit id; gateways to serial buses use all 256 of them. A
    # serial link narrows this to 1..247 (checked where the link is known).
    unit: int = Field(default=1, ge=0, le=255)
    timeout: float = Field(default=1.0, gt=0, le=60)
    max_gap: int = Field(
        default=8, ge=0, le=124, description="registers a read may skip to coalesce"
    )
    max_registers: int = Field(
        default=125, ge=1, le=125, description="registers one read may ask for (FC 3/4)"
    )
    max_bits: int = Field(default=2000, ge=1, le=2000, description="bits one read may ask for")
    # Modbus/TCP Security: mutual TLS with the device (None: plain Modbus TCP).
    tls: ModbusTls | None = None

    @model_validator(mode="after")
    def _where(self) -> ModbusEndpoint:
        if (self.host is None) == (self.link is None):
            raise ValueError(
                "give either host (the device's own TCP connection) or link (a [[links]] name)"
            )
        if self.link is not None:
            owned = sorted({"port", "timeout", "tls"} & self.model_fields_set)
            if owned:
                raise ValueError(
                    f"{', '.join(owned)}: set on links entry {self.link!r}, which this device "
                    "shares with the other units on it"
                )
        return self

    @property
    def label(self) -> str:
        """How the endpoint is named in evidence, logs and the registry: the device's own
        host and port, or the link's name, with the unit."""
        where = f"{self.host}:{self.port}" if self.link is None else self.link
        return f"{where}/unit {self.unit}"

    def on(self, link: ModbusLinkConfig) -> ModbusEndpoint:
        """This unit's settings on ``link``: the read limits it does not set are the link's."""
        update: dict[str, object] = {"timeout": link.timeout}
        for name in ("max_gap", "max_registers", "max_bits"):
            if name not in self.model_fields_set:
                update[name] = getattr(link, name)
        return self.model_copy(update=update)


# -- links: the physical paths to devices, shared by the units on them --

# As a device id: an implicit link is named after its one device.
LINK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
Parity = Literal["N", "E", "O"]

# What an Evidence's transport says, per link type.
TRANSPORTS: dict[str, str] = {
    "tcp": "modbus-tcp",
    "rtu": "modbus-rtu",
    "rtu-over-tcp": "modbus-rtu-over-tcp",
    # Modbus/TCP Security is a tcp link (or a device's own host) with a ``tls`` table.
}
# The unit ids a link type can address: RTU has 0 as broadcast (no answer) and 248..255
# reserved; Modbus TCP carries any byte.
UNIT_RANGES: dict[str, tuple[int, int]] = {"rtu": (1, 247)}


class _LinkBase(_Model):
    name: str = Field(pattern=LINK_NAME_PATTERN)
    timeout: float = Field(
        default=1.0, gt=0, le=60, description="seconds for an answer to one request"
    )
    max_gap: int = Field(default=8, ge=0, le=124)
    max_registers: int = Field(default=125, ge=1, le=125)
    max_bits: int = Field(default=2000, ge=1, le=2000)
    max_in_flight: int = Field(
        default=1,
        ge=1,
        description="requests on the wire at once; 1 (pymodbus sends one at a time per client)",
    )

    @field_validator("max_in_flight")
    @classmethod
    def _one_at_a_time(cls, value: int) -> int:
        if value != 1:
            raise ValueError(
                f"{value}: a link keeps one connection and pymodbus 3.16 sends one request at a "
                "time on it (a lock per client), so only 1 is possible"
            )
        return value

    @property
    def transport(self) -> str:
        return TRANSPORTS[self.type]  # type: ignore[attr-defined]

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """How the link is named in logs and errors: its type and where."""


class TcpLink(_LinkBase):
    """Modbus TCP (MBAP framing) to one host: a device, or a gateway to the units behind it.
    One connection, as gateways that accept 1 to 4 connections need."""

    type: Literal["tcp"]
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)
    # Modbus/TCP Security: mutual TLS with the host (None: plain Modbus TCP).
    tls: ModbusTls | None = None

    @property
    def label(self) -> str:
        return f"{'tls' if self.tls is not None else 'tcp'} {self.host}:{self.port}"


class RtuOverTcpLink(_LinkBase):
    """RTU frames (CRC, no MBAP header) through a TCP socket, as cheap serial servers do: one
    request on the wire at a time, like the bus behind it."""

    type: Literal["rtu-over-tcp"]
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)

    @property
    def label(self) -> str:
        return f"rtu-over-tcp {self.host}:{self.port}"


class RtuLink(_LinkBase):
    """Modbus RTU on a serial port (RS-485, or a pty in tests): one request on the wire at a
    time, always, and a silent gap between frames."""

    type: Literal["rtu"]
    port: str = Field(min_length=1, description="serial device path, e.g. /dev/ttyUSB0")
    baud: int = Field(default=19200, ge=300, le=4_000_000)
    parity: Parity = Field(default="E", description="N, E or O (Modbus says even by default)")
    stop_bits: Literal[1, 2] = 1
    byte_size: Literal[7, 8] = 8
    frame_gap: float | None = Field(
        default=None,
        gt=0,
        le=1.0,
        description="seconds of silence between frames (default 3.5 characters)",
    )

    @property
    def char_bits(self) -> int:
        """Bits on the wire per character: start, data, parity (if any), stop."""
        return 1 + self.byte_size + (0 if self.parity == "N" else 1) + self.stop_bits

    @property
    def char_time(self) -> float:
        return self.char_bits / self.baud

    @property
    def gap(self) -> float:
        """The silence kept between frames: ``frame_gap``, or 3.5 character times (the
        Modbus spec suggests a fixed 1.75 ms above 19,200 baud: set ``frame_gap = 0.00175``)."""
        return self.frame_gap if self.frame_gap is not None else 3.5 * self.char_time

    @property
    def label(self) -> str:
        return f"rtu {self.port}"


# The link types a config may name (Modbus/TCP Security: a ``tcp`` link with ``tls``).
ModbusLinkConfig = Annotated[TcpLink | RtuOverTcpLink | RtuLink, Field(discriminator="type")]


def implicit_link(device_id: str, endpoint: ModbusEndpoint) -> TcpLink:
    """The one-device TCP link of a device that gives its own ``host`` (named after it)."""
    assert endpoint.host is not None
    return TcpLink(
        name=device_id,
        type="tcp",
        host=endpoint.host,
        port=endpoint.port,
        timeout=endpoint.timeout,
        max_gap=endpoint.max_gap,
        max_registers=endpoint.max_registers,
        max_bits=endpoint.max_bits,
        tls=endpoint.tls,
    )


# -- Modbus/TCP Security --------------------------------------------------------------------

# The Modbus Organization's TLS profile listens on 802 (plain Modbus TCP on 502).
SECURE_PORT = 802


def _path(value: Path, info: ValidationInfo) -> Path:
    """Relative to the config file's folder (validation context ``base``), as every path of
    a gateway config is (:mod:`gateway.config.models`, which the adapter may not import)."""
    base = (info.context or {}).get("base")
    path = value.expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    if (info.context or {}).get("check_files", True) and not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


def _checks_files(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("check_files", True))


class ModbusTls(_Model):
    """Mutual TLS with a device (Modbus/TCP Security): the CA that issued the device's
    certificate, the gateway's client certificate (carrying its Modbus role, see ``fieldgate
    pki issue --modbus-role``) and its key, encrypted under the gateway's passphrase.

    Devices are addressed by IP, so the device's certificate is checked against ``ca`` only;
    ``server_name`` adds a name check (a DNS name or an IP the certificate must name), and
    ``fingerprint`` pins the device's certificate itself (SHA-256 of its DER, hex with or
    without colons), checked after the handshake."""

    ca: Path
    cert: Path
    key: Path
    fingerprint: str | None = None
    server_name: str | None = Field(default=None, min_length=1, max_length=253)

    @field_validator("cert")
    @classmethod
    def _cert(cls, value: Path, info: ValidationInfo) -> Path:
        return _path(value, info)

    @field_validator("ca")
    @classmethod
    def _ca(cls, value: Path, info: ValidationInfo) -> Path:
        path = _path(value, info)
        if _checks_files(info):
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
            except (ssl.SSLError, ValueError) as err:
                why = getattr(err, "reason", None) or err
                raise ValueError(
                    f"{path} holds no PEM certificates that TLS can load ({why})"
                ) from None
        return path

    @field_validator("key")
    @classmethod
    def _key(cls, value: Path, info: ValidationInfo) -> Path:
        path = _path(value, info)
        if _checks_files(info):
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise ValueError(
                    f"{path} is mode {mode:04o}: group or others may read it; chmod 600 {path}"
                )
        return path

    @field_validator("fingerprint")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digits = value.strip().lower().removeprefix("sha256:").replace(":", "")
        if not re.fullmatch(r"[0-9a-f]{64}", digits):
            raise ValueError(
                "a SHA-256 fingerprint is 64 hex digits (colons allowed), e.g. the output of "
                "`openssl x509 -noout -fingerprint -sha256 -in device.pem`"
            )
        return digits


ModbusEndpoint.model_rebuild()
TcpLink.model_rebuild()


# -- identity: how a device proves it is the one the registry enrolled --

IdentityFormat = Literal["ascii", "hex", "uint"]
# FC 43 / MEI 14 object ids and the names their values carry in a fingerprint (basic: 0-2,
# regular: 3-6); other objects a device offers are named ``object_0xNN``.
FC43_OBJECTS: dict[int, str] = {
    0x00: "vendor",
    0x01: "product_code",
    0x02: "revision",
    0x03: "vendor_url",
    0x04: "product_name",
    0x05: "model_name",
    0x06: "user_application_name",
}
DEFAULT_RECHECK = 300.0
# Evidence keys that say how a fingerprint was read (recorded, never compared).
# A TLS device's handshake facts (version, its certificate's SHA-256) ride along the same way.
IDENTITY_NOTES = ("identity_source", "fc43", "tls_version", "tls_peer_sha256")


class IdentityRegister(_Model):
    """Registers that hold an identity value (a serial number): read, formatted, pinned."""

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    table: Literal["holding", "input"] = "holding"
    address: int = Field(ge=0, le=65535)
    count: int = Field(default=1, ge=1, le=125)
    format: IdentityFormat = Field(
        default="ascii", description="ascii: 2 characters a register; hex; uint: one integer"
    )

    @model_validator(mode="after")
    def _fits(self) -> IdentityRegister:
        if self.address + self.count > 65536:
            raise ValueError(f"{self.count} registers at {self.address} run past register 65535")
        if self.format == "uint" and self.count > 4:
            raise ValueError(f"format 'uint' takes at most 4 registers, not {self.count}")
        return self


class ModbusIdentity(_Model):
    """How a Modbus device is verified: FC 43 device identification and/or identity registers,
    checked at every connect, on coming back after failed reads, and every ``recheck`` seconds.
    ``identity = "none"`` in a config is ``none = true`` here: a device that cannot be
    verified, admitted and shown as unverified."""

    none: bool = False
    fc43: bool = Field(default=False, description="Read Device Identification (FC 43 / MEI 14)")
    registers: list[IdentityRegister] = Field(default_factory=list)
    recheck: float = Field(
        default=DEFAULT_RECHECK, ge=1, le=86_400, description="seconds between identity checks"
    )

    @model_validator(mode="before")
    @classmethod
    def _none(cls, value: object) -> object:
        if isinstance(value, str):
            if value != "none":
                raise ValueError(
                    f'{value!r}: write identity = "none", or a [devices.identity] table '
                    "with fc43 = true and/or registers = [...]"
                )
            return {"none": True}
        return value

    @model_validator(mode="after")
    def _method(self) -> ModbusIdentity:
        if self.none and (self.fc43 or self.registers):
            raise ValueError('identity "none" cannot also name fc43 or registers')
        if not self.none and not (self.fc43 or self.registers):
            raise ValueError(
                'give fc43 = true and/or registers = [...], or write identity = "none" '
                "for a device that cannot be verified"
            )
        seen: set[str] = set()
        for i, register in enumerate(self.registers):
            if register.name in seen:
                raise ValueError(f"registers[{i}]: name {register.name!r} is used twice")
            if register.name in IDENTITY_NOTES:
                raise ValueError(f"registers[{i}]: name {register.name!r} is reserved")
            if self.fc43 and register.name in FC43_OBJECTS.values():
                raise ValueError(
                    f"registers[{i}]: name {register.name!r} is an FC 43 object's name"
                )
            seen.add(register.name)
        return self

    @property
    def verified(self) -> bool:
        return not self.none
