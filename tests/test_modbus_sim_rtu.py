"""The RTU simulators (issue 11, item 5), driven by pymodbus's own clients: a paced serial line
through a socat pty pair, RTU over TCP, and a serial-to-Ethernet gateway with a connection limit.

Every value is compared with :func:`value_at`; timing is asserted as a lower bound only (a
loaded machine can be slower than the line, never faster)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from adapters.modbus.registers import encode_value
from adapters.modbus.sim.bus import MbapGateway, RtuBus, RtuOverTcp, rtu_line
from adapters.modbus.sim.devices import DeviceSpec, SimPoint, make_points, value_at
from adapters.modbus.sim.rtuframe import LineTiming, check, crc16, frame, request_length
from adapters.modbus.sim.serialline import SerialLine

from conftest import Proc, fieldgate, free_ports, wait_until

STEP = 1e9  # the simulated values hold still for the length of a test (step 1)
POINTS = 4  # int32 points in holding registers 0..7


def _specs(units: int, **faults: str) -> list[DeviceSpec]:
    """Units 1..units with int32 points; ``faults`` by unit: ``u3="dead"``."""
    return [
        DeviceSpec(
            f"plc-{u}",
            0,
            unit=u,
            points=make_points(POINTS, types=["int32"], seed=u - 1),  # as the CLI seeds them
            fault=faults.get(f"u{u}"),
        )
        for u in range(1, units + 1)
    ]


def _expected(points: list[SimPoint]) -> list[int]:
    """The holding registers a unit holds now, from value_at."""
    step = int(time.time() / STEP)
    out: list[int] = []
    for sp in sorted(points, key=lambda sp: sp.point.address):
        out += encode_value(sp.point, value_at(sp.point, sp.seed, step))
    return out


async def _read(client: Any, unit: int, count: int = 2 * POINTS) -> list[int]:
    response = await client.read_holding_registers(0, count=count, device_id=unit)
    assert not response.isError(), response
    return list(response.registers)


async def _silent(client: Any, unit: int) -> bool:
    """True if ``unit`` does not answer (pymodbus times out)."""
    try:
        await client.read_holding_registers(0, count=2, device_id=unit)
    except ModbusException:
        return True
    return False


@contextlib.asynccontextmanager
async def _master(
    path: Path, timing: LineTiming, answer_within: float = 0.5
) -> AsyncIterator[AsyncModbusSerialClient]:
    """pymodbus's own serial client on the gateway's end of the line, connected."""
    client = AsyncModbusSerialClient(
        str(path),
        baudrate=timing.baud,
        parity="N",  # a pty refuses parity (EINVAL); the line is timed as ``timing`` says
        stopbits=timing.stopbits,
        timeout=answer_within,
        retries=0,
        reconnect_delay=0,
    )
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Close and wait: a socket left to the garbage collector is reported as unclosed in
    whichever test runs next."""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


# -- pure framing and timing --


def test_frames_and_timing_are_modbus_rtu() -> None:
    # The CRC of the spec's example read (unit 1, read 10 holding registers from 0).
    assert crc16(bytes.fromhex("01030000000a")) == bytes.fromhex("c5cd")
    adu = frame(1, bytes.fromhex("030000000a"))
    assert check(adu) == (1, bytes.fromhex("030000000a"))
    assert check(adu[:-1] + b"\0") is None
    assert request_length(adu) == 8
    assert request_length(bytes.fromhex("0110000000020400")) == 13  # byte count 4
    assert request_length(b"\x01") == 0  # more bytes needed
    assert request_length(b"\x01\x63") is None  # unknown function: ends at the silence
    assert LineTiming(9600, "E").bits_per_char == 11
    assert LineTiming(9600, "N").bits_per_char == 10
    assert LineTiming(9600, "N", 2).bits_per_char == 11
    assert LineTiming(19200, "E").gap == pytest.approx(3.5 * 11 / 19200)
    with pytest.raises(ValueError, match="parity must be N, E or O"):
        LineTiming(9600, "X")


# -- RTU on a serial line (socat pty pair) --


