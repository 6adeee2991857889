"""A power cut for SQLite: an apsw VFS that can throw away every write that was not synced.

kill -9 alone cannot tell a durable store from one that is not: the OS page cache survives the
process. This VFS journals the previous content of every write and truncate *before* doing it,
and marks a file's journal durable at each xSync. After the writer is killed, :func:`cut`
undoes, newest first, every write not covered by a later sync of its file: what a power cut
would have lost.

Run as a program it is the writer: ``python powercut.py DB JOURNAL SYNCHRONOUS`` puts envelopes
into the real :class:`gateway.store.Store` through this VFS and prints ``ack N`` after each
``put`` returned.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from pathlib import Path
from typing import Any

import apsw

VFS_NAME = "powercut"
_REC = struct.Struct(">cHqqq")  # kind, name length, offset/new size, old size, data length


class _Journal:
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def record(self, kind: bytes, name: str, position: int, old_size: int, data: bytes) -> None:
        encoded = name.encode()
        # One write per record: a kill cannot leave half of it behind.
        os.write(
            self._fd, _REC.pack(kind, len(encoded), position, old_size, len(data)) + encoded + data
        )


class _File(apsw.VFSFile):  # type: ignore[misc]
    def __init__(self, journal: _Journal, name: Any, flags: list[int]) -> None:
        super().__init__("", name, flags)
        self._journal = journal
        self._name = name.filename() if hasattr(name, "filename") else str(name)

    def _old(self, offset: int, length: int) -> tuple[bytes, int]:
        size = self.xFileSize()
        if offset >= size or length <= 0:
            return b"", size
        return self.xRead(min(length, size - offset), offset), size

    def xWrite(self, data: bytes, offset: int) -> None:
        old, size = self._old(offset, len(data))
        self._journal.record(b"W", self._name, offset, size, old)
        super().xWrite(data, offset)

    def xTruncate(self, newsize: int) -> None:
        old, size = self._old(newsize, 1 << 62)
        self._journal.record(b"T", self._name, newsize, size, old)
        super().xTruncate(newsize)

    def xSync(self, flags: int) -> None:
        super().xSync(flags)
        self._journal.record(b"S", self._name, 0, 0, b"")


class PowerCutVFS(apsw.VFS):  # type: ignore[misc]
    def __init__(self, journal: Path) -> None:
        self._journal = _Journal(journal)
        super().__init__(VFS_NAME, "")

    def xOpen(self, name: Any, flags: list[int]) -> _File:
        return _File(self._journal, name, flags)


def cut(journal: Path) -> int:
    """Undo every write not followed by a sync of its file; returns how many were undone."""
    data = journal.read_bytes() if journal.exists() else b""
    records: list[tuple[bytes, str, int, int, bytes]] = []
    pos = 0
    while pos + _REC.size <= len(data):
        kind, name_len, position, old_size, data_len = _REC.unpack_from(data, pos)
        pos += _REC.size
        name = data[pos : pos + name_len].decode()
        pos += name_len
        payload = data[pos : pos + data_len]
        pos += data_len
        records.append((kind, name, position, old_size, payload))
    last_sync: dict[str, int] = {}
    for index, (kind, name, *_rest) in enumerate(records):
        if kind == b"S":
            last_sync[name] = index
    undone = 0
    for index in range(len(records) - 1, -1, -1):
        kind, name, position, old_size, old = records[index]
        if kind == b"S" or index < last_sync.get(name, -1) or not os.path.exists(name):
            continue
        with open(name, "r+b") as f:
            if kind == b"W":
                f.seek(position)
                f.write(old)
                f.truncate(old_size) if os.path.getsize(name) > old_size else None
            else:  # truncate: put back what it cut off
                f.seek(position)
                f.write(old)
        undone += 1
    return undone


async def _writer(db: Path, synchronous: str, count: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gateway.core.readings import CODEC, Envelope, Header
    from gateway.store import Store

    async with Store(db, max_bytes=1 << 40, synchronous=synchronous, vfs=VFS_NAME) as store:
        for i in range(count):
            body = os.urandom(600)
            await store.put([Envelope("dev", Header(1, "k1", "b", i * 10, 10, CODEC), body, 0)])
            print(f"ack {i}", flush=True)


if __name__ == "__main__":
    db_path, journal_path, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    vfs = PowerCutVFS(journal_path)
    asyncio.run(_writer(db_path, mode, 100_000))
