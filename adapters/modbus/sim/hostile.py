"""A Modbus TCP device that misbehaves on purpose: a raw asyncio MBAP server, not pymodbus.

Written from the protocol, not from pymodbus, so it is an independent implementation of the
device side: a frame pymodbus would never send (or would quietly repair) is sent as asked.

It parses MBAP requests for the read functions (1-4; anything else is answered with exception
01) and answers each according to a plan of ``mode:count`` steps taken in order by the request
count over all connections (the last step repeats forever), e.g. ``good:20,wrong_fc:30,good``.
The mode ``fuzz`` is a window of malformed answers: each of its requests gets one of
:data:`FUZZ_MODES`, drawn from a ``random.Random(seed)``, so a run is repeated exactly by its
seed (the draws depend on the request count only, not on time).

A correct answer holds the register values ``1000 + address`` (bits: all on), or, given a map
of :class:`~adapters.modbus.sim.devices.SimPoint`, what those points hold during the current
time step (:func:`~adapters.modbus.sim.devices.value_at`), so a reading can be checked exactly.
Every wrong answer holds :data:`BAD` (bits: all off) so that a leak shows at the hub.

The answers are pure (:func:`answer`: a request and its correct values in, timed chunks of
bytes out), so the frames can be checked without a socket; the server only writes them.

Run as ``python -m adapters.modbus.sim.hostile --port P --plan PLAN [--seed S] [--points N]
[--stats FILE]``: the stats file (JSON, rewritten after each request) says how many answers of
each mode were sent, and how many held a correct answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapters.modbus.config import REGISTER_WIDTH
from adapters.modbus.registers import encode_value
from adapters.modbus.sim.devices import SimPoint, make_points, value_at

BAD = 0x0BAD

MODES: dict[str, str] = {
    "good": "a correct answer",
    "wrong_fc": "the answer of the sibling function (3 <-> 4, 1 <-> 2)",
    "wrong_tid": "transaction id + 1",
    "wrong_unit": "unit id + 1",
    "wrong_pid": "a protocol id that is not 0 (Modbus)",
    "short": "one register (or byte of bits) fewer than asked, consistent MBAP length",
    "long": "one register (or byte of bits) more than asked, consistent MBAP length",
    "odd": "an odd byte count (registers), or one byte of bits too many, consistent length",
    "trailing": "a correct frame followed by garbage bytes",
    "padded": "byte count right, but the MBAP length covers two extra bytes",
    "overcount": "the byte count claims more data than the frame holds",
    "mbap_short": "the MBAP length says two bytes fewer than the frame holds",
    "mbap_long": "the MBAP length says 20 bytes more than are ever sent",
    "mbap_huge": "the MBAP length is 65535",
    "unknown_fc": "an answer with a function code that does not exist",
    "truncated": "half a frame, then nothing",
    "split": "a correct frame in two halves, the second a moment later (a correct answer)",
    "late_rest": "half a frame, the rest only after the client's timeout",
    "garbage": "bytes that are no MBAP frame at all",
    "exc_long": "an exception frame with a byte after the exception code",
    "exc_short": "an exception frame without its exception code (MBAP length 2)",
    "unsolicited": "a correct answer, then a response to a request never made",
    "duplicate": "a correct answer, then a second response (wrong values) to the same request",
    "exc0b": "exception 0x0B: gateway target device failed to respond",
    "flood": "a correct answer, then a flood of unsolicited frames in the same write",
    "reset": "the connection is reset (RST) instead of an answer",
    "silent": "no answer at all",
    "fuzz": "one of FUZZ_MODES, drawn from the seeded generator",
}
# Malformed answers the ``fuzz`` window draws from (no protocol-correct ones, no resets).
FUZZ_MODES: tuple[str, ...] = (
    "wrong_fc",
    "wrong_tid",
    "wrong_unit",
    "wrong_pid",
    "short",
    "long",
    "odd",
    "trailing",
    "padded",
    "overcount",
    "mbap_short",
    "mbap_long",
    "mbap_huge",
    "unknown_fc",
    "truncated",
    "split",
    "late_rest",
    "garbage",
    "exc_long",
    "exc_short",
    "unsolicited",
    "duplicate",
    "flood",
)
# Modes whose bytes hold the correct answer (``split``: in two parts) before anything else:
# the client must take it, and only it.
ANSWERED = frozenset({"good", "split", "unsolicited", "duplicate"})

DELAY = 0.01  # between the chunks of an answer that comes in parts


@dataclass(frozen=True, slots=True)
class Request:
    """A read request as it arrived."""

    transaction_id: int
    unit: int
    function_code: int
    address: int
    count: int

    @property
    def bits(self) -> bool:
        return self.function_code in (1, 2)


def parse_plan(text: str) -> list[tuple[str, int | None]]:
    steps: list[tuple[str, int | None]] = []
    for part in text.split(","):
        mode, _, count = part.partition(":")
        if mode not in MODES:
            raise ValueError(f"plan {text!r}: unknown mode {mode!r} (known: {', '.join(MODES)})")
        if count and not count.isdigit():
            raise ValueError(f"plan {text!r}: {mode}:{count}: the count is not a number")
        steps.append((mode, int(count) if count else None))
    return steps


def frame(tid: int, unit: int, pdu: bytes, extra_len: int = 0) -> bytes:
    """An MBAP frame; ``extra_len`` makes its length field lie by that many bytes."""
    return struct.pack(">HHHB", tid, 0, (len(pdu) + 1 + extra_len) & 0xFFFF, unit) + pdu


def read_pdu(fc: int, values: Sequence[int] | None, count: int) -> bytes:
    """The PDU of a read answer: ``values`` (registers, or 0/1 per bit), or, None, ``count``
    registers (bits) of :data:`BAD` (bits: all off)."""
    if fc in (1, 2):
        bits = list(values) if values is not None else [0] * count
        packed = bytearray((len(bits) + 7) // 8)
        for i, bit in enumerate(bits):
            if bit:
                packed[i // 8] |= 1 << (i % 8)
        return bytes([fc, len(packed)]) + bytes(packed)
    regs = list(values) if values is not None else [BAD] * count
    return bytes([fc, 2 * len(regs)]) + struct.pack(f">{len(regs)}H", *regs)


def answer(
    mode: str, request: Request, values: Sequence[int], late: float = 1.0
) -> list[tuple[float, bytes]]:
    """What the device sends for ``request`` in ``mode``, given the correct ``values``: chunks
    of bytes, each after a delay in seconds. Empty: nothing at all (``silent``)."""
    tid, unit, fc, count = (
        request.transaction_id,
        request.unit,
        request.function_code,
        request.count,
    )
    good = frame(tid, unit, read_pdu(fc, values, count))
    bad_pdu = read_pdu(fc, None, count)
    half = len(good) // 2
    if mode == "good":
        return [(0.0, good)]
    if mode == "wrong_fc":
        return [(0.0, frame(tid, unit, read_pdu({1: 2, 2: 1, 3: 4, 4: 3}[fc], None, count)))]
    if mode == "wrong_tid":
        return [(0.0, frame((tid + 1) & 0xFFFF, unit, bad_pdu))]
    if mode == "wrong_unit":
        return [(0.0, frame(tid, (unit + 1) & 0xFF, bad_pdu))]
    if mode == "wrong_pid":
        return [(0.0, good[:2] + b"\x00\x01" + frame(tid, unit, bad_pdu)[4:])]
    if mode in ("short", "long"):
        delta = -1 if mode == "short" else 1
        n = max(0, count + (8 if request.bits else 1) * delta)
        return [(0.0, frame(tid, unit, read_pdu(fc, None, n)))]
    if mode == "odd":
        n = 2 * count - 1 if not request.bits else (count + 7) // 8 + 1
        return [(0.0, frame(tid, unit, bytes([fc, n]) + b"\x0b" * n))]
    if mode == "trailing":
        return [(0.0, good + b"\xde\xad\xbe\xef\x00")]
    if mode == "padded":
        return [(0.0, frame(tid, unit, bad_pdu, extra_len=2) + b"\x0b\xad")]
    if mode == "overcount":
        wrong = bytearray(bad_pdu)
        wrong[1] += 2
        return [(0.0, frame(tid, unit, bytes(wrong)))]
    if mode == "mbap_short":
        return [(0.0, frame(tid, unit, bad_pdu, extra_len=-2))]
    if mode == "mbap_long":
        return [(0.0, frame(tid, unit, bad_pdu, extra_len=20))]
    if mode == "mbap_huge":
        return [(0.0, struct.pack(">HHHB", tid, 0, 0xFFFF, unit) + bad_pdu)]
    if mode == "unknown_fc":
        return [(0.0, frame(tid, unit, bytes([0x47, 0x00])))]
    if mode == "truncated":
        return [(0.0, good[:half])]
    if mode == "split":
        return [(0.0, good[:half]), (DELAY, good[half:])]
    if mode == "late_rest":
        return [(0.0, good[:half]), (late, good[half:])]
    if mode == "garbage":
        return [(0.0, b"\xff\xfe\x13\x37" * 8)]
    if mode == "exc_long":
        return [(0.0, frame(tid, unit, bytes([fc | 0x80, 0x02, 0x00])))]
    if mode == "exc_short":
        return [(0.0, frame(tid, unit, bytes([fc | 0x80])))]
    if mode == "unsolicited":
        never = frame(tid ^ 0x8000, unit, read_pdu(3, None, 2))
        return [(0.0, good), (DELAY, never)]
    if mode == "duplicate":
        return [(0.0, good), (DELAY, frame(tid, unit, bad_pdu))]
    if mode == "exc0b":
        return [(0.0, frame(tid, unit, bytes([fc | 0x80, 0x0B])))]
    if mode == "flood":
        flood = [frame((tid + 100 + i) & 0xFFFF, unit, bad_pdu) for i in range(50)]
        return [(0.0, good + b"".join(flood))]
    if mode == "silent":
        return []
    raise ValueError(f"mode {mode!r} has no answer")


class RegisterMap:
    """The correct values of a device's tables: ``1000 + address`` (bits: on) by default, or
    what ``points`` hold during the current time step of ``step`` seconds."""

    def __init__(self, points: Sequence[SimPoint] = (), step: float = 1.0) -> None:
        self.points = list(points)
        self.step = step
        self._tables: dict[str, dict[int, int]] = {}
        self._at: int | None = None

    def values(self, fc: int, address: int, count: int) -> list[int]:
        if not self.points:
            if fc in (1, 2):
                return [1] * count
            return [(1000 + address + i) & 0xFFFF for i in range(count)]
        step = int(time.time() / self.step)
        if step != self._at:
            self._at, self._tables = step, self._fill(step)
        table = self._tables.get({1: "coil", 2: "discrete", 3: "holding", 4: "input"}[fc], {})
        return [table.get(address + i, 0) for i in range(count)]

    def _fill(self, step: int) -> dict[str, dict[int, int]]:
        tables: dict[str, dict[int, int]] = {}
        for sp in self.points:
            point = sp.point
            words = encode_value(point, value_at(point, sp.seed, step))
            table = tables.setdefault(point.table, {})
            for i, word in enumerate(words[: REGISTER_WIDTH[point.type]]):
                table[point.address + i] = word
        return tables


class HostileDevice:
    """The device on ``127.0.0.1:port``, as an async context manager (or :meth:`serve_forever`).

    ``sent`` counts answers per mode (the ``fuzz`` draws under their own names), ``answered``
    the requests whose bytes held a correct answer, ``history`` the modes in request order."""

    def __init__(
        self,
        port: int,
        plan: str,
        stats: Path | None = None,
        on_request: Callable[[], None] | None = None,
        *,
        seed: int = 0,
        registers: RegisterMap | None = None,
        late: float = 1.0,
    ) -> None:
        self.port = port
        self._on_request = on_request
        self.steps = parse_plan(plan)
        self.stats_path = stats
        self.registers = registers or RegisterMap()
        self.late = late
        self._rng = random.Random(seed)
        self.sent: Counter[str] = Counter()
        self.history: list[str] = []
        self.answered = 0
        self.requests = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    def mode(self) -> str:
        """The plan's mode for the next request (``fuzz`` not yet drawn)."""
        index = self.requests
        for mode, count in self.steps:
            if count is None or index < count:
                return mode
            index -= count
        return self.steps[-1][0]

    async def __aenter__(self) -> HostileDevice:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            self._stopping.set()  # a delayed chunk is not waited for
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._server = None

    async def serve_forever(self) -> None:
        async with self:
            assert self._server is not None
            print(f"hostile Modbus device on 127.0.0.1:{self.port}", flush=True)
            await self._server.serve_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                header = await reader.readexactly(7)
                tid, _pid, length, unit = struct.unpack(">HHHB", header)
                if length < 2:
                    return
                pdu = await reader.readexactly(length - 1)
                if not await self._request(writer, tid, unit, pdu):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _request(self, writer: asyncio.StreamWriter, tid: int, unit: int, pdu: bytes) -> bool:
        """Answer one request; False: the connection is done."""
        fc = pdu[0]
        if fc not in (1, 2, 3, 4) or len(pdu) < 5:
            writer.write(frame(tid, unit, bytes([fc | 0x80, 0x01])))
            await writer.drain()
            return True
        address, count = struct.unpack(">HH", pdu[1:5])
        request = Request(tid, unit, fc, address, count)
        mode = self.mode()
        if mode == "fuzz":
            mode = self._rng.choice(FUZZ_MODES)
        self.requests += 1
        self.sent[mode] += 1
        self.history.append(mode)
        self.answered += mode in ANSWERED
        self._write_stats()
        if self._on_request is not None:
            self._on_request()
        if mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        chunks = answer(mode, request, self.registers.values(fc, address, count), self.late)
        for delay, data in chunks:
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
            if writer.is_closing() or self._stopping.is_set():
                return False
            writer.write(data)
            await writer.drain()
        return True

    def _write_stats(self) -> None:
        if self.stats_path is not None:
            tmp = self.stats_path.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "requests": self.requests,
                        "connections": self.connections,
                        "answered": self.answered,
                        "sent": dict(self.sent),
                    }
                )
            )
            tmp.replace(self.stats_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plan", required=True, help="mode:count,... (modes: see the module)")
    parser.add_argument("--seed", type=int, default=0, help="of the fuzz window's draws")
    parser.add_argument(
        "--points",
        type=int,
        default=0,
        help="serve make_points(N, seed=--map-seed) values (default: 1000 + address)",
    )
    parser.add_argument("--map-seed", type=int, default=0)
    parser.add_argument("--step", type=float, default=1.0, help="seconds per value step")
    parser.add_argument("--late", type=float, default=1.0, help="late_rest: seconds")
    parser.add_argument("--stats", type=Path)
    args = parser.parse_args()
    registers = RegisterMap(
        make_points(args.points, seed=args.map_seed) if args.points else (), args.step
    )
    try:
        device = HostileDevice(
            args.port, args.plan, args.stats, seed=args.seed, registers=registers, late=args.late
        )
    except ValueError as err:
        parser.error(f"--plan: {err}")
    try:
        asyncio.run(device.serve_forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