def test_serial_units_answer_their_values_unknown_and_dead_units_are_silent(
    tmp_path: Path,
) -> None:
    specs = _specs(8, u3="dead")
    timing = LineTiming(115200)

    async def go() -> None:
        async with rtu_line(specs, tmp_path / "line", timing, step=STEP) as sim:
            async with _master(sim.path, timing, answer_within=0.3) as client:
                for spec in specs:
                    if spec.unit == 3:
                        assert await _silent(client, 3)
                    else:
                        assert await _read(client, spec.unit) == _expected(spec.points)
                assert await _silent(client, 9)  # no device has unit 9
                # The bus still answers after a silent unit: nothing is stuck behind it.
                assert await _read(client, 1) == _expected(specs[0].points)
            stats = sim.bus.stats()
        assert stats["overlaps"] == 0  # one master, one request at a time
        assert stats["unknown_unit"] == 1
        assert stats["units"]["3"] == {
            "device": "plc-3",
            "requests": 1,
            "answered": 0,
            "crc_faults": 0,
        }
        assert stats["units"]["1"]["requests"] == 2
        assert stats["units"]["1"]["answered"] == 2

    _run(go)


def test_a_slow_unit_delays_its_own_answer_not_the_next_units(tmp_path: Path) -> None:
    specs = _specs(2, u1="slow:1.0")
    timing = LineTiming(115200)

    async def go() -> None:
        async with rtu_line(specs, tmp_path / "line", timing, step=STEP) as sim:
            async with _master(sim.path, timing, answer_within=0.3) as client:
                assert await _silent(client, 1)  # the master gives up on unit 1
                began = time.monotonic()
                assert await _read(client, 2) == _expected(specs[1].points)
                took = time.monotonic() - began
                await asyncio.sleep(1.0)  # unit 1 answers, late, to nobody
            stats = sim.bus.stats()
        assert took < 0.3  # unit 2 did not wait for unit 1's second
        assert stats["units"]["1"]["answered"] == 1  # its late answer did go out
        assert stats["overlaps"] == 0  # and found the line free

    _run(go)


def test_a_read_takes_at_least_its_frame_time_at_the_baud_rate(tmp_path: Path) -> None:
    timing = LineTiming(9600)
    specs = [DeviceSpec("plc-1", 0, unit=1, points=make_points(10, types=["uint16"]))]

    async def go() -> None:
        async with rtu_line(specs, tmp_path / "line", timing, step=STEP) as sim:
            async with _master(sim.path, timing, answer_within=2.0) as client:
                await _read(client, 1, count=10)  # warm-up: the first request opens things
                began = time.monotonic()
                await _read(client, 1, count=10)
                took = time.monotonic() - began
        # Request 8 bytes, 3.5 characters of silence, response 5 + 20 bytes: 36.5 characters
        # of 10 bits at 9,600 baud = 38 ms. A pty alone answers in well under a millisecond.
        floor = timing.exchange_time(8, 5 + 2 * 10)
        assert floor == pytest.approx(0.038, abs=0.0005)
        assert took >= floor

    _run(go)


def test_map_quirks_and_faults_of_the_tcp_simulator_hold_on_a_bus(tmp_path: Path) -> None:
    """Holes answer 02, a read over max_registers 03, exception:CODE:N its code N times."""
    specs = _specs(3, u3="exception:4:1")
    specs[0].holes = frozenset({("holding", 6)})
    specs[1].max_registers = 4
    timing = LineTiming(115200)

    async def go() -> None:
        async with rtu_line(specs, tmp_path / "line", timing, step=STEP) as sim:
            async with _master(sim.path, timing) as client:
                codes = []
                for unit, address, count in ((1, 0, 8), (1, 0, 6), (2, 0, 8), (2, 0, 4)):
                    r = await client.read_holding_registers(address, count=count, device_id=unit)
                    codes.append(r.exception_code if r.isError() else 0)
                first = await client.read_holding_registers(0, count=2, device_id=3)
                assert first.isError() and first.exception_code == 4
                assert await _read(client, 3) == _expected(specs[2].points)
        assert codes == [2, 0, 3, 0]

    _run(go)


def test_overlaps_count_two_masters_on_one_line_and_stay_0_for_one(tmp_path: Path) -> None:
    specs = _specs(4)
    timing = LineTiming(9600)  # slow enough that two masters' requests surely meet

    async def go() -> None:
        async with rtu_line(specs, tmp_path / "line", timing, step=STEP) as sim:
            async with _master(sim.path, timing) as master:
                # pymodbus locks the port it opens; a second master on the same wire is a plain
                # file descriptor writing its own request frames.
                other = os.open(sim.path, os.O_WRONLY | os.O_NOCTTY)
                try:
                    for _ in range(3):
                        for spec in specs:
                            assert await _read(master, spec.unit) == _expected(spec.points)
                    assert sim.bus.stats()["overlaps"] == 0
                    # Both masters send at once: on a real bus the frames would collide.
                    for _ in range(3):
                        read = asyncio.ensure_future(
                            master.read_holding_registers(0, count=2, device_id=1)
                        )
                        os.write(other, frame(2, bytes.fromhex("0300000002")))
                        await asyncio.gather(read, return_exceptions=True)
                        await asyncio.sleep(0.6)  # a confused master times out
                finally:
                    os.close(other)
            assert sim.bus.stats()["overlaps"] > 0

    _run(go)


