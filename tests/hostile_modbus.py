"""A Modbus TCP device that misbehaves on purpose: a raw asyncio server, not pymodbus.

It parses MBAP requests for the read functions (1-4) and answers each according to a plan of
``mode:count`` steps taken in order by the request count over all connections (the last step
repeats forever), e.g. ``good:20,wrong_fc:30,good``. A correct answer holds the register values
``1000 + address`` (bits: all on); every wrong answer holds ``BAD`` so that a leak shows at the
hub. Run as ``python tests/hostile_modbus.py --port P --plan PLAN --stats FILE``: the stats file
(JSON, rewritten after each request) says how many answers of each mode were sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path

BAD = 0x0BAD

MODES = (
    "good",  # a correct answer
    "wrong_fc",  # the answer of the sibling function (3 <-> 4, 1 <-> 2)
    "wrong_tid",  # transaction id + 1
    "wrong_unit",  # unit id + 1
    "short",  # one register (or byte of bits) fewer than asked, consistent MBAP length
    "long",  # one register (or byte of bits) more than asked, consistent MBAP length
    "trailing",  # a correct frame followed by garbage bytes
    "padded",  # byte count right, but the MBAP length covers two extra bytes
    "overcount",  # the byte count claims more data than the frame holds
    "unknown_fc",  # an answer with a function code that does not exist
    "truncated",  # half a frame, then nothing
    "garbage",  # bytes that are no MBAP frame at all
    "exc0b",  # exception 0x0B: gateway target device failed to respond
    "flood",  # a correct answer, then a flood of unsolicited frames
    "reset",  # the connection is reset (RST) instead of an answer
    "silent",  # no answer at all
)


def parse_plan(text: str) -> list[tuple[str, int | None]]:
    steps: list[tuple[str, int | None]] = []
    for part in text.split(","):
        mode, _, count = part.partition(":")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        steps.append((mode, int(count) if count else None))
    return steps


def frame(tid: int, unit: int, pdu: bytes, extra_len: int = 0) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1 + extra_len, unit) + pdu


def read_pdu(fc: int, count: int, value: list[int] | None) -> bytes:
    """The PDU of a read answer with ``count`` registers (or bits); ``value`` None means BAD."""
    if fc in (1, 2):
        nbytes = (count + 7) // 8
        fill = 0xFF if value is not None else 0x00
        return bytes([fc, nbytes]) + bytes([fill] * nbytes)
    regs = value if value is not None else [BAD] * count
    return bytes([fc, 2 * len(regs)]) + struct.pack(f">{len(regs)}H", *regs)


class HostileDevice:
    def __init__(
        self,
        port: int,
        plan: str,
        stats: Path | None = None,
        on_request: Callable[[], None] | None = None,
    ) -> None:
        self.port = port
        self._on_request = on_request
        self.steps = parse_plan(plan)
        self.stats_path = stats
        self.sent: Counter[str] = Counter()
        self.requests = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def mode(self) -> str:
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
                pdu = await reader.readexactly(length - 1)
                mode = self.mode()
                self.requests += 1
                self.sent[mode] += 1
                self._write_stats()
                if self._on_request is not None:
                    self._on_request()
                if not self._answer(writer, mode, tid, unit, pdu):
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    def _answer(
        self, writer: asyncio.StreamWriter, mode: str, tid: int, unit: int, pdu: bytes
    ) -> bool:
        fc = pdu[0]
        address, count = struct.unpack(">HH", pdu[1:5])
        good_values = [1000 + address + i for i in range(count)]
        good = frame(tid, unit, read_pdu(fc, count, good_values))
        if mode == "good":
            writer.write(good)
        elif mode == "wrong_fc":
            writer.write(frame(tid, unit, read_pdu({1: 2, 2: 1, 3: 4, 4: 3}[fc], count, None)))
        elif mode == "wrong_tid":
            writer.write(frame((tid + 1) & 0xFFFF, unit, read_pdu(fc, count, None)))
        elif mode == "wrong_unit":
            writer.write(frame(tid, (unit + 1) & 0xFF, read_pdu(fc, count, None)))
        elif mode in ("short", "long"):
            delta = -1 if mode == "short" else 1
            if fc in (1, 2):
                wrong = read_pdu(fc, max(0, count + 8 * delta), None)
            else:
                wrong = read_pdu(fc, count, [BAD] * max(0, count + delta))
            writer.write(frame(tid, unit, wrong))
        elif mode == "trailing":
            writer.write(good + b"\xde\xad\xbe\xef\x00")
        elif mode == "padded":
            writer.write(frame(tid, unit, read_pdu(fc, count, None), extra_len=2) + b"\x0b\xad")
        elif mode == "overcount":
            wrong = bytearray(read_pdu(fc, count, None))
            wrong[1] += 2
            writer.write(frame(tid, unit, bytes(wrong)))
        elif mode == "unknown_fc":
            writer.write(frame(tid, unit, bytes([0x47, 0x00])))
        elif mode == "truncated":
            writer.write(good[: len(good) // 2])
        elif mode == "garbage":
            writer.write(b"\xff\xfe\x13\x37" * 8)
        elif mode == "exc0b":
            writer.write(frame(tid, unit, bytes([fc | 0x80, 0x0B])))
        elif mode == "flood":
            flood = [
                frame((tid + 100 + i) & 0xFFFF, unit, read_pdu(fc, count, None)) for i in range(50)
            ]
            writer.write(good + b"".join(flood))
        elif mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        return True

    def _write_stats(self) -> None:
        if self.stats_path is not None:
            tmp = self.stats_path.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "requests": self.requests,
                        "connections": self.connections,
                        "sent": dict(self.sent),
                    }
                )
            )
            tmp.replace(self.stats_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--stats", type=Path)
    args = parser.parse_args()
    try:
        asyncio.run(HostileDevice(args.port, args.plan, args.stats).serve_forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
