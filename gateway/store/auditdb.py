"""The audit log's durable table: ``state_dir/audit.db``, a SQLite file of its own.

The audit log is kept by the store's code but not in the readings' file, on purpose:

- its quota is its own by construction: the readings' drop policy never touches it;
- a store that is moved aside as damaged, replaced or reset takes no audit record with it
  (the reset is itself a record of the chain that survives);
- ``store.kind = "memory"`` still keeps a durable audit log.

One table, ``items``: the records and signed heads in the order the gateway wrote them, each as
the line of the audit file (``docs/audit.md``), so that what the hub receives, what ``fieldgate
audit verify`` reads and what is on disk are the same bytes. ``meta`` keeps the stream's
position (how far the hub has acknowledged), the quota's anchor (the last pruned record) and the
tamper baselines of the last run. Blocking calls: the audit log runs them on its own I/O thread.
Its SQLite connections and errors come from :mod:`gateway.store.sqlite`, apsw's one module.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.store import sqlite
from gateway.store.sqlite import StoreCorrupt, StoreError, private_file

FILE_NAME = "audit.db"
SCHEMA_VERSION = 1
# Room kept beside the log for the records of a full disk (the stop's among them): given up
# when a commit finds the disk full, made again once commits succeed.
RESERVE_BYTES = 256 * 1024
RESERVE_RETRY = 10.0  # seconds between tries to make the reserve again
SCHEMA = """
CREATE TABLE items (
    pos  INTEGER PRIMARY KEY,   -- the stream's order: records and heads as written
    seq  INTEGER NOT NULL,      -- the record's seq, or the seq the head signs
    head INTEGER NOT NULL,      -- 1: a signed head, 0: a record
    line TEXT    NOT NULL       -- the audit file's line (canonical JSON)
);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

Item = tuple[int, int, int, str]  # pos, seq, head, line
log = logging.getLogger("fieldgate.audit")