def test_crc_fault_corrupts_every_nth_answer_and_the_client_rejects_it(tmp_path: Path) -> None:
    specs = _specs(2, u2="crc:2")
    timing = LineTiming(38400)

    async def go() -> None:
        async with rtu_line(specs, tmp_path / "line", timing, step=STEP) as sim:
            async with _master(sim.path, timing, answer_within=0.3) as client:
                outcomes = []
                for _ in range(4):
                    outcomes.append(await _silent(client, 2))
                    await asyncio.sleep(0.05)  # let a rejected frame's bytes drain
                assert await _read(client, 1) == _expected(specs[0].points)
            stats = sim.bus.stats()
        assert outcomes == [False, True, False, True]
        assert stats["units"]["2"]["crc_faults"] == 2
        assert stats["units"]["2"]["answered"] == 4
        assert stats["units"]["1"]["crc_faults"] == 0

    _run(go)


def test_garbage_and_a_bad_crc_from_the_master_are_dropped_until_silence(tmp_path: Path) -> None:
    """Raw bytes on the line, as a noisy cable delivers them: not answered, counted."""
    specs = _specs(1)
    timing = LineTiming(19200)

    async def go() -> None:
        async with RtuBus(specs, timing, step=STEP) as bus:
            sent: list[bytes] = []
            port = bus.port(sent.append)
            good = frame(1, bytes.fromhex("0300000002"))
            port.received(good[:-1] + bytes([good[-1] ^ 1]))  # CRC wrong
            await asyncio.sleep(0.05)
            port.received(b"\x01\x63\x00")  # unknown function, then silence: one bad frame
            await asyncio.sleep(0.05)
            port.received(good)
            await asyncio.sleep(0.1)
            stats = bus.stats()
        assert stats["bad_frames"] == 2
        assert stats["units"]["1"]["requests"] == 1
        assert check(b"".join(sent)) == (1, bytes([3, 4]) + _regs(specs))

    _run(go)


def _regs(specs: list[DeviceSpec]) -> bytes:
    return b"".join(r.to_bytes(2, "big") for r in _expected(specs[0].points)[:2])


def test_serial_line_is_stopped_by_pid_and_leaves_no_links(tmp_path: Path) -> None:
    folder = tmp_path / "line"

    async def go() -> int:
        async with SerialLine(folder) as line:
            assert line.device_end.exists() and line.gateway_end.exists()
            assert line.pid is not None
            return line.pid

    pid = asyncio.run(go())
    assert not Path(f"/proc/{pid}").exists() or "socat" not in _cmdline(pid)
    assert not (folder / "device").exists() and not (folder / "gateway").exists()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


# -- RTU over TCP --


def test_rtu_over_tcp_serves_rtu_frames_and_counts_two_connected_masters(tmp_path: Path) -> None:
    specs = _specs(3, u2="dead")
    timing = LineTiming(9600)  # slow enough that two masters' requests surely meet

    async def go() -> None:
        async with (
            RtuBus(specs, timing, step=STEP, mode="rtu-over-tcp") as bus,
            RtuOverTcp(bus, "127.0.0.1", 0) as server,
        ):

            def client() -> AsyncModbusTcpClient:
                return AsyncModbusTcpClient(
                    "127.0.0.1",
                    port=server.port,
                    framer=FramerType.RTU,
                    timeout=0.3,
                    retries=0,
                    reconnect_delay=0,
                )

            one, two = client(), client()
            assert await one.connect() and await two.connect()
            try:
                assert await _read(one, 1) == _expected(specs[0].points)
                assert await _read(one, 3) == _expected(specs[2].points)
                assert await _silent(one, 2)
                assert await _read(two, 3) == _expected(specs[2].points)
                assert bus.stats()["overlaps"] == 0
                # Two masters, one line: their requests overlap on it.
                got = await asyncio.gather(_read(one, 1), _read(two, 3))
                assert got == [_expected(specs[0].points), _expected(specs[2].points)]
            finally:
                one.close()
                two.close()
            stats = bus.stats()
        assert stats["overlaps"] > 0
        assert stats["units"]["2"]["requests"] == 1
        assert stats["units"]["2"]["answered"] == 0

    _run(go)


