"""A Modbus device that answers wrongly: nothing wrong becomes a reading, nothing becomes a
traceback, and its misbehaviour is told once per transition, with counts."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections import defaultdict
from pathlib import Path

import pytest

from adapters.base import DeviceHealth
from adapters.modbus import checks
from adapters.modbus.checks import Expected, Misbehaviour, check_response
from adapters.modbus.link import ModbusLink
from adapters.modbus.sim.hostile import BAD, HostileDevice
from gateway.config import DeviceConfig
from gateway.core.readings import Scan
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

POINTS = 4  # uint16 holding registers 0..3, which a correct answer holds as 1000 + address


def _frame(tid: int, unit: int, pdu: bytes, length: int | None = None) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1 if length is None else length, unit) + pdu


READ_3 = Expected(transaction_id=7, unit=1, function_code=3, count=2, bits=False)
GOOD = _frame(7, 1, bytes([3, 4, 0, 1, 0, 2]))


@pytest.mark.parametrize(
    ("data", "cause"),
    [
        (GOOD, None),
        (_frame(7, 1, bytes([0x83, 0x0B])), None),  # an exception answer is an answer
        (_frame(8, 1, bytes([3, 4, 0, 1, 0, 2])), checks.WRONG_TID),
        (_frame(0, 1, bytes([3, 4, 0, 1, 0, 2])), checks.WRONG_TID),  # pymodbus takes tid 0
        (_frame(7, 2, bytes([3, 4, 0, 1, 0, 2])), checks.WRONG_UNIT),
        (_frame(7, 1, bytes([4, 4, 0, 1, 0, 2])), checks.WRONG_FC),
        (_frame(7, 1, bytes([0x84, 0x0B])), checks.WRONG_FC),
        (_frame(7, 1, bytes([3, 2, 0, 1])), checks.WRONG_COUNT),
        (_frame(7, 1, bytes([3, 6, 0, 1, 0, 2, 0, 3])), checks.WRONG_COUNT),
        (_frame(7, 1, bytes([3, 6, 0, 1, 0, 2])), checks.LENGTH),
        (_frame(7, 1, bytes([3, 4, 0, 1, 0, 2, 9, 9])), checks.TRAILING),  # inside the ADU
        (_frame(7, 1, bytes([0x83, 0x0B, 0])), checks.TRAILING),
        (GOOD + b"\x00", checks.TRAILING),  # after the ADU
        (GOOD + GOOD, checks.TRAILING),
        (b"\x00\x07\x13\x37" + GOOD[4:], checks.BAD_HEADER),
        (_frame(7, 1, b"\x03", length=2), checks.BAD_HEADER),
        (_frame(7, 1, b"\x03", length=300), checks.BAD_HEADER),
    ],
)
def test_a_response_must_match_its_request(data: bytes, cause: str | None) -> None:
    verdict = check_response(data, READ_3)
    assert verdict.cause == cause
    assert verdict.used == len(data)  # judged whole: nothing of it is left to misread


def test_part_of_a_frame_waits_for_the_rest_and_bytes_nobody_asked_for_are_wrong() -> None:
    for cut in range(len(GOOD)):
        assert check_response(GOOD[:cut], READ_3) == checks.WAIT
    assert check_response(GOOD, None).cause == checks.UNSOLICITED
    assert check_response(GOOD, None).resync
    bits = Expected(transaction_id=1, unit=1, function_code=1, count=9, bits=True)
    assert check_response(_frame(1, 1, bytes([1, 2, 0xFF, 0x01])), bits).cause is None
    assert check_response(_frame(1, 1, bytes([1, 1, 0xFF])), bits).cause == checks.WRONG_COUNT


def test_misbehaviour_is_told_when_it_starts_every_so_often_and_when_it_ends() -> None:
    m = Misbehaviour("plc-3", every=60, settle=10)
    assert m.good(0.0) is None
    assert m.bad(checks.WRONG_FC, 100.0) == "plc-3: answering wrongly: wrong function code"
    lines = [m.bad(checks.WRONG_FC, 100.0 + i / 100) for i in range(1, 812)]
    lines += [m.bad(checks.TRAILING, 110.0 + i / 100) for i in range(392)]
    assert lines.count(None) == len(lines)
    assert m.good(114.0) is None  # not settled: a wrong answer came 10 s ago or less
    assert m.bad(checks.TRAILING, 160.0) == (
        "plc-3: 1,205 wrong answers (wrong function code 812, trailing bytes 393) in 60 s;"
        " still answering wrongly"
    )
    assert m.bad(checks.TRAILING, 161.0) is None
    assert m.good(171.0) == (
        "plc-3: 1,206 wrong answers (wrong function code 812, trailing bytes 394) in 71 s;"
        " now answering correctly"
    )
    assert m.good(172.0) is None
    # A second episode is told again, counted from zero.
    assert (
        m.bad("Modbus exception 0x0B", 200.0) == "plc-3: answering wrongly: Modbus exception 0x0B"
    )
    assert m.good(211.0) == (
        "plc-3: 1 wrong answer (Modbus exception 0x0B 1) in 11 s; now answering correctly"
    )


def test_a_good_read_clears_the_last_error_so_the_next_episode_is_told_again() -> None:
    health = DeviceHealth("plc-3")
    health.up()
    health.last_error = "Modbus exception 0x0B on holding@0"  # the device stayed up
    health.up()
    assert health.last_error is None


# -- the poller against a hostile device, in one event loop --------------------------------


def _config(device_id: str, port: int, period: float = 0.05) -> DeviceConfig:
    return DeviceConfig.model_validate(
        {
            "id": device_id,
            "cert": "x",
            "key": "x",
            "modbus": {"host": "127.0.0.1", "port": port, "timeout": 0.3},
            "identity": "none",
            "points": [{"name": f"p{i}", "address": i, "period": period} for i in range(POINTS)],
        },
        context={"check_files": False},
    )


def _true(scan: Scan) -> bool:
    return list(scan.values) == [1000 + int(name[1:]) for name in scan.names]


async def _poll_until(
    plan: str,
    done: object,
    *,
    settle: float = 10.0,
    backoff: tuple[float, float] = (0.02, 0.05),
    pollers: list[ModbusLink] | None = None,
    events: list[str] | None = None,
) -> tuple[list[Scan], DeviceHealth, HostileDevice]:
    assert callable(done)
    port = free_ports(1)
    scans: list[Scan] = []
    health = DeviceHealth("bad-1")
    wake = asyncio.Event()

    def check() -> None:
        if done(device, scans):
            wake.set()

    def sink(scan: Scan) -> None:
        scans.append(scan)
        check()

    async with HostileDevice(port, plan, on_request=check) as device:
        config = _config("bad-1", port)
        assert config.modbus is not None
        poller = ModbusLink(
            config.id,
            config.modbus,
            config.points,
            sink,
            lambda _e: None,
            health,
            backoff_min=backoff[0],
            backoff_max=backoff[1],
            settle=settle,
            on_event=None if events is None else lambda kind, *_a, **_k: events.append(kind),
        )
        if pollers is not None:
            pollers.append(poller)
        task = asyncio.create_task(poller.run())
        await asyncio.wait_for(wake.wait(), 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return scans, health, device


WRONG = [
    ("wrong_fc", checks.WRONG_FC),
    ("unknown_fc", checks.WRONG_FC),
    ("wrong_tid", checks.WRONG_TID),
    ("wrong_unit", checks.WRONG_UNIT),
    ("short", checks.WRONG_COUNT),
    ("long", checks.WRONG_COUNT),
    ("overcount", checks.LENGTH),
    ("trailing", checks.TRAILING),
    ("padded", checks.TRAILING),
    ("flood", checks.TRAILING),
    ("garbage", checks.BAD_HEADER),
    ("truncated", checks.TRUNCATED),
]


@pytest.mark.parametrize(("mode", "cause"), WRONG)
def test_a_wrong_answer_is_counted_and_dropped_never_a_reading_nor_a_traceback(
    mode: str, cause: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    caplog.set_level(logging.INFO, logger="adapters")

    def done(device: HostileDevice, scans: list[Scan]) -> bool:
        return device.sent[mode] == 10 and len(scans) >= 8  # 5 good ones after it, too

    scans, health, device = asyncio.run(_poll_until(f"good:3,{mode}:10,good", done))
    assert all(_true(s) for s in scans), [s.values for s in scans if not _true(s)]
    assert len(scans) <= device.sent["good"]
    assert health.malformed_causes.get(cause, 0) >= 10, health.malformed_causes
    assert health.malformed == sum(health.malformed_causes.values())
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    told = [r.getMessage() for r in caplog.records if "answering wrongly:" in r.getMessage()]
    assert told == [f"bad-1: answering wrongly: {cause}"]
    assert health.malformed_causes.keys() <= {cause, checks.UNSOLICITED}  # no other cause


@pytest.mark.parametrize("mode", ["exc0b", "reset"])
def test_exceptions_and_resets_are_told_once_without_a_traceback(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    caplog.set_level(logging.INFO, logger="adapters")
    caplog.set_level(logging.INFO, logger="fieldgate")

    def done(device: HostileDevice, scans: list[Scan]) -> bool:
        return device.sent[mode] == 30 and len(scans) >= 8

    events: list[str] = []
    scans, health, _ = asyncio.run(_poll_until(f"good:3,{mode}:30,good", done, events=events))
    assert all(_true(s) for s in scans)
    assert health.reads_failed >= 30 and health.malformed == 0
    # An exception reply is the protocol spoken correctly (a map or load problem), a reset a
    # network fault: neither is a security event; answers that break the protocol are.
    assert events == []
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    messages = [r.getMessage() for r in caplog.records]
    if mode == "exc0b":
        told = [m for m in messages if "answering wrongly:" in m]
        assert told == ["bad-1: answering wrongly: Modbus exception 0x0B"]
    else:
        told = [m for m in messages if "unavailable" in m]
        assert told == [
            "bad-1: unavailable: read holding@0: ConnectionResetError('connection closed by the"
            " device')"
        ]


def test_a_second_episode_is_told_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="adapters")

    def done(_device: HostileDevice, _scans: list[Scan]) -> bool:
        return sum("now answering correctly" in r.getMessage() for r in caplog.records) == 2

    asyncio.run(_poll_until("good:3,exc0b:3,good:12,exc0b:3,good", done, settle=0.3))
    told = [r.getMessage() for r in caplog.records if "answering" in r.getMessage()]
    assert [line.split(" in ")[0] for line in told] == [
        "bad-1: answering wrongly: Modbus exception 0x0B",
        "bad-1: 3 wrong answers (Modbus exception 0x0B 3)",
    ] * 2


def test_an_episode_going_on_at_stop_is_told_with_its_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="adapters")

    def done(device: HostileDevice, _scans: list[Scan]) -> bool:
        return device.sent["silent"] == 1  # asked again: the fifth wrong answer was judged

    asyncio.run(_poll_until("good:3,wrong_unit:5,silent", done))
    told = [r.getMessage() for r in caplog.records if "answering" in r.getMessage()]
    assert told[0] == "bad-1: answering wrongly: wrong unit id"
    assert told[-1].startswith("bad-1: 5 wrong answers (wrong unit id 5) in ")
    assert told[-1].endswith("; still answering wrongly when polling stopped")


def test_the_end_of_an_episode_is_told_with_its_counts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="adapters")

    def done(_device: HostileDevice, _scans: list[Scan]) -> bool:
        return any("now answering correctly" in r.getMessage() for r in caplog.records)

    scans, _, _ = asyncio.run(_poll_until("good:3,wrong_fc:6,exc0b:4,good", done, settle=0.3))
    assert all(_true(s) for s in scans)
    told = [r.getMessage() for r in caplog.records if "answering" in r.getMessage()]
    assert told[0] == "bad-1: answering wrongly: wrong function code"
    assert told[-1].startswith(
        "bad-1: 10 wrong answers (wrong function code 6, Modbus exception 0x0B 4) in "
    )
    assert told[-1].endswith("; now answering correctly")
    assert len(told) == 2


def test_a_device_that_breaks_every_connection_is_reconnected_with_growing_backoff() -> None:
    pollers: list[ModbusLink] = []

    def done(device: HostileDevice, _scans: list[Scan]) -> bool:
        return device.sent["trailing"] >= 6

    _, health, device = asyncio.run(
        _poll_until("trailing", done, backoff=(0.02, 10.0), pollers=pollers)
    )
    # Each connection was closed at its first answer, and none delivered a reading: the
    # backoff went up a step each time instead of starting over at every connect.
    assert pollers[0].attempt >= 5
    assert health.malformed_causes == {checks.TRAILING: device.sent["trailing"]}


# -- the whole gateway ----------------------------------------------------------------------


def test_a_hostile_device_delivers_only_its_correct_answers_and_no_traceback(
    tmp_path: Path, pki_dir: Path, keyring: Keyring, procs: list[Proc]
) -> None:
    hub_port, record = start_hub(procs, tmp_path, pki_dir)
    config, _ = start_simulator(
        procs, tmp_path, pki_dir, hub_port, 1, "--period", "0.1", "--max-age", "0.3"
    )
    port = free_ports(1)
    stats = tmp_path / "hostile.json"
    plan = "good:10,wrong_fc:40,unknown_fc:5,trailing:1,wrong_tid:10,exc0b:20,reset:1,long:10,good"
    start_hostile(procs, tmp_path, port, plan, stats)
    rows: list[dict[str, object]] = [
        {"name": f"p{i}", "address": i, "period": 0.1} for i in range(POINTS)
    ]
    add_modbus_device(config, pki_dir, "plc-2", port, rows, timeout=0.5)
    gateway = Proc(fieldgate("run", "--config", str(config)), tmp_path / "gateway.log")
    procs.append(gateway)
    # The episode ends after 10 s of correct answers.
    ended = gateway.wait_for(
        r"plc-2: [\d,]+ wrong answers \(.*\) in \d+ s; now answering correctly", 90
    )[0]

    def delivered() -> bool:
        opened, _, _ = opened_from(record, keyring)
        return {o.device_id for o in opened} == {"plc-1", "plc-2"}

    wait_until(delivered, 20, "both devices at the hub")
    assert gateway.stop() == 0, gateway.output()[-3000:]

    opened, errors, tracker = opened_from(record, keyring)
    assert errors == [] and tracker.gaps() == {}
    per_device: dict[str, list[tuple[str, object]]] = defaultdict(list)
    for o in opened:
        for r in o.readings:
            per_device[o.device_id].append((r.point, r.value))
            assert r.quality == "good"
    # The good device went on delivering while the other misbehaved.
    assert len(per_device["plc-1"]) >= 100
    # From the hostile one, only its correct answers, with their values.
    hostile_values = per_device["plc-2"]
    assert hostile_values and all(v == 1000 + int(p[1:]) for p, v in hostile_values)
    assert BAD not in {v for _, v in hostile_values}
    sent = json.loads(stats.read_text())["sent"]
    assert len(hostile_values) <= POINTS * sent["good"]
    assert all(sent.get(mode, 0) for mode in ("wrong_fc", "long", "exc0b", "reset"))

    log = gateway.output()
    assert "Traceback" not in log and "Fatal error" not in log and " ERROR " not in log
    assert log.count("plc-2: answering wrongly: wrong function code") == 1
    assert log.count("answering wrongly:") == 1  # one episode, told once at its start
    assert log.count("now answering correctly") == 1
    for cause in ("wrong function code", "trailing bytes", "wrong transaction id"):
        assert cause in ended
    assert "plc-1: answering" not in log

    # The episode is audited at its start and at its end, once each.
    events = [e for e in read_events(tmp_path / "state") if e["kind"].startswith("wrong-answers")]
    assert [(e["kind"], e["device"]) for e in events] == [
        ("wrong-answers", "plc-2"),
        ("wrong-answers-ended", "plc-2"),
    ]
    assert events[0]["reason"] == "wrong function code"
    assert events[1]["counts"]["wrong function code"] == sent["wrong_fc"] + sent["unknown_fc"]
    assert events[1]["counts"]["Modbus exception 0x0B"] == sent["exc0b"]
