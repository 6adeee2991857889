"""Pure: does a Modbus response match its request (TCP and RTU framing), and how a device's
wrong answers are told.

:func:`check_response` judges the bytes received for the one request in flight on a connection:
transaction id, unit id, function code (or its exception), byte count against what was asked,
and the MBAP length against the frame, with no byte before or after it. pymodbus skips frames
with a wrong transaction or unit id and decodes whatever function code arrives; the client
module runs this check on the raw frame first (:mod:`adapters.modbus.transport` owns pymodbus).
A write's answer must echo the address (and, for FC 15 and 16, the count; for FC 5 and 6 the
value, when the caller gives it) it was sent; a Read Device Identification answer (FC 43 /
MEI 14) must echo the read code and hold exactly the objects it counts.

:func:`check_rtu_response` does the same for RTU frames (serial, or RTU through a TCP socket):
unit id, function code, a CRC-16 over the frame, the byte count, and nothing after the frame.
RTU has no length field and no transaction id: a frame's length follows from its function code
(and byte count), and a frame whose function code says nothing of its length is complete only
once a CRC closes it. A bad RTU frame never needs the connection closed: nothing more is read
from it, and the next request starts on a line that has been silent for a frame gap.

:class:`Misbehaviour` turns a stream of wrong answers into log lines once per transition: one
warning when a device starts answering wrongly, counts at most every ``every`` seconds while it
goes on, and one line with the counts when it has answered correctly for ``settle`` seconds.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field

MBAP_SIZE = 7  # transaction id, protocol id, length, unit id
MAX_LENGTH = 254  # the MBAP length field: unit id + a PDU of at most 253 bytes

# Causes, one name each; ``resync``: the stream is out of step, close the connection.
BAD_HEADER = "not an MBAP frame"
TRAILING = "trailing bytes"
LENGTH = "length mismatch"
TRUNCATED = "truncated frame"
UNSOLICITED = "unsolicited data"
WRONG_TID = "wrong transaction id"
WRONG_UNIT = "wrong unit id"
WRONG_FC = "wrong function code"
WRONG_COUNT = "wrong byte count"
UNDECODABLE = "undecodable response"
WRONG_ECHO = "wrong write echo"
CRC = "crc"
RESYNC = frozenset({BAD_HEADER, TRAILING, LENGTH, TRUNCATED, UNSOLICITED, UNDECODABLE})


@dataclass(frozen=True, slots=True)
class Expected:
    """What the answer to one request must be."""

    transaction_id: int
    unit: int
    function_code: int
    count: int  # registers, or bits
    bits: bool
    address: int = 0  # writes: the answer echoes the address (and the count, FC 15 and 16)
    value: int | None = None  # FC 5 and 6: the value sent (FC 5: 0xFF00 or 0), echoed back

    @property
    def byte_count(self) -> int:
        return (self.count + 7) // 8 if self.bits else 2 * self.count


@dataclass(frozen=True, slots=True)
class Verdict:
    """``used`` bytes judged (0: wait for more); ``cause`` None: a correct answer, whose PDU is
    ``data[MBAP_SIZE:used]``."""

    used: int
    cause: str | None = None

    @property
    def resync(self) -> bool:
        return self.cause in RESYNC


WAIT = Verdict(0)


def check_response(data: bytes, expected: Expected | None) -> Verdict:
    """Judge ``data``, everything received since the request was sent."""
    if not data:
        return WAIT
    if expected is None:
        return Verdict(len(data), UNSOLICITED)
    if len(data) >= 4 and data[2:4] != b"\x00\x00":
        return Verdict(len(data), BAD_HEADER)
    if len(data) < MBAP_SIZE:
        return WAIT
    tid, _pid, length, unit = struct.unpack_from(">HHHB", data)
    if not 3 <= length <= MAX_LENGTH:  # unit id, function code, at least one byte
        return Verdict(len(data), BAD_HEADER)
    end = 6 + length
    if len(data) < end:
        return WAIT
    if len(data) > end:
        return Verdict(len(data), TRAILING)
    pdu = data[MBAP_SIZE:end]
    function_code = pdu[0]
    if tid != expected.transaction_id:
        return Verdict(end, WRONG_TID)
    if unit != expected.unit:
        return Verdict(end, WRONG_UNIT)
    if function_code == expected.function_code | 0x80:
        return Verdict(end, TRAILING if len(pdu) > 2 else None)
    if function_code != expected.function_code:
        return Verdict(end, WRONG_FC)
    if function_code in WRITE_CODES:
        return _check_echo(pdu, expected, end)
    if function_code == DEVICE_IDENTIFICATION:
        return _check_identification(pdu, expected, end)
    byte_count = pdu[1]
    if byte_count > len(pdu) - 2:
        return Verdict(end, LENGTH)
    if byte_count < len(pdu) - 2:
        return Verdict(end, TRAILING)
    if byte_count != expected.byte_count:
        return Verdict(end, WRONG_COUNT)
    return Verdict(end)


# Write single coil, single register, multiple coils, multiple registers: the answer is the
# function code and four bytes (the address, then the value or the count).
WRITE_CODES = frozenset({5, 6, 15, 16})


# FC 43 / MEI 14, Read Device Identification: its answer is MEI type, read code, conformity,
# more follows, next object id, the number of objects, then (id, length, value) per object.
# ``Expected.count`` carries the read code asked for, ``Expected.address`` the object id.
DEVICE_IDENTIFICATION = 0x2B
MEI_READ_DEVICE_ID = 0x0E


def _check_identification(pdu: bytes, expected: Expected, end: int) -> Verdict:
    if len(pdu) < 7:
        return Verdict(end, LENGTH)
    if pdu[1] != MEI_READ_DEVICE_ID or pdu[2] != expected.count or pdu[4] not in (0x00, 0xFF):
        return Verdict(end, UNDECODABLE)
    at, objects = 7, pdu[6]
    for _ in range(objects):
        if at + 2 > len(pdu) or at + 2 + pdu[at + 1] > len(pdu):
            return Verdict(end, LENGTH)
        at += 2 + pdu[at + 1]
    if at != len(pdu):
        return Verdict(end, TRAILING)
    return Verdict(end)


def _check_echo(pdu: bytes, expected: Expected, end: int) -> Verdict:
    if len(pdu) < 5:
        return Verdict(end, LENGTH)
    if len(pdu) > 5:
        return Verdict(end, TRAILING)
    address, second = struct.unpack_from(">HH", pdu, 1)
    if address != expected.address:
        return Verdict(end, WRONG_ECHO)
    if pdu[0] in (15, 16) and second != expected.count:
        return Verdict(end, WRONG_ECHO)
    if pdu[0] in (5, 6) and expected.value is not None and second != expected.value:
        return Verdict(end, WRONG_ECHO)  # the answer is an echo of the request, value too
    return Verdict(end)


# -- RTU: unit id, PDU, CRC-16 (Modbus polynomial 0xA001 reflected, initial 0xFFFF, low byte
# first on the wire) --

RTU_MIN = 4  # unit id, function code, CRC
RTU_MAX = 256  # the serial line PDU limit (253) plus unit id and CRC


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """The Modbus CRC-16 of ``data``, as an int (sent low byte first)."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def rtu_frame(unit: int, pdu: bytes) -> bytes:
    """``pdu`` framed for RTU: the unit id, the PDU, the CRC low byte first."""
    body = bytes([unit]) + pdu
    return body + crc16(body).to_bytes(2, "little")


