"""What a Modbus device is, as config: its endpoint (its own TCP host, or a unit on one of the
configured links: ``tcp``, ``rtu``, ``rtu-over-tcp``) and its register map (rows of
:class:`Point`). The adapter's own models, so that the adapter builds on ``gateway.core`` only;
``gateway.config`` composes them into a device entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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

    @model_validator(mode="after")
    def _where(self) -> ModbusEndpoint:
        if (self.host is None) == (self.link is None):
            raise ValueError(
                "give either host (the device's own TCP connection) or link (a [[links]] name)"
            )
        if self.link is not None:
            owned = sorted({"port", "timeout"} & self.model_fields_set)
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
    # "tls": "modbus-tls",  (Modbus/TCP Security: branch mbtls adds its link type here)
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
    def label(self) -> str:
        raise NotImplementedError


class TcpLink(_LinkBase):
    """Modbus TCP (MBAP framing) to one host: a device, or a gateway to the units behind it.
    One connection, as gateways that accept 1 to 4 connections need."""

    type: Literal["tcp"]
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)

    @property
    def label(self) -> str:
        return f"tcp {self.host}:{self.port}"


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


# The link types a config may name; Modbus/TCP Security (``tls``, branch mbtls) joins here.
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
    )
