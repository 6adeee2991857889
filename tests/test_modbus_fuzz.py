"""Fuzz (issue 11): malformed Modbus answers never crash the gateway and never become readings.

Three levels: the pure check of a response against its request (thousands of seeded mutations
of correct answers, judged against an oracle written independently of :mod:`.checks`); the
link against the hostile device's seeded window of malformed answers, beside a pymodbus
device that must not notice; and the real ``fieldgate`` process delivering to the hub stand-in.

The pure fuzz is written per framing (:class:`Framing`): MBAP today; an RTU variant adds one
``Framing`` (its wrap, a CRC reseal, an oracle) and reuses the requests, the correct answers
and the mutations.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import struct
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adapters.base import DeviceHealth
from adapters.modbus import checks
from adapters.modbus.checks import MBAP_SIZE, WRITE_CODES, Expected, Verdict, check_response
from adapters.modbus.config import implicit_link
from adapters.modbus.link import ModbusLink
from adapters.modbus.sim import hostile
from adapters.modbus.sim.devices import (
    DeviceSpec,
    SimPoint,
    SimulatedFleet,
    held_value,
    make_points,
)
from adapters.modbus.sim.hostile import FUZZ_MODES, HostileDevice, RegisterMap, Request
from adapters.modbus.transport import ModbusTransport
from gateway.config import DeviceConfig
from gateway.core.readings import GOOD, Scan
from gateway.events import read_events
from gateway.identity.keyring import Keyring

from conftest import (
    Proc,
    add_modbus_device,
    fieldgate,
    free_ports,
    opened_from,
    start_hostile,
    start_hub,
    start_simulator,
    wait_until,
)

# -- pure: check_response against an independent oracle --------------------------------------


@dataclass(frozen=True)
class Framing:
    """How one framing wraps a PDU, and what a correct answer is, as the fuzz needs it.

    ``wrap(expected, pdu)``: the correct frame of ``pdu`` for ``expected``; ``reseal(frame)``:
    the frame with its envelope made consistent again after a mutation (MBAP: the length
    field; RTU: the CRC), so that mutations also reach the checks behind the envelope;
    ``oracle(data, expected)``: the PDU if ``data`` is exactly one correct answer, else None;
    ``fields``: (offset, size) of the header fields worth setting on purpose, ``count``
    the byte count of a read's answer."""

    name: str
    wrap: Callable[[Expected, bytes], bytes]
    reseal: Callable[[bytes], bytes]
    oracle: Callable[[bytes, Expected], bytes | None]
    check: Callable[[bytes, Expected | None], Verdict]
    fields: dict[str, tuple[int, int]]
    longest: int  # no correct frame is longer: past it, "wait for more" is wrong
    causes: frozenset[str]  # every cause a mutated frame of this framing can be refused for
    trailer: int = 0  # bytes after the PDU (RTU: the CRC)