def _crc_ok(frame: bytes) -> bool:
    return crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def rtu_size(data: bytes) -> int | None:
    """The length of the RTU response frame that ``data`` starts with, from its function code
    (and byte count): 0 when more bytes are needed to tell, None when the function code does
    not say (not a response to any request fieldgate sends)."""
    if len(data) < 2:
        return 0
    function_code = data[1]
    if function_code & 0x80:
        return 5  # unit, code | 0x80, exception code, CRC
    if function_code in (1, 2, 3, 4):
        return 0 if len(data) < 3 else 5 + data[2]
    if function_code in WRITE_CODES:
        return 8  # unit, code, address, value or count, CRC
    return None


def _identification_size(data: bytes) -> int:
    """An RTU FC 43 / MEI 14 answer's length, walked from its object count and the length of
    each object (0: more bytes are needed to tell)."""
    if len(data) < 8:  # unit, code, MEI type, read code, conformity, more, next id, count
        return 0
    at = 8
    for _ in range(data[7]):
        if at + 2 > len(data):
            return 0
        at += 2 + data[at + 1]
    return min(at + 2, RTU_MAX)


def check_rtu_response(data: bytes, expected: Expected | None) -> Verdict:
    """Judge ``data``, everything received since the RTU request was sent; a correct answer's
    PDU is ``data[1:used - 2]``. Every bad verdict uses all of ``data``: RTU resyncs by the
    silence before the next request, not by parsing on."""
    if not data:
        return WAIT
    if expected is None:
        return Verdict(len(data), UNSOLICITED)
    asked_identification = expected.function_code == DEVICE_IDENTIFICATION
    if asked_identification and len(data) >= 2 and data[1] == DEVICE_IDENTIFICATION:
        size: int | None = _identification_size(data)  # FC 43 answers: walked object by object
    else:
        size = rtu_size(data)
    if size is None:
        # A function code that says nothing of its length: a frame only once a CRC closes it.
        for end in range(RTU_MIN, min(len(data), RTU_MAX) + 1):
            if _crc_ok(data[:end]):
                cause = WRONG_UNIT if data[0] != expected.unit else WRONG_FC
                return Verdict(len(data), cause if end == len(data) else TRAILING)
        return Verdict(len(data), CRC) if len(data) >= RTU_MAX else WAIT
    if size == 0 or len(data) < size:
        return WAIT
    frame = data[:size]
    if not _crc_ok(frame):
        return Verdict(len(data), CRC)
    if len(data) > size:
        return Verdict(len(data), TRAILING)
    if frame[0] != expected.unit:
        return Verdict(size, WRONG_UNIT)
    pdu = frame[1:-2]
    function_code = pdu[0]
    if function_code == expected.function_code | 0x80:
        return Verdict(size)
    if function_code != expected.function_code:
        return Verdict(size, WRONG_FC)
    if function_code in WRITE_CODES:
        return _check_echo(pdu, expected, size)
    if function_code == DEVICE_IDENTIFICATION:
        return _check_identification(pdu, expected, size)
    if pdu[1] != expected.byte_count:
        return Verdict(size, WRONG_COUNT)
    return Verdict(size)


