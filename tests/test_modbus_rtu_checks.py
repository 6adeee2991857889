"""Pure RTU frame checks: CRC, unit, function code, byte count, exceptions, truncation."""

from __future__ import annotations

import pytest

from adapters.modbus import checks
from adapters.modbus.checks import Expected, check_rtu_response, crc16, rtu_frame, rtu_size

# Read 2 holding registers of unit 7 from address 10.
READ = Expected(0, 7, 3, 2, False, 10)
GOOD = rtu_frame(7, bytes([3, 4, 0x01, 0x02, 0x03, 0x04]))


def test_crc16_matches_the_modbus_specification() -> None:
    # The spec's example: 02 07 -> CRC 0x1241, sent 41 12.
    assert crc16(bytes([0x02, 0x07])) == 0x1241
    assert rtu_frame(2, bytes([7]))[-2:] == bytes([0x41, 0x12])
    # The well-known request: read 10 holding registers of unit 1 from address 0.
    assert rtu_frame(1, bytes([3, 0, 0, 0, 10])) == bytes.fromhex("01030000000ac5cd")


def test_a_correct_answer_is_used_whole_and_its_pdu_is_inside() -> None:
    verdict = check_rtu_response(GOOD, READ)
    assert verdict == checks.Verdict(len(GOOD)) and verdict.cause is None
    assert GOOD[1 : verdict.used - 2] == bytes([3, 4, 1, 2, 3, 4])


@pytest.mark.parametrize("cut", range(1, len(GOOD)))
def test_a_partial_frame_waits_for_more(cut: int) -> None:
    assert check_rtu_response(GOOD[:cut], READ) == checks.WAIT


def test_a_crc_error_is_malformed_and_uses_everything() -> None:
    bad = bytearray(GOOD)
    bad[4] ^= 0xFF
    assert check_rtu_response(bytes(bad), READ) == checks.Verdict(len(bad), checks.CRC)
    assert check_rtu_response(GOOD[:-1] + bytes([GOOD[-1] ^ 1]), READ).cause == checks.CRC


@pytest.mark.parametrize(
    ("frame", "cause"),
    [
        (rtu_frame(8, bytes([3, 4, 1, 2, 3, 4])), checks.WRONG_UNIT),
        (rtu_frame(7, bytes([4, 4, 1, 2, 3, 4])), checks.WRONG_FC),
        (rtu_frame(7, bytes([3, 2, 1, 2])), checks.WRONG_COUNT),
        (rtu_frame(7, bytes([3, 6, 1, 2, 3, 4, 5, 6])), checks.WRONG_COUNT),
        (GOOD + b"\x00", checks.TRAILING),
        (rtu_frame(7, bytes([0x2B, 0x0E, 1])), checks.WRONG_FC),  # a code that has no size
    ],
)
def test_wrong_answers_are_named(frame: bytes, cause: str) -> None:
    verdict = check_rtu_response(frame, READ)
    assert verdict.cause == cause and verdict.used == len(frame)


def test_an_exception_answer_is_correct_framing() -> None:
    frame = rtu_frame(7, bytes([0x83, 0x02]))
    assert check_rtu_response(frame, READ) == checks.Verdict(5)
    assert check_rtu_response(rtu_frame(7, bytes([0x84, 0x02])), READ).cause == checks.WRONG_FC


def test_a_write_answer_must_echo_address_and_count() -> None:
    write = Expected(0, 7, 16, 2, False, 40)
    assert check_rtu_response(rtu_frame(7, bytes([16, 0, 40, 0, 2])), write).cause is None
    assert check_rtu_response(rtu_frame(7, bytes([16, 0, 41, 0, 2])), write).cause == (
        checks.WRONG_ECHO
    )


def test_bytes_nobody_asked_for_are_unsolicited() -> None:
    assert check_rtu_response(GOOD, None) == checks.Verdict(len(GOOD), checks.UNSOLICITED)
    assert check_rtu_response(b"", READ) == checks.WAIT


def test_garbage_without_a_size_is_a_crc_error_once_too_long_for_a_frame() -> None:
    garbage = bytes([7, 0x2B]) + bytes(range(254))
    assert check_rtu_response(garbage[:40], READ) == checks.WAIT
    assert check_rtu_response(garbage, READ).cause == checks.CRC


def test_frame_sizes_follow_the_function_code() -> None:
    assert rtu_size(b"\x07") == 0
    assert rtu_size(b"\x07\x03") == 0  # the byte count is not there yet
    assert rtu_size(b"\x07\x03\x14") == 25  # 10 registers: the benchmark's answer
    assert rtu_size(b"\x07\x83") == 5
    assert rtu_size(b"\x07\x06") == 8
    assert rtu_size(b"\x07\x2b") is None


def test_a_device_identification_answer_is_framed_by_its_objects() -> None:
    """FC 43 / MEI 14 on RTU: the frame's length comes from its objects, so an answer is
    taken whole, a cut one waits, and a lying object length is a CRC error, never a PDU."""
    asked = Expected(0, 7, checks.DEVICE_IDENTIFICATION, 2, False, 0)  # regular, from object 0
    objects = bytes([0, 3]) + b"ACM" + bytes([1, 2]) + b"X1"
    pdu = bytes([0x2B, 0x0E, 2, 0x82, 0x00, 0x00, 2]) + objects
    frame = rtu_frame(7, pdu)
    assert check_rtu_response(frame, asked) == checks.Verdict(len(frame))
    for cut in range(1, len(frame)):
        assert check_rtu_response(frame[:cut], asked) == checks.WAIT
    lying = bytearray(frame)
    lying[9] = 200  # the first object claims 200 bytes: no CRC closes the frame there
    assert check_rtu_response(bytes(lying) + bytes(250), asked).cause == checks.CRC
    # An identification answer to a read is a wrong function code, as before.
    assert check_rtu_response(frame, READ).cause == checks.WRONG_FC