def _mbap_wrap(expected: Expected, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", expected.transaction_id, 0, len(pdu) + 1, expected.unit) + pdu


def _mbap_reseal(data: bytes) -> bytes:
    if len(data) < 6:
        return data
    return data[:4] + struct.pack(">H", (len(data) - 6) & 0xFFFF) + data[6:]


def _mbap_oracle(data: bytes, expected: Expected) -> bytes | None:
    if not MBAP_SIZE + 2 <= len(data) <= 6 + 0xFFFF:
        return None
    header = struct.pack(">HHHB", expected.transaction_id, 0, len(data) - 6, expected.unit)
    if data[:MBAP_SIZE] != header:
        return None
    pdu = data[MBAP_SIZE:]
    return pdu if pdu_answers(pdu, expected) else None


def pdu_answers(pdu: bytes, expected: Expected) -> bool:
    """Does ``pdu`` answer ``expected`` (Modbus application protocol 1.1b3, section 6)?
    Written from the specification, not from :mod:`.checks`: the shapes a correct answer may
    take are listed, and ``pdu`` must be one of them."""
    fc = expected.function_code
    if len(pdu) == 2 and pdu[0] == fc + 0x80:  # an exception, any code
        return True
    if fc in (5, 6):  # echo: address, value (when the caller says which)
        echo = bytes([fc]) + expected.address.to_bytes(2, "big")
        if expected.value is not None:
            return pdu == echo + expected.value.to_bytes(2, "big")
        return len(pdu) == 5 and pdu[:3] == echo
    if fc in (15, 16):  # address, quantity
        echo = expected.address.to_bytes(2, "big") + expected.count.to_bytes(2, "big")
        return pdu == bytes([fc]) + echo
    n = (expected.count + 7) // 8 if fc in (1, 2) else 2 * expected.count
    return len(pdu) == 2 + n and pdu[:2] == bytes([fc, n])


MBAP = Framing(
    "mbap",
    _mbap_wrap,
    _mbap_reseal,
    _mbap_oracle,
    check_response,
    {"tid": (0, 2), "pid": (2, 2), "length": (4, 2), "unit": (6, 1), "fc": (7, 1), "count": (8, 1)},
    longest=6 + checks.MAX_LENGTH,
    causes=frozenset(
        {
            checks.BAD_HEADER,
            checks.TRAILING,
            checks.LENGTH,
            checks.WRONG_TID,
            checks.WRONG_UNIT,
            checks.WRONG_FC,
            checks.WRONG_COUNT,
            checks.WRONG_ECHO,
        }
    ),
)


def _rtu_crc(body: bytes) -> bytes:
    """The Modbus CRC-16 of ``body`` (polynomial 0xA001 reflected, initial 0xFFFF, low byte
    first), computed here bit by bit from the serial line specification, not by .checks."""
    crc = 0xFFFF
    for byte in body:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


def _rtu_wrap(expected: Expected, pdu: bytes) -> bytes:
    body = bytes([expected.unit]) + pdu
    return body + _rtu_crc(body)


def _rtu_reseal(data: bytes) -> bytes:
    return data[:-2] + _rtu_crc(data[:-2]) if len(data) > 2 else data


def _rtu_oracle(data: bytes, expected: Expected) -> bytes | None:
    if len(data) < 4 or data[0] != expected.unit or data[-2:] != _rtu_crc(data[:-2]):
        return None
    pdu = data[1:-2]
    return pdu if pdu_answers(pdu, expected) else None


# RTU (serial line, or through TCP): unit id, PDU, CRC; no transaction id or length field. A
# read's byte count may lie up to 255: the check waits for that frame, at most 5 + 255 bytes.
RTU = Framing(
    "rtu",
    _rtu_wrap,
    _rtu_reseal,
    _rtu_oracle,
    checks.check_rtu_response,
    {"unit": (0, 1), "fc": (1, 1), "count": (2, 1)},
    longest=5 + 255 + 1,
    causes=frozenset(
        {
            checks.CRC,
            checks.TRAILING,
            checks.WRONG_UNIT,
            checks.WRONG_FC,
            checks.WRONG_COUNT,
            checks.WRONG_ECHO,
        }
    ),
    trailer=2,
)
FRAMINGS = [MBAP, RTU]


def random_request(rng: random.Random) -> Expected:
    """Any request the transport makes: reads 1-4 of the sizes the spec allows, writes."""
    fc = rng.choice((1, 2, 3, 4, 5, 6, 15, 16))
    count = {1: 2000, 2: 2000, 3: 125, 4: 125, 5: 1, 6: 1, 15: 1968, 16: 123}[fc]
    value = {5: rng.choice((0xFF00, 0)), 6: rng.randrange(0x10000)}.get(fc)
    return Expected(
        transaction_id=rng.randrange(0x10000),
        unit=rng.randrange(0x100),
        function_code=fc,
        count=rng.randint(1, count),
        bits=fc in (1, 2, 5, 15),
        address=rng.randrange(0x10000),
        value=None if rng.random() < 0.25 else value,  # the transport gives none yet
    )


def correct_pdu(expected: Expected, rng: random.Random) -> bytes:
    """A correct answer to ``expected``: data, an echo, or (one in eight) an exception."""
    fc = expected.function_code
    if rng.random() < 0.125:
        return bytes([fc | 0x80, rng.choice((1, 2, 3, 4, 6, 0x0B))])
    if fc in WRITE_CODES:
        if fc in (15, 16):
            second = expected.count
        else:
            second = rng.randrange(0x10000) if expected.value is None else expected.value
        return bytes([fc]) + struct.pack(">HH", expected.address, second)
    n = expected.byte_count
    return bytes([fc, n]) + rng.randbytes(n)


def mutate(framing: Framing, data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """One mutation: a byte or a header field changed, bytes cut, inserted, added, frames
    joined; then, half the time, the envelope made consistent again."""
    b = bytearray(data)
    kind = rng.randrange(11)
    if kind == 0 and b:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1 and b:
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind in (2, 3):
        offset, size = rng.choice(list(framing.fields.values()))
        if offset + size <= len(b):
            old = int.from_bytes(b[offset : offset + size], "big")
            new = rng.choice((old + 1, old - 1, old ^ 0x80, 0, 0xFF, rng.randrange(256**size)))
            b[offset : offset + size] = (new % 256**size).to_bytes(size, "big")
    elif kind == 4:
        del b[rng.randrange(len(b) + 1) :]
    elif kind == 5 and b:
        del b[rng.randrange(len(b))]
    elif kind == 6:
        b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
    elif kind == 7:
        b += rng.randbytes(rng.randint(1, 8))
    elif kind == 8:
        b += rng.choice(others) if others else data
    elif kind == 9:
        # More or fewer data bytes, the byte count saying so: consistent, but not what was
        # asked. Always resealed, or the envelope would give it away first.
        offset, _ = framing.fields["count"]
        end = len(b) - framing.trailer
        if offset < end:
            delta = rng.choice((-2, -1, 1, 2))
            if delta > 0:
                b[end:end] = rng.randbytes(delta)
            else:
                del b[max(offset + 1, end + delta) : end]
            b[offset] = (b[offset] + delta) % 256
            return framing.reseal(bytes(b))
    else:
        b = bytearray(rng.choice(others)) if others else b
    out = bytes(b)
    return framing.reseal(out) if rng.random() < 0.5 else out


@pytest.mark.parametrize("framing", FRAMINGS, ids=lambda f: f.name)
def test_a_mutated_frame_is_never_taken_for_a_correct_answer(framing: Framing) -> None:
    rng = random.Random(11)
    outcomes = Counter[str]()
    recent: list[bytes] = []
    for i in range(30_000):
        expected = random_request(rng)
        data = framing.wrap(expected, correct_pdu(expected, rng))
        for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
            data = mutate(framing, data, rng, recent)
        if i % 50 == 0:
            data = rng.randbytes(rng.randint(1, 40))  # now and then, noise
        recent = [data, *recent[:7]]
        verdict = framing.check(data, expected)  # never raises: this loop would stop
        oracle = framing.oracle(data, expected)
        assert 0 <= verdict.used <= len(data), (data.hex(), verdict)
        outcomes[verdict.cause or ("taken" if verdict.used else "wait")] += 1
        if verdict.cause is None and verdict.used:
            # Taken: exactly one correct answer, nothing before or after it.
            assert verdict.used == len(data) and oracle is not None, (data.hex(), expected)
        elif verdict.used == 0:
            # Waiting for more: only a prefix of a frame that may still come, never forever.
            assert len(data) < framing.longest, (data.hex(), expected)
            assert oracle is None
        else:
            # Refused, and the whole of it judged: nothing left to be misread as the next.
            assert oracle is None, (data.hex(), expected, verdict)
            assert verdict.used == len(data)
        if oracle is not None:  # a correct answer is never refused
            assert verdict == Verdict(len(data)), (data.hex(), expected, verdict)
    # The fuzz reached every outcome: taken, waiting, refused for every cause a frame can have.
    assert outcomes.keys() == {"taken", "wait", *framing.causes}, outcomes
    assert min(outcomes.values()) >= 100 and outcomes["taken"] >= 3000, outcomes


@pytest.mark.parametrize("framing", FRAMINGS, ids=lambda f: f.name)
def test_every_cut_of_a_correct_answer_waits_and_nothing_is_taken_unasked(
    framing: Framing,
) -> None:
    rng = random.Random(12)
    for _ in range(2_000):
        expected = random_request(rng)
        data = framing.wrap(expected, correct_pdu(expected, rng))
        cut = rng.randrange(len(data))
        assert framing.check(data[:cut], expected) == checks.WAIT
        assert framing.check(data, expected) == Verdict(len(data))
        unasked = framing.check(data, None)
        assert unasked.cause == checks.UNSOLICITED and unasked.resync


def test_the_framer_hands_pymodbus_only_frames_whose_values_are_the_frames() -> None:
    """Through the transport's framer and pymodbus's own decoder: a PDU comes out only for a
    correct answer, with exactly the values the frame holds, and nothing raises."""
    wrong: list[tuple[str, bool]] = []
    endpoint = _config("fz-1", 1, make_points(1)).modbus
    assert endpoint is not None

    async def make() -> ModbusTransport:  # pymodbus's client wants a running loop
        return ModbusTransport(implicit_link("fz-1", endpoint), lambda _cause, _target: None)

    transport = asyncio.run(make())
    framer = transport._framer
    framer._on_wrong = lambda cause, resync: wrong.append((cause, resync))
    rng = random.Random(13)
    taken = 0
    for _ in range(5_000):
        fc = rng.choice((1, 2, 3, 4))
        expected = Expected(
            transaction_id=rng.randrange(1, 0x10000),
            unit=endpoint.unit,
            function_code=fc,
            count=rng.randint(1, 40),
            bits=fc in (1, 2),
            address=rng.randrange(0x1000),
        )
        data = MBAP.wrap(expected, correct_pdu(expected, rng))
        for _ in range(rng.choice((0, 1, 2))):
            data = mutate(MBAP, data, rng, [])
        framer.expected = (endpoint.unit, fc, expected.count, expected.bits, expected.address, None)
        before = len(wrong)
        used, pdu = framer.handleFrame(data, endpoint.unit, expected.transaction_id)
        oracle = MBAP.oracle(data, expected)
        if pdu is None:
            assert oracle is None or used == 0, data.hex()
            assert used in (0, len(data)) and len(wrong) == before + (used > 0)
            continue
        assert oracle is not None and used == len(data), data.hex()
        taken += 1
        if pdu.function_code > 0x80:
            assert pdu.exception_code == oracle[1]
        elif expected.bits:
            held = int.from_bytes(oracle[2:], "little")
            assert list(pdu.bits[: expected.count]) == [
                bool(held >> i & 1) for i in range(expected.count)
            ]
        else:
            assert list(pdu.registers) == list(struct.unpack(f">{expected.count}H", oracle[2:]))
    assert taken > 1000


def test_every_hostile_answer_is_judged_as_the_device_meant_it() -> None:
    """The hostile device's malformed answers (what the in-process and end-to-end tests rely
    on), judged purely: a malformed answer is never taken, one that holds a correct answer is
    taken with its values, and the bytes after it are never taken."""
    expected = Expected(transaction_id=41, unit=1, function_code=3, count=3, bits=False)
    request = Request(41, 1, 3, 0, 3)
    values = [11, 22, 33]
    for mode in FUZZ_MODES:
        chunks = [data for _, data in hostile.answer(mode, request, values)]
        joined = b"".join(chunks)
        first = check_response(chunks[0], expected)
        if mode in ("split", "late_rest"):  # taken whole if the rest comes in time
            assert first == checks.WAIT and check_response(joined, expected) == Verdict(len(joined))
        elif mode in ("truncated", "mbap_long"):  # the rest never comes: the timeout judges
            assert first == checks.WAIT, mode
        elif mode in hostile.ANSWERED:  # a correct answer, then a frame nobody asked for
            assert first == Verdict(len(chunks[0])), mode
            assert chunks[0][MBAP_SIZE + 2 :] == struct.pack(">3H", *values)
            assert check_response(chunks[1], None).cause == checks.UNSOLICITED
            assert check_response(joined, expected).cause == checks.TRAILING  # both in one read
            # Judged against the next request (its transaction id is the next one).
            later = Expected(transaction_id=42, unit=1, function_code=3, count=3, bits=False)
            assert check_response(chunks[1], later).cause == checks.WRONG_TID
        else:
            assert first.cause is not None and first.used == len(chunks[0]), (mode, first)


def test_a_hostile_plan_with_a_mistake_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"plan 'good:3,bad': unknown mode 'bad'"):
        hostile.parse_plan("good:3,bad")
    with pytest.raises(ValueError, match=r"fuzz:x: the count is not a number"):
        hostile.parse_plan("good:3,fuzz:x")
    assert hostile.parse_plan("good:3,fuzz:5,good") == [("good", 3), ("fuzz", 5), ("good", None)]


def test_a_single_write_answered_with_another_value_is_a_wrong_echo() -> None:
    """FC 5 and 6 answer with an echo of the request: a device that says it wrote another
    value than the one sent has not answered this request."""
    for fc, sent, other in ((6, 1234, 1235), (5, 0xFF00, 0x0000)):
        write = Expected(9, 1, fc, 1, fc == 5, address=40, value=sent)
        echo = MBAP.wrap(write, struct.pack(">BHH", fc, 40, sent))
        assert check_response(echo, write) == Verdict(len(echo))
        lie = MBAP.wrap(write, struct.pack(">BHH", fc, 40, other))
        assert check_response(lie, write) == Verdict(len(lie), checks.WRONG_ECHO)


# -- the link: a window of malformed answers beside a healthy device --------------------------

STEP = 0.5  # values change every half second: a stale value would show
PERIOD = 0.05
POINTS = 9  # the mixed profile: holding, input, coil and discrete blocks, all the types
WINDOW = (30, 150)  # requests of the hostile device: good before, the fuzz window, good after
SEED = 1


def _config(
    device_id: str, port: int, sim_points: list[SimPoint], timeout: float = 0.2
) -> DeviceConfig:
    return DeviceConfig.model_validate(
        {
            "id": device_id,
            "cert": "x",
            "key": "x",
            "modbus": {"host": "127.0.0.1", "port": port, "timeout": timeout},
            "identity": "none",
            "points": [sp.point.model_dump() for sp in sim_points],
        },
        context={"check_files": False},
    )


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _wrong_values(scans: list[Scan], sim_points: list[SimPoint], step: float) -> list[Any]:
    """Good values that are not what the device held when they were read."""
    by_name = {sp.point.name: sp for sp in sim_points}
    wrong = []
    for scan in scans:
        assert scan.quality == GOOD, scan
        s = int(scan.ts_ms / 1000 / step)
        for name, value in zip(scan.names, scan.values, strict=True):
            sp = by_name[name]
            held = [held_value(sp.point, sp.seed, k) for k in (s, s + 1)]
            if not any(_same(value, h) for h in held):
                wrong.append((scan.ts_ms, name, value, held))
    return wrong


def _plan() -> str:
    start, end = WINDOW
    return f"good:{start},fuzz:{end - start},good"


def test_a_window_of_malformed_answers_costs_only_that_device_and_none_becomes_a_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    caplog.set_level(logging.INFO, logger="adapters")
    bad_points = make_points(POINTS, period=PERIOD, seed=2)
    ok_points = make_points(POINTS, period=PERIOD, seed=1)
    hostile_port = free_ports(2)
    ok_port = hostile_port + 1
    marks: dict[str, float] = {}
    device = HostileDevice(
        hostile_port,
        _plan(),
        seed=SEED,
        registers=RegisterMap(bad_points, STEP),
        late=0.5,  # past the link's timeout of 0.2 s
        on_request=lambda: _mark(device, marks),
    )
    scans: dict[str, list[Scan]] = defaultdict(list)
    healths = {"bad-1": DeviceHealth("bad-1"), "ok-1": DeviceHealth("ok-1")}
    events: list[tuple[str, str]] = []

    def link(device_id: str, port: int, points: list[SimPoint], timeout: float) -> ModbusLink:
        config = _config(device_id, port, points, timeout)
        assert config.modbus is not None
        return ModbusLink(
            device_id,
            config.modbus,
            config.points,
            scans[device_id].append,
            lambda _e: None,
            healths[device_id],
            backoff_min=0.02,
            backoff_max=0.05,
            settle=1.0,
            on_event=lambda kind, device, *_a, **_k: events.append((kind, device)),
        )

    def ended() -> bool:
        return any("now answering correctly" in r.getMessage() for r in caplog.records)

    async def run() -> None:
        fleet = SimulatedFleet([DeviceSpec("ok-1", ok_port, points=ok_points)], step=STEP)
        async with fleet, device:
            links = [
                link("bad-1", hostile_port, bad_points, 0.2),
                link("ok-1", ok_port, ok_points, 1.0),  # a loaded machine is not a fault
            ]
            tasks = [asyncio.create_task(lk.run()) for lk in links]
            deadline = time.monotonic() + 40
            while not (ended() and device.requests >= WINDOW[1] + 40):
                assert time.monotonic() < deadline, (device.requests, dict(device.sent))
                # A link that stopped would be done, with its exception: neither ever is.
                assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
                await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with pytest.raises(asyncio.CancelledError):
                    await task

    asyncio.run(run())

    # The window was the seed's draws, every malformed kind among them.
    drawn = Counter(device.history[WINDOW[0] : WINDOW[1]])
    assert drawn.keys() == set(FUZZ_MODES), set(FUZZ_MODES) - drawn.keys()
    assert device.history[: WINDOW[0]] == ["good"] * WINDOW[0]
    assert set(device.history[WINDOW[1] :]) == {"good"}

    # Nothing malformed became a reading: every value is what the device held.
    assert _wrong_values(scans["bad-1"], bad_points, STEP) == []
    assert _wrong_values(scans["ok-1"], ok_points, STEP) == []
    assert len(scans["bad-1"]) <= device.answered

    # The malformed were counted, by cause; the healthy device saw none.
    bad = healths["bad-1"]
    assert bad.malformed == sum(bad.malformed_causes.values())
    malformed_drawn = sum(n for mode, n in drawn.items() if mode not in ("split",))
    assert bad.malformed >= malformed_drawn // 2, (bad.malformed, drawn)
    drawn_causes = {
        checks.WRONG_TID,
        checks.WRONG_UNIT,
        checks.WRONG_FC,
        checks.WRONG_COUNT,
        checks.LENGTH,
        checks.TRAILING,
        checks.BAD_HEADER,
        checks.TRUNCATED,
    }
    assert drawn_causes <= bad.malformed_causes.keys(), bad.malformed_causes
    # Besides those, only bytes nobody asked for (a late answer, a second one).
    assert bad.malformed_causes.keys() <= drawn_causes | {checks.UNSOLICITED}
    ok = healths["ok-1"]
    assert ok.malformed == 0 and ok.reads_failed == 0

    # Told once per transition, never as a traceback or an error.
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    lines = [r.getMessage() for r in caplog.records if "answering" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["bad-1", "bad-1"], lines
    assert lines[0].startswith("bad-1: answering wrongly: ")
    assert lines[1].endswith("; now answering correctly")
    # A device breaking the protocol is a security event, once at the start, once at the end.
    assert events == [("wrong-answers", "bad-1"), ("wrong-answers-ended", "bad-1")]

    # The healthy device kept its rate through the window: every block at its period.
    start, end = marks["start"], marks["end"]
    assert end - start > 2.0
    by_block: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for scan in scans["ok-1"]:
        if start <= scan.ts_ms / 1000 <= end:
            by_block[scan.names].append(scan.ts_ms / 1000)
    assert len(by_block) == 4
    for names, times in by_block.items():
        assert len(times) >= 0.6 * (end - start) / PERIOD, (names, len(times), end - start)
        assert max(b - a for a, b in itertools.pairwise(times)) < 0.5, names

    # After the window, the hostile device's readings resumed, every block of them.
    after = [s for s in scans["bad-1"] if s.ts_ms / 1000 > end]
    assert {s.names for s in after} == set(by_block), {s.names for s in after}
    assert len(after) >= 20


def _mark(device: HostileDevice, marks: dict[str, float]) -> None:
    """When the hostile device's window opened and closed (by its request count)."""
    if device.requests == WINDOW[0] + 1:
        marks["start"] = time.time()
    elif device.requests == WINDOW[1] + 1:
        marks["end"] = time.time()


# -- the whole gateway ------------------------------------------------------------------------


def test_the_gateway_forwards_only_correct_values_through_every_kind_of_malformed_answer(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 1, "--period", "0.1", "--max-age", "0.3"
    )
    port = free_ports(1)
    stats = tmp_path / "hostile.json"
    map_seed = 5
    # Every kind once (the seeded draws are the in-process test's), each followed by a period
    # of correct answers: the gateway's reconnect backoff (0.5 s, doubling while connections
    # deliver nothing) then stays at its first step, and the run fits in 20 s.
    wrong = list(FUZZ_MODES)
    plan = ",".join(["good:20", *(f"{mode}:1,good:4" for mode in wrong), "good"])
    window = 20 + 5 * len(wrong)
    extra = ["--points", str(POINTS), "--map-seed", str(map_seed), "--late", "0.6"]
    start_hostile(procs, tmp_path, port, plan, stats, *extra)
    bad_points = make_points(POINTS, period=0.1, seed=map_seed)
    ok_count = len(tomllib.loads(config.read_text())["devices"][0]["points"])
    rows = [{k: v for k, v in sp.point.model_dump().items() if v is not None} for sp in bad_points]
    add_modbus_device(config, pki_dir, "plc-2", port, rows, timeout=0.3)
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)

    def requests() -> int:
        try:
            return int(json.loads(stats.read_text())["requests"])
        except (OSError, ValueError, KeyError):
            return 0

    wait_until(lambda: requests() >= window, 30, "the hostile device through its window")
    window_end_ms = int(time.time() * 1000)

    def resumed() -> bool:
        opened, _, _ = opened_from(record, keyring)
        return any(
            o.device_id == "plc-2" and r.ts_ms > window_end_ms + 500
            for o in opened
            for r in o.readings
        )

    wait_until(resumed, 10, "the hostile device's readings at the hub after its window")
    assert gateway.stop() == 0, gateway.output()[-3000:]

    opened, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.gaps() == {}
    ok_points = {sp.point.name: sp for sp in make_points(ok_count, period=0.1, seed=0)}
    maps = {"plc-1": ok_points, "plc-2": {sp.point.name: sp for sp in bad_points}}
    per_device: Counter[str] = Counter()
    for o in opened:
        for r in o.readings:
            assert r.quality == "good", r
            sp = maps[o.device_id][r.point]
            step = r.ts_ms // 1000
            held = [held_value(sp.point, sp.seed, s) for s in (step, step + 1)]
            assert any(_same(r.value, h) for h in held), (o.device_id, r, held)
            per_device[o.device_id] += 1
    assert per_device["plc-1"] >= 100 and per_device["plc-2"] > 0
    sent = json.loads(stats.read_text())
    assert per_device["plc-2"] <= POINTS * sent["answered"]
    assert set(sent["sent"]) == {"good", *FUZZ_MODES}
    log = gateway.output()
    assert "Traceback" not in log and "Fatal error" not in log and " ERROR " not in log
    assert log.count("plc-2: answering wrongly:") == 1
    assert "plc-1: answering" not in log
    kinds = [(e["kind"], e["device"]) for e in read_events(tmp_path / "state")]
    assert [k for k in kinds if k[0].startswith("wrong-answers")] == [("wrong-answers", "plc-2")]