@dataclass(slots=True)
class Misbehaviour:
    """A device's wrong answers (malformed responses, Modbus exceptions), told per transition."""

    device_id: str
    every: float = 60.0
    settle: float = 10.0
    counts: Counter[str] = field(default_factory=Counter)
    since: float | None = None  # when the current episode began; None: answering correctly
    last_bad: float = 0.0
    _reported: float = 0.0

    def bad(self, cause: str, now: float) -> str | None:
        """Count one wrong answer; returns a line to log, if one is due."""
        self.last_bad = now
        if self.since is None:
            self.since, self._reported = now, now
            self.counts.clear()
            self.counts[cause] += 1
            return f"{self.device_id}: answering wrongly: {cause}"
        self.counts[cause] += 1
        if now - self._reported >= self.every:
            self._reported = now
            return f"{self._summary(now)}; still answering wrongly"
        return None

    def good(self, now: float) -> str | None:
        """A correct answer; returns the closing line of an episode once it has settled."""
        if self.since is None or now - self.last_bad < self.settle:
            return None
        line = f"{self._summary(now)}; now answering correctly"
        self.since = None
        return line

    def at_stop(self, now: float) -> str | None:
        """The counts of an episode still going on when polling stops, so none are lost."""
        if self.since is None:
            return None
        return f"{self._summary(now)}; still answering wrongly when polling stopped"

    def _summary(self, now: float) -> str:
        assert self.since is not None
        total = sum(self.counts.values())
        causes = ", ".join(f"{cause} {n:,}" for cause, n in self.counts.most_common())
        noun = "wrong answer" if total == 1 else "wrong answers"
        return f"{self.device_id}: {total:,} {noun} ({causes}) in {now - self.since:.0f} s"