# -- the serial-to-Ethernet gateway (Modbus TCP in front) --


def test_gateway_serves_16_units_one_connection_at_a_time(tmp_path: Path) -> None:
    specs = _specs(16, u5="dead")

    async def go() -> None:
        async with MbapGateway(
            specs, "127.0.0.1", 0, max_connections=1, target_timeout=0.2, step=STEP
        ) as gw:
            first = AsyncModbusTcpClient("127.0.0.1", port=gw.port, timeout=1.0, retries=0)
            assert await first.connect()
            try:
                for spec in specs:
                    if spec.unit == 5:
                        assert await _silent(first, 5)
                    else:
                        assert await _read(first, spec.unit) == _expected(spec.points)
                # A second connection is closed at once, and counted.
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                assert await asyncio.wait_for(reader.read(), 2.0) == b""
                await _closed(writer)
                # The first one is unaffected.
                assert await _read(first, 16) == _expected(specs[15].points)
            finally:
                first.close()
            stats = gw.stats()
        assert stats["connections_refused"] == 1
        assert stats["overlaps"] == 0
        assert stats["units"]["5"]["requests"] == 1 and stats["units"]["5"]["answered"] == 0
        assert stats["units"]["16"]["answered"] == 2

    _run(go)


def test_gateway_serialises_requests_and_counts_those_that_had_to_wait(tmp_path: Path) -> None:
    specs = _specs(2)
    timing = LineTiming(9600)  # the bus behind the gateway: each exchange takes ~14 ms

    async def go() -> None:
        async with MbapGateway(
            specs, "127.0.0.1", 0, max_connections=2, timing=timing, step=STEP
        ) as gw:
            one = AsyncModbusTcpClient("127.0.0.1", port=gw.port, timeout=2.0, retries=0)
            two = AsyncModbusTcpClient("127.0.0.1", port=gw.port, timeout=2.0, retries=0)
            assert await one.connect() and await two.connect()
            try:
                began = time.monotonic()
                got = await asyncio.gather(_read(one, 1, 2), _read(two, 2, 2))
                took = time.monotonic() - began
            finally:
                one.close()
                two.close()
            stats = gw.stats()
        assert got == [_expected(specs[0].points)[:2], _expected(specs[1].points)[:2]]
        assert stats["overlaps"] == 1
        # One after the other on the bus behind: two exchanges of 8 + 9 bytes.
        assert took >= 2 * timing.exchange_time(8, 9)

    _run(go)


def test_gateway_sees_a_request_sent_before_the_previous_answer(tmp_path: Path) -> None:
    """Two requests in one write on one connection: both answered, in order, one overlap."""
    specs = _specs(2)

    def mbap(tid: int, unit: int) -> bytes:
        return tid.to_bytes(2, "big") + b"\0\0\0\x06" + bytes([unit]) + bytes.fromhex("0300000002")

    async def go() -> None:
        async with MbapGateway(specs, "127.0.0.1", 0, step=STEP) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            try:
                writer.write(mbap(7, 1) + mbap(8, 2))
                answers = [await asyncio.wait_for(reader.readexactly(13), 2.0) for _ in (1, 2)]
            finally:
                await _closed(writer)
            stats = gw.stats()
        for answer, tid, spec in zip(answers, (7, 8), specs, strict=True):
            assert answer[:2] == tid.to_bytes(2, "big")
            assert answer[6] == spec.unit
            assert answer[7:9] == bytes([3, 4])
            regs = [int.from_bytes(answer[9 + 2 * i : 11 + 2 * i], "big") for i in (0, 1)]
            assert regs == _expected(spec.points)[:2]
        assert stats["overlaps"] == 1

    _run(go)


def test_gateway_can_answer_a_silent_unit_with_exception_0b(tmp_path: Path) -> None:
    async def go() -> None:
        async with MbapGateway(
            _specs(1), "127.0.0.1", 0, target_timeout=0.05, answer_timeout=True, step=STEP
        ) as gw:
            client = AsyncModbusTcpClient("127.0.0.1", port=gw.port, timeout=1.0, retries=0)
            assert await client.connect()
            try:
                response = await client.read_holding_registers(0, count=2, device_id=7)
            finally:
                client.close()
        assert response.isError() and response.exception_code == 0x0B

    _run(go)


