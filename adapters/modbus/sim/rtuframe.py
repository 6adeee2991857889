"""Modbus RTU framing and serial-line timing for the simulated buses: pure functions, no I/O.

The simulated line needs three facts a pymodbus server keeps to itself: where a request frame
ends (RTU has no length prefix: the length follows from the function code, or the frame ends at
3.5 characters of silence), the CRC, and how long characters take on the wire. They live here,
once, so the serial line, RTU over TCP and the tests agree on them. The CRC is computed here
rather than taken from the gateway's :mod:`adapters.modbus.checks` on purpose: a simulator that
shared the checker's CRC could not catch a mistake in it.
"""

from __future__ import annotations

from dataclasses import dataclass

GAP_CHARS = 3.5  # silence between frames, in characters (Modbus over serial line, 2.5.1.1)
MIN_FRAME = 4  # unit, function, CRC (2)


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = 0
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if (byte ^ crc) & 1 else crc >> 1
            byte >>= 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> bytes:
    """The Modbus CRC of ``data`` as it goes on the wire (low byte first)."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc.to_bytes(2, "little")


def frame(unit: int, pdu: bytes) -> bytes:
    """An RTU frame: unit id, PDU, CRC."""
    body = bytes([unit]) + pdu
    return body + crc16(body)


def check(adu: bytes) -> tuple[int, bytes] | None:
    """(unit, PDU) of a received frame, or None if it is too short or its CRC is wrong."""
    if len(adu) < MIN_FRAME or crc16(adu[:-2]) != adu[-2:]:
        return None
    return adu[0], adu[1:-2]


def corrupt(adu: bytes) -> bytes:
    """The same frame with its CRC inverted: the fault ``crc:N`` sends these."""
    return adu[:-2] + bytes(b ^ 0xFF for b in adu[-2:])


# Request lengths by function code, for a server reading a master's frames: fixed, or
# (position of a byte count, bytes after it that it does not count).
_FIXED = {1: 8, 2: 8, 3: 8, 4: 8, 5: 8, 6: 8, 7: 4, 8: 8, 11: 4, 12: 4, 17: 4, 24: 6}
_COUNTED = {15: 6, 16: 6, 23: 10}


def request_length(buf: bytes) -> int | None:
    """How long the request frame at the start of ``buf`` is, in bytes; 0 if more bytes are
    needed to tell; None if its function code has no known length (the frame then ends at
    the line's silence)."""
    if len(buf) < 2:
        return 0
    function = buf[1]
    if function in _FIXED:
        return _FIXED[function]
    if function in _COUNTED:
        pos = _COUNTED[function]
        return 0 if len(buf) <= pos else pos + 1 + buf[pos] + 2
    if function == 0x2B:  # encapsulated interface: MEI 14 (read device identification)
        if len(buf) < 3:
            return 0
        return 7 if buf[2] == 0x0E else None
    return None


@dataclass(frozen=True)
class LineTiming:
    """Character timing of a serial line: 1 start bit, 8 data bits, parity, stop bits.

    Parity defaults to none, although Modbus says even: Linux (6.x here) refuses PARENB on a
    pty (``tcsetattr`` answers EINVAL), so a pty pair can only be opened as 8N1. Parity here
    is the timing model only (11 bits a character instead of 10)."""

    baud: int
    parity: str = "N"  # N, E or O
    stopbits: int = 1

    def __post_init__(self) -> None:
        if self.baud <= 0:
            raise ValueError(f"baud must be positive, not {self.baud}")
        if self.parity not in ("N", "E", "O"):
            raise ValueError(f"parity must be N, E or O, not {self.parity!r}")
        if self.stopbits not in (1, 2):
            raise ValueError(f"stop bits must be 1 or 2, not {self.stopbits}")

    @property
    def bits_per_char(self) -> int:
        return 1 + 8 + (0 if self.parity == "N" else 1) + self.stopbits

    @property
    def char_time(self) -> float:
        """Seconds one character takes on the wire."""
        return self.bits_per_char / self.baud

    @property
    def gap(self) -> float:
        """The 3.5-character silence that ends a frame, in seconds."""
        return GAP_CHARS * self.char_time

    def wire_time(self, nbytes: int) -> float:
        return nbytes * self.char_time

    def exchange_time(self, request: int, response: int) -> float:
        """Seconds from a request's first byte to its response's last: both frames and the
        gap before the response (the least a master can see; the benchmarks' theoretical
        rate adds the gap before the next request)."""
        return self.wire_time(request) + self.gap + self.wire_time(response)