class AuditDb:
    """One connection, used from one thread at a time (the audit log's I/O thread, or the
    caller's when there is no event loop)."""

    def __init__(self, path: Path, *, synchronous: str = "FULL", vfs: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_file(self.path)
        try:
            conn = sqlite.connect(self.path, vfs=vfs)
        except sqlite.CantOpenError as err:
            raise StoreError(f"{self.path}: cannot open the audit log: {err}") from err
        self._conn = conn
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self._reserve_tried = 0.0
        self._has_reserve = self.reserve_path.exists()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            check = list(conn.execute("PRAGMA quick_check"))
            if check != [("ok",)]:
                raise StoreCorrupt(f"{self.path}: quick_check: {check[:3]}")
            version = next(iter(conn.execute("PRAGMA user_version")))[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: audit schema {version} is newer than this fieldgate "
                    f"({SCHEMA_VERSION})"
                )
            if version == 0:
                with conn:
                    conn.execute(SCHEMA)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException as err:
            conn.close()
            if isinstance(err, sqlite.DAMAGE_ERRORS):
                raise StoreCorrupt(f"{self.path}: {err}") from err
            raise

    def meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta"))

    def last_pos(self) -> int:
        row = list(self._conn.execute("SELECT max(pos) FROM items"))
        return int(row[0][0]) if row[0][0] is not None else -1

    def last_line(self, *, head: bool) -> str | None:
        rows = list(
            self._conn.execute(
                "SELECT line FROM items WHERE head = ? ORDER BY pos DESC LIMIT 1", (int(head),)
            )
        )
        return str(rows[0][0]) if rows else None

    def bytes_through(self, pos: int | None = None) -> int:
        """Bytes of the lines kept (up to ``pos``, inclusive)."""
        sql = "SELECT coalesce(sum(length(line)), 0) FROM items"
        rows = list(
            self._conn.execute(sql + " WHERE pos <= ?", (pos,))
            if pos is not None
            else self._conn.execute(sql)
        )
        return int(rows[0][0])

    def commit(
        self, items: Sequence[Item], meta: dict[str, str], prune_through: int | None = None
    ) -> None:
        """One transaction: drop the items up to ``prune_through``, add ``items``, set
        ``meta``. On a full disk the reserve is given up and the commit tried once more; then
        a disk error of ``DISK_ERRORS`` (nothing of it is written)."""
        try:
            self._commit(items, meta, prune_through)
        except sqlite.DISK_ERRORS:
            if not self._release_reserve():
                raise
            self._commit(items, meta, prune_through)
        self._ensure_reserve()

    def _release_reserve(self) -> bool:
        self._has_reserve = False
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        self._reserve_tried = time.monotonic()
        return True

    def _ensure_reserve(self) -> None:
        """Make the reserve if it is missing (not more often than RESERVE_RETRY)."""
        if self._has_reserve or time.monotonic() - self._reserve_tried < RESERVE_RETRY:
            return
        self._reserve_tried = time.monotonic()
        tmp = self.reserve_path.with_name(self.reserve_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                chunk = bytes(64 * 1024)
                left = RESERVE_BYTES
                while left > 0:
                    left -= os.write(fd, chunk[: min(left, len(chunk))])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve_path)
            self._has_reserve = True
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("audit log reserve %s: %s", self.reserve_path, err)

    def _commit(
        self, items: Sequence[Item], meta: dict[str, str], prune_through: int | None
    ) -> None:
        with self._conn:
            if prune_through is not None:
                self._conn.execute("DELETE FROM items WHERE pos <= ?", (prune_through,))
            if items:
                self._conn.executemany(
                    "INSERT INTO items (pos, seq, head, line) VALUES (?, ?, ?, ?)", items
                )
            if meta:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items()
                )

    def prune_plan(self, limit_pos: int, want: int) -> tuple[int, int | None, str | None]:
        """The oldest items up to ``limit_pos`` that free at least ``want`` bytes: (bytes,
        the last such pos, the last such record's line: the anchor a verifier resumes at)."""
        freed, through, anchor = 0, None, None
        for pos, head, line in self._conn.execute(
            "SELECT pos, head, line FROM items WHERE pos <= ? ORDER BY pos", (limit_pos,)
        ):
            freed += len(line)
            through = int(pos)
            if not head:
                anchor = str(line)
            if freed >= want:
                break
        return freed, through, anchor

    def read(self, after: int, limit: int) -> list[tuple[int, str]]:
        return [
            (int(pos), str(line))
            for pos, line in self._conn.execute(
                "SELECT pos, line FROM items WHERE pos > ? ORDER BY pos LIMIT ?", (after, limit)
            )
        ]

    def close(self) -> None:
        self._conn.close()


DISK_ERRORS = sqlite.DISK_ERRORS


def read_items(path: Path, after: int = -1) -> tuple[list[tuple[int, str]], dict[str, str]]:
    """Every item after ``after`` and the meta of an audit database, read-only, while a gateway
    may be writing it (WAL readers do not block the writer)."""
    try:
        conn = sqlite.connect(path, readonly=True)
    except sqlite.CantOpenError as err:
        raise StoreError(f"{path}: cannot open the audit log: {err}") from err
    try:
        try:
            items = [
                (int(pos), str(line))
                for pos, line in conn.execute(
                    "SELECT pos, line FROM items WHERE pos > ? ORDER BY pos", (after,)
                )
            ]
            meta = dict(conn.execute("SELECT key, value FROM meta"))
        except sqlite.SQLError as err:  # created, schema not yet written
            if "no such table" in str(err):
                return [], {}
            raise
        except sqlite.DAMAGE_ERRORS as err:
            raise StoreCorrupt(f"{path}: {err}") from err
    finally:
        conn.close()
    return items, meta


def move_aside(path: Path, why: str) -> Path:
    """Keep an audit log that cannot go on (damaged, another chain's) under a new name, with
    its WAL; returns the new main file's path."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(path) + suffix)
        if source.exists():
            source.rename(Path(str(target) + suffix))
    return target


def is_audit_db(path: Path) -> bool:
    """Whether ``path`` is a SQLite file (the audit database) rather than an audit file."""
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


__all__ = [
    "DISK_ERRORS",
    "FILE_NAME",
    "AuditDb",
    "StoreCorrupt",
    "StoreError",
    "is_audit_db",
    "move_aside",
    "read_items",
]