# -- fieldgate simulate modbus --rtu|--rtu-over-tcp|--gateway --


def test_cli_rtu_prints_the_port_keeps_stats_and_writes_a_link(
    tmp_path: Path, pki_dir: Path, procs: list[Proc]
) -> None:
    stats_file = tmp_path / "stats.json"
    config = tmp_path / "gateway.toml"
    sim = Proc(
        fieldgate(
            "simulate",
            "modbus",
            "--rtu",
            "--units",
            "8",
            "--fault",
            "3=dead",
            "--baud",
            "57600",
            "--serial-dir",
            str(tmp_path / "line"),
            "--stats",
            str(stats_file),
            "--write-config",
            str(config),
            "--pki",
            str(pki_dir),
            "--step",
            str(STEP),
            "--types",
            "int32",
            "--points",
            str(POINTS),
        ),
        tmp_path / "sim.log",
    )
    procs.append(sim)
    found = sim.wait_for(r"8 simulated Modbus devices on serial (\S+) \(RTU, 57600 baud 8N1")
    path = Path(found.group(1))
    assert path == tmp_path / "line" / "gateway"
    assert json.loads(stats_file.read_text())["endpoint"]["port"] == str(path)
    timing = LineTiming(57600)
    specs = _specs(8)

    async def go() -> None:
        async with _master(path, timing) as client:
            assert await _read(client, 1) == _expected(specs[0].points)
            assert await _read(client, 8) == _expected(specs[7].points)
            assert await _silent(client, 3)

    _run(go)

    def counted() -> bool:
        stats = json.loads(stats_file.read_text())
        return bool(stats["requests"] == 3 and stats["units"]["3"]["requests"] == 1)

    wait_until(counted, 10, "the stats file to count 3 requests")
    written = tomllib.loads(config.read_text())
    assert written["links"] == [
        {
            "name": "sim-bus",
            "type": "rtu",
            "port": str(path),
            "baud": 57600,
            "parity": "N",
            "stop_bits": 1,
        }
    ]
    assert [d["modbus"] for d in written["devices"]] == [
        {"link": "sim-bus", "unit": u} for u in range(1, 9)
    ]
    assert json.loads(stats_file.read_text())["overlaps"] == 0
    sim.stop()
    assert sim.popen.returncode == 0, sim.output()
    assert not path.exists()  # socat stopped, its links gone


def test_cli_gateway_refuses_a_second_connection(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_ports(1)
    stats_file = tmp_path / "stats.json"
    sim = Proc(
        fieldgate(
            "simulate",
            "modbus",
            "--gateway",
            "--units",
            "16",
            "--max-connections",
            "1",
            "--port",
            str(port),
            "--stats",
            str(stats_file),
        ),
        tmp_path / "sim.log",
    )
    procs.append(sim)
    sim.wait_for(f"16 simulated Modbus devices on gateway 127.0.0.1:{port}")

    async def go() -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0)
        assert await client.connect()
        try:
            await _read(client, 16, 2)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 2.0) == b""
            await _closed(writer)
        finally:
            client.close()

    _run(go)
    wait_until(
        lambda: json.loads(stats_file.read_text())["connections_refused"] == 1,
        10,
        "the refused connection in the stats",
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--rtu", "--fault", "9=dead"), "9=dead: no simulated device '9'"),
        (("--rtu", "--fault", "2=crc:0"), "crc:N"),
        (("--rtu", "--units", "300"), "300: a bus carries 1 to 247 units"),
        (("--rtu-over-tcp", "--baud", "0"), "baud must be positive"),
        (
            (
                "--baud",
                "9600",
            ),
            "--baud is for a bus: add --rtu, --rtu-over-tcp or --gateway",
        ),
        (("--rtu", "--max-connections", "1"), "a serial line has no connections to limit"),
    ],
)
def test_cli_bad_bus_options_are_one_clear_line(args: tuple[str, ...], says: str) -> None:
    import subprocess

    done = subprocess.run(
        fieldgate("simulate", "modbus", "--devices", "4", *args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert says in done.stderr


def test_cli_rtu_without_socat_says_so_in_one_line(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        fieldgate("simulate", "modbus", "--rtu", "--serial-dir", str(tmp_path / "line")),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(tmp_path / "no-such-bin")},
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "fieldgate: cannot start the simulated bus: socat is not installed "
        "(Debian: apt-get install socat)"
    )
