"""The durable queue: sealed envelopes on SQLite, FIFO per device, bounded by bytes.

The only module that imports apsw (SQLite); the audit log's file (auditdb.py) takes its
connections and errors from here. Offline inspection and the moves between store files are in
:mod:`gateway.store.inspect`, over the small read and write helpers at the end of this module.
It keeps :mod:`gateway.store.queue`'s contract:

- ``put`` returns once the envelopes are committed (WAL, ``synchronous=FULL``: NORMAL can lose
  committed rows on power loss). The device's next sequence number is committed in the same
  transaction, so a reading is *accepted* exactly when its envelope is durable.
- ``lease`` hands out the oldest envelopes of a device; ``ack`` (at PUBACK) removes one for
  good; ``release`` returns unacked leases to the head. After a crash or restart every row not
  yet deleted is leased again: delivery is at-least-once.
- Bounded by bytes with an explicit policy when full (``drop-oldest`` or ``refuse-newest``).
  Every drop is counted in the database and recorded as a security event; crossing 80% is
  recorded once per crossing.

Blocking SQLite work runs on one I/O thread, so a commit's fsync never stalls the event loop.
One ``put`` of many envelopes is one transaction: the gateway's writer task hands over
everything sealed since the last commit, so commits group by themselves under load.

A store file that cannot be opened or fails ``PRAGMA quick_check`` at start is moved aside
(kept, never deleted), a new store starts with a new boot id, and the event is recorded.

A full disk does not stop the gateway. When SQLite cannot write (``FullError``), new envelopes
are refused (counted per device; one ``store-disk-full`` event when it starts and one
``store-disk-writable`` with the counts when it ends, or ``store-intake-refused`` with them at a
stop while still full), while what the store holds keeps being
leased, delivered and deleted. A reserve file beside the store (``<store>.reserve``) is given
up at that moment, so that deletes, checkpoints and a restart have the room SQLite needs; intake
resumes by itself once the reserve can be written again (probed every ``PROBE_INTERVAL``).

Sequence numbers never go back unnoticed. Beside each device's ``next_seq`` the store keeps a
mark (``meta`` key ``seqmark:<device>``), authenticated with a key derived from the sealing
keys, so editing the file cannot forge one; a mark may lag behind its counter (renewed at most
every ``MARK_EVERY`` seconds and at a stop), never run ahead. At start, a ``next_seq`` below its
mark, below the end of an envelope still stored for the same boot, or a mark that does not
authenticate or is missing, means the sequence state went backwards: the event is recorded and
the store moves to a **new boot id**, so that new readings can never reuse numbers a consumer
has already seen. A whole older copy of the file, marks and all, is beyond what a file can tell
about itself: the consumer's conflict report is the defence there.

``Store`` stays one class (most of this module): its commit, cache, full-disk and mark logic
share one connection, one I/O thread and one transaction per put; splitting them would only
pass that state around. The bookkeeping it shares with the in-memory queue is the ledger's.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import apsw

from gateway.core.errors import FieldgateError
from gateway.core.readings import Envelope, Header
from gateway.store.ledger import Entry, Ledger, Policy
from gateway.store.queue import DeviceDepth, Leased

log = logging.getLogger("fieldgate.store")

SCHEMA_VERSION = 1
EventSink = Callable[..., None]
HIGH_WATER = 0.8
LOW_WATER = 0.7
DELETE_DELAY = 0.25  # seconds acks gather before one delete transaction
RESERVE_BYTES = 256 * 1024  # room kept for deletes, checkpoints and a restart on a full disk
PROBE_INTERVAL = 1.0  # seconds between tries to write again while the disk is full


class StoreError(FieldgateError):
    pass


class StoreNotReady(StoreError):
    """The file is there but holds no store yet."""


class StoreCorrupt(StoreError):
    pass


def _rows(conn: apsw.Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """Query rows, typed loosely: SQLite's values are checked where they are used."""
    return list(conn.execute(sql, params).fetchall())


def _schema(version: int) -> str:
    return (resources.files("gateway.store") / "schema" / f"schema_v{version}.sql").read_text()


def open_database(
    path: Path,
    *,
    synchronous: str = "FULL",
    vfs: str | None = None,
    readonly: bool = False,
    exclusive: bool = False,
) -> apsw.Connection:
    """Open (creating and migrating when writable) and check a store database.

    ``exclusive``: WAL without the shared-memory file (``-shm``), which a full disk may have no
    room for; no other process can read the store meanwhile."""
    flags = (
        apsw.SQLITE_OPEN_READONLY
        if readonly
        else (apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
    )
    conn: apsw.Connection | None = None
    try:
        conn = (
            apsw.Connection(str(path), flags=flags, vfs=vfs)
            if vfs
            else apsw.Connection(str(path), flags=flags)
        )
        conn.setbusytimeout(5000)
        if exclusive:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
        check = _rows(conn, "PRAGMA quick_check")
        if check != [("ok",)]:
            raise StoreCorrupt(f"{path}: quick_check: {check[:3]}")
        version = _rows(conn, "PRAGMA user_version")[0][0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {version} is newer than this fieldgate ({SCHEMA_VERSION})"
            )
        if version < SCHEMA_VERSION and not readonly:
            _migrate(conn, version)
    except BaseException as err:
        if conn is not None:
            conn.close()  # a failed open must not keep the file locked for the next try
        if isinstance(err, apsw.CorruptError | apsw.NotADBError):
            raise StoreCorrupt(f"{path}: {err}") from err
        if isinstance(err, apsw.CantOpenError):
            raise StoreError(f"{path}: cannot open the store: {err}") from err
        raise
    return conn


# What the audit log's file (gateway/store/auditdb.py) takes of SQLite, so that apsw stays in
# this one module: connections, and the errors it tells apart.
Connection = apsw.Connection
DISK_ERRORS = (apsw.FullError, apsw.IOError)  # a full disk: nothing of the transaction written
DAMAGE_ERRORS = (apsw.CorruptError, apsw.NotADBError)
CantOpenError = apsw.CantOpenError
SQLError = apsw.SQLError


def connect(path: Path, *, readonly: bool = False, vfs: str | None = None) -> apsw.Connection:
    """A connection that waits up to 5 s for another process's lock."""
    flags = (
        apsw.SQLITE_OPEN_READONLY
        if readonly
        else (apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
    )
    conn = (
        apsw.Connection(str(path), flags=flags, vfs=vfs)
        if vfs
        else apsw.Connection(str(path), flags=flags)
    )
    conn.setbusytimeout(5000)
    return conn


def private_file(path: Path) -> None:
    """Create the store file 0600 if it is missing (SQLite gives its -wal and -shm the same
    mode), and tighten an existing one and its companions."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        try:
            companion = Path(str(path) + suffix)
            if companion.stat().st_mode & 0o077:
                os.chmod(companion, 0o600)
        except FileNotFoundError:
            pass


def _migrate(conn: apsw.Connection, version: int) -> None:
    """Apply every schema step after ``version`` in one transaction."""
    with conn:
        for step in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute(_schema(step))
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def move_aside(path: Path) -> Path:
    """Keep a damaged store (and its WAL) under a new name; return the new main file's path."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(str(path) + suffix)
        if source.exists():
            source.rename(Path(str(target) + suffix))
    return target


MARK_PREFIX = "seqmark:"
MARK_EVERY = 1.0  # seconds between renewals of a device's sequence mark


@dataclass(frozen=True, slots=True)
class SeqMarks:
    """Keys for the sequence marks: one derived per sealing key id; ``kid`` signs new marks."""

    kid: str
    keys: dict[str, bytes]

    @classmethod
    def from_sealing(cls, kid: str, sealing_keys: dict[str, bytes]) -> SeqMarks:
        derived = {
            k: hmac.new(v, b"fieldgate store sequence marks", hashlib.sha256).digest()
            for k, v in sealing_keys.items()
        }
        return cls(kid, derived)

    def sign(self, boot: str, device: str, next_seq: int) -> str:
        return f"{next_seq}:{self.kid}:{self._mac(self.keys[self.kid], boot, device, next_seq)}"

    def check(self, boot: str, device: str, value: str) -> int | None:
        """The mark's number if it authenticates (or its key is gone), None if forged."""
        number, kid, mac = _parse_mark(value)
        if number is None:
            return None
        key = self.keys.get(kid)
        if key is None:
            return number  # signed by a key no longer in the keyring: cannot tell
        good = hmac.compare_digest(mac, self._mac(key, boot, device, number))
        return number if good else None

    @staticmethod
    def _mac(key: bytes, boot: str, device: str, next_seq: int) -> str:
        msg = f"{boot}\n{device}\n{next_seq}".encode()
        return hmac.new(key, msg, hashlib.sha256).hexdigest()[:32]


def _parse_mark(value: str) -> tuple[int | None, str, str]:
    number, _, rest = value.partition(":")
    kid, _, mac = rest.partition(":")
    try:
        return int(number), kid, mac
    except ValueError:
        return None, kid, mac


def sequence_problems(conn: apsw.Connection, marks: SeqMarks | None = None) -> dict[str, str]:
    """Per device, why its sequence state went backwards (empty when it did not)."""
    boot_row = _rows(conn, "SELECT value FROM meta WHERE key='boot_id'")
    if not boot_row:
        return {}
    boot = boot_row[0][0]
    next_seq = dict(_rows(conn, "SELECT device, next_seq FROM sequences"))
    problems: dict[str, str] = {}
    for device, end in _rows(
        conn,
        "SELECT device, max(first_seq + count) FROM envelopes WHERE boot=? GROUP BY device",
        (boot,),
    ):
        if end > next_seq.get(device, 0):
            problems[device] = (
                f"next_seq {next_seq.get(device, 0)} is below the end ({end}) of an envelope "
                "still stored"
            )
    stored = {
        k[len(MARK_PREFIX) :]: v
        for k, v in _rows(
            conn,
            "SELECT key, value FROM meta WHERE key >= ? AND key < ?",
            (MARK_PREFIX, "seqmark;"),
        )
    }
    for device, value in stored.items():
        number = marks.check(boot, device, value) if marks else _parse_mark(value)[0]
        if number is None:
            problems.setdefault(device, "its sequence mark does not authenticate (edited)")
        elif number > next_seq.get(device, 0):
            problems.setdefault(
                device, f"next_seq {next_seq.get(device, 0)} is below its mark {number}"
            )
    # A gateway (which has the keys) writes a device's mark in the same transaction as its
    # first sequence row: a row without a mark was deleted, or the store predates marks.
    # Either way its numbers cannot be trusted, and a new boot costs nothing. Without the
    # keys (a store opened by a test, or `store verify` without the passphrase) only a store
    # that has marks at all is held to them.
    if marks is not None or stored:
        for device in next_seq.keys() - stored.keys():
            problems.setdefault(device, "its sequence mark is missing (deleted)")
    return problems


class Store:
    """A durable :class:`gateway.store.queue.EnvelopeQueue`. An async context manager."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        policy: Policy = "drop-oldest",
        on_event: EventSink | None = None,
        synchronous: str = "FULL",
        vfs: str | None = None,
        cache_bytes: int = 32 * 1024 * 1024,
        marks: SeqMarks | None = None,
        reserve_bytes: int = RESERVE_BYTES,
    ) -> None:
        self.path = Path(path)
        self._marks = marks
        self._marked: dict[str, float] = {}  # device -> when its mark was last written
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self._reserve_bytes = reserve_bytes
        self.disk_full = False
        self._next_probe = 0.0
        # Per device, (envelopes, readings) refused during the current full-disk spell.
        self.refused_full: dict[str, tuple[int, int]] = {}
        self.max_bytes = max_bytes
        self.policy = policy
        self._on_event = on_event or (lambda *a, **k: None)
        self._synchronous = synchronous
        self._vfs = vfs
        self._cache_bytes = cache_bytes
        self._cached = 0
        # Pending and leased envelopes, bytes, drop victims; a body is held (cached) while
        # ``cache_bytes`` allows, else None and read from the file at lease time.
        self._ledger = Ledger()
        self._high = False
        self._deletes: list[int] = []
        self._delete_due = asyncio.Event()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-io")
        self._conn: apsw.Connection | None = None
        self._janitor: asyncio.Task[None] | None = None
        self.boot_id = ""
        self.next_seq: dict[str, int] = {}
        self.drops: dict[str, tuple[int, int]] = {}
        self.commits = 0

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Store:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._open)
        self._janitor = asyncio.create_task(self._delete_acked(), name="store-janitor")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            try:
                await self._janitor
            except asyncio.CancelledError:
                pass
        loop = asyncio.get_running_loop()
        # Shielded: acked rows are deleted and the file closed even when we are cancelled.
        await asyncio.shield(loop.run_in_executor(self._io, self._shutdown))
        self._io.shutdown(wait=True)

    def _open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_file(self.path)
        self._ensure_reserve()
        try:
            self._open_checked()
        except (apsw.FullError, apsw.IOError) as err:
            # A full disk: give up the reserve and try once more with the room it leaves.
            self._release_reserve()
            self.disk_full = True
            log.error("store %s: disk full at start (%s); reserve given up", self.path, err)
            try:
                self._open_checked()
            except (apsw.FullError, apsw.IOError):
                try:
                    # No room for the -shm file: keep the WAL index in memory instead.
                    self._open_checked(exclusive=True)
                    log.warning(
                        "store %s: opened without shared memory (disk full): `fieldgate store "
                        "status` cannot read it while this gateway runs",
                        self.path,
                    )
                except (apsw.FullError, apsw.IOError) as again:
                    raise StoreError(
                        f"{self.path}: the disk is full: the store cannot be opened ({again}); "
                        "free some space"
                    ) from again
        if self.disk_full:
            self._on_event(
                "store-disk-full",
                None,
                "disk full at start: refusing new readings, delivering what is stored",
                path=str(self.path),
            )

    def _ensure_reserve(self) -> bool:
        """Write the reserve file if it is missing; False when the disk has not the room."""
        if self._reserve_bytes <= 0:
            return True
        try:
            if self.reserve_path.stat().st_size >= self._reserve_bytes:
                return True
        except FileNotFoundError:
            pass
        tmp = self.reserve_path.with_name(self.reserve_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                chunk = bytes(64 * 1024)
                left = self._reserve_bytes
                while left > 0:
                    left -= os.write(fd, chunk[: min(left, len(chunk))])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve_path)
            return True
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("store reserve %s: %s", self.reserve_path, err)
            return False

    def _release_reserve(self) -> None:
        try:
            self.reserve_path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("store reserve %s: %s", self.reserve_path, err)

    def _open_checked(self, *, exclusive: bool = False) -> None:
        if self._conn is not None:  # a try that failed after the open
            self._conn.close()
            self._conn = None
        try:
            conn = open_database(
                self.path, synchronous=self._synchronous, vfs=self._vfs, exclusive=exclusive
            )
        except StoreCorrupt as err:
            kept = move_aside(self.path)
            log.error(
                "store %s is damaged (%s); kept as %s, starting a new store", self.path, err, kept
            )
            self._on_event("store-corrupt", None, str(err), kept=str(kept))
            conn = open_database(self.path, synchronous=self._synchronous, vfs=self._vfs)
        self._conn = conn
        with conn:
            row = _rows(conn, "SELECT value FROM meta WHERE key='boot_id'")
            if row:
                self.boot_id = row[0][0]
            else:
                self.boot_id = secrets.token_hex(8)
                conn.execute("INSERT INTO meta(key, value) VALUES('boot_id', ?)", (self.boot_id,))
            rewound = sequence_problems(conn, self._marks)
            if rewound:
                self._new_boot(conn, rewound)
        if self._marks is not None:
            try:
                with conn:
                    self._write_marks(conn)
            except apsw.FullError:
                pass  # marks of a store from before them: written at its next commit
        self.next_seq = dict(_rows(conn, "SELECT device, next_seq FROM sequences"))
        self.drops = {
            d: (e, r) for d, e, r in _rows(conn, "SELECT device, envelopes, readings FROM drops")
        }
        rows = _rows(
            conn,
            "SELECT id, device, version, key_id, boot, first_seq, count, codec, oldest_ts_ms, "
            "length(body) FROM envelopes ORDER BY id",
        )
        for id_, device, version, key_id, boot, first, count, codec, oldest, size in rows:
            header = Header(version, key_id, boot, first, count, codec)
            self._ledger.add(Entry(id_, device, header, size, oldest, None))
        if rows:
            log.info(
                "store %s: %d envelopes (%d bytes) waiting from before",
                self.path,
                len(rows),
                self._ledger.bytes,
            )

    def _new_boot(self, conn: apsw.Connection, rewound: dict[str, str]) -> None:
        """Sequence state went back: never reuse a number, start a new boot id instead."""
        old, self.boot_id = self.boot_id, secrets.token_hex(8)
        conn.execute("UPDATE meta SET value=? WHERE key='boot_id'", (self.boot_id,))
        conn.execute("DELETE FROM sequences")
        conn.execute("DELETE FROM meta WHERE key >= ? AND key < ?", (MARK_PREFIX, "seqmark;"))
        for device, why in sorted(rewound.items()):
            log.error(
                "store %s: the sequence state of %s went backwards (%s); boot %s ends, new boot %s",
                self.path,
                device,
                why,
                old,
                self.boot_id,
            )
            self._on_event("sequence-rewound", device, why, old_boot=old, new_boot=self.boot_id)

    def _write_marks(self, conn: apsw.Connection) -> None:
        assert self._marks is not None
        for device, next_seq in _rows(conn, "SELECT device, next_seq FROM sequences"):
            self._put_mark(conn, device, next_seq)

    def _put_mark(self, conn: apsw.Connection, device: str, next_seq: int) -> None:
        if self._marks is None:
            return
        self._marked[device] = time.monotonic()
        conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) "
            "DO UPDATE SET value=excluded.value",
            (MARK_PREFIX + device, self._marks.sign(self.boot_id, device, next_seq)),
        )

    def _shutdown(self) -> None:
        if self._conn is None:
            return
        try:
            self._delete_now(self._deletes)
        except apsw.FullError:
            log.warning(
                "disk full: %d delivered envelopes stay in the store (sent again at the next "
                "start)",
                len(self._deletes),
            )
        self._deletes = []
        if self._marks is not None:
            try:
                with self._conn:
                    self._write_marks(self._conn)  # exact marks at a clean stop
            except apsw.FullError:
                pass  # the marks kept lag behind, which is still sound
        try:
            self._conn.close()
        except apsw.Error as err:  # a checkpoint that found no room: the WAL stays, intact
            log.warning("store %s: closing: %s", self.path, err)
        self._conn = None

    # -- put --------------------------------------------------------------------------------

    async def put(self, envelopes: Sequence[Envelope]) -> None:
        if self._ledger.closed:
            raise StoreError("store is closed for new envelopes")
        if not envelopes:
            return
        loop = asyncio.get_running_loop()
        if self.disk_full:
            if loop.time() < self._next_probe:
                self._refuse_full(envelopes)
                return
            self._next_probe = loop.time() + PROBE_INTERVAL
            if not await loop.run_in_executor(self._io, self._ensure_reserve):
                self._refuse_full(envelopes)
                return
        plan = self._ledger.plan(envelopes, self.max_bytes, self.policy)
        envelopes, refused, victims = plan.keep, plan.refused, plan.victims
        seq_updates: dict[str, int] = {}
        for envelope in [*envelopes, *refused]:
            header = envelope.header
            end = header.first_seq + header.count
            if end > seq_updates.get(envelope.device_id, self.next_seq.get(envelope.device_id, 0)):
                seq_updates[envelope.device_id] = end
        dropped = plan.dropped("store")
        drops = _drop_counts(dropped)
        # Out of the queue before the commit's await, so that no session leases a victim.
        for victim in victims:
            self._forget(victim)
        try:
            ids = await asyncio.shield(
                loop.run_in_executor(
                    self._io,
                    self._commit,
                    list(envelopes),
                    seq_updates,
                    [v.id for v in victims],
                    drops,
                )
            )
        except apsw.FullError:
            # Nothing of this transaction was written: the victims stay, new ones are refused.
            for victim in victims:
                self._restore(victim)
            await self._disk_became_full(loop)
            self._refuse_full([*envelopes, *refused])
            return
        if self.disk_full:
            self._disk_writable()
        self.commits += 1
        self.next_seq.update(seq_updates)
        for envelope, id_ in zip(envelopes, ids, strict=True):
            size = len(envelope.body)
            body = envelope.body if self._cached + size <= self._cache_bytes else None
            if body is not None:
                self._cached += size
            self._ledger.add(
                Entry(id_, envelope.device_id, envelope.header, size, envelope.oldest_ts_ms, body)
            )
        for device_id, reason, device_ranges in dropped:
            self._count_drop(device_id, reason, device_ranges)
        self._watermark()

    def _restore(self, entry: Entry) -> None:
        """Put back an entry taken out for a drop that did not commit."""
        self._ledger.restore(entry)
        if entry.body is not None:
            self._cached += entry.size

    async def _disk_became_full(self, loop: asyncio.AbstractEventLoop) -> None:
        self._next_probe = loop.time() + PROBE_INTERVAL
        # Also after a probe that rewrote the reserve but could not commit: the room is for
        # deletes and checkpoints, not for new readings.
        await loop.run_in_executor(self._io, self._release_reserve)
        if self.disk_full:
            return
        self.disk_full = True
        log.error(
            "store %s: the disk is full: new readings are refused until space returns; "
            "stored envelopes keep being delivered",
            self.path,
        )
        self._on_event(
            "store-disk-full",
            None,
            "disk full: refusing new readings, delivering what is stored",
            path=str(self.path),
        )

    def _refuse_full(self, envelopes: Sequence[Envelope]) -> None:
        if envelopes and not self.refused_full:
            first = envelopes[0]
            log.warning(
                "store %s: first envelope refused for want of disk space (%s seq %d)",
                self.path,
                first.device_id,
                first.header.first_seq,
            )
        for envelope in envelopes:
            count, readings = self.refused_full.get(envelope.device_id, (0, 0))
            self.refused_full[envelope.device_id] = (count + 1, readings + envelope.header.count)

    def _disk_writable(
        self,
        *,
        kind: str = "store-disk-writable",
        reason: str = "disk writable again: intake resumes",
    ) -> None:
        """The spell of refusals ends: the disk took a write again, or (``kind``
        ``store-intake-refused``) the gateway stops while it is still full."""
        refused, self.refused_full = self.refused_full, {}
        self.disk_full = False
        envelopes = sum(e for e, _ in refused.values())
        readings = sum(r for _, r in refused.values())
        log.warning(
            "store %s: %s (%d envelopes, %d readings were refused while full)",
            self.path,
            reason,
            envelopes,
            readings,
        )
        self._on_event(
            kind,
            None,
            reason,
            path=str(self.path),
            refused_envelopes=envelopes,
            refused_readings=readings,
            refused={d: {"envelopes": e, "readings": r} for d, (e, r) in sorted(refused.items())},
        )

    def _forget(self, entry: Entry) -> None:
        self._ledger.forget(entry)
        if entry.body is not None:
            self._cached -= entry.size

    def _commit(
        self,
        envelopes: list[Envelope],
        seq_updates: dict[str, int],
        drop_ids: list[int],
        drops: dict[str, tuple[int, int]],
    ) -> list[int]:
        assert self._conn is not None
        conn = self._conn
        ids: list[int] = []
        with conn:  # one transaction: envelopes, sequence numbers, drops, deletes
            for e in envelopes:
                h = e.header
                conn.execute(
                    "INSERT INTO envelopes(device, version, key_id, boot, first_seq, count, "
                    "codec, oldest_ts_ms, body) VALUES(?,?,?,?,?,?,?,?,?)",
                    (
                        e.device_id,
                        h.version,
                        h.key_id,
                        h.boot_id,
                        h.first_seq,
                        h.count,
                        h.codec,
                        e.oldest_ts_ms,
                        e.body,
                    ),
                )
                ids.append(conn.last_insert_rowid())
            for device, next_seq in seq_updates.items():
                conn.execute(
                    "INSERT INTO sequences(device, next_seq) VALUES(?, ?) ON CONFLICT(device) "
                    "DO UPDATE SET next_seq=excluded.next_seq",
                    (device, next_seq),
                )
                # A mark may lag behind next_seq (only a mark above it is a rewind), so it is
                # renewed at most every MARK_EVERY seconds and at the stop: an HMAC and a row
                # per device in every commit cost the store half again its commit time.
                # A device's first row always gets its mark in the same transaction.
                last = self._marked.get(device)
                if last is None or time.monotonic() - last >= MARK_EVERY:
                    self._put_mark(conn, device, next_seq)
            if drop_ids:
                conn.executemany("DELETE FROM envelopes WHERE id=?", [(i,) for i in drop_ids])
            for device, (count, readings) in drops.items():
                conn.execute(
                    "INSERT INTO drops(device, envelopes, readings) VALUES(?, ?, ?) "
                    "ON CONFLICT(device) DO UPDATE SET envelopes=envelopes+excluded.envelopes, "
                    "readings=readings+excluded.readings",
                    (device, count, readings),
                )
        return ids

    def _count_drop(self, device: str, reason: str, ranges: list[tuple[int, int]]) -> None:
        envelopes, readings = len(ranges), sum(count for _, count in ranges)
        before = self.drops.get(device, (0, 0))
        self.drops[device] = (before[0] + envelopes, before[1] + readings)
        self._on_event(
            "envelopes-dropped",
            device,
            reason,
            envelopes=envelopes,
            readings=readings,
            seq_ranges=ranges,
            policy=self.policy,
        )

    def _watermark(self) -> None:
        fill = self._ledger.bytes / self.max_bytes
        if fill >= HIGH_WATER and not self._high:
            self._high = True
            log.warning(
                "store %.0f%% full (%d of %d bytes)", fill * 100, self._ledger.bytes, self.max_bytes
            )
            self._on_event(
                "store-high-water",
                None,
                f"store {fill:.0%} full",
                bytes=self._ledger.bytes,
                max_bytes=self.max_bytes,
            )
        elif fill < LOW_WATER and self._high:
            self._high = False
            log.info("store back under %.0f%% full", LOW_WATER * 100)

    # -- lease, ack, release ----------------------------------------------------------------

    async def lease(self, device_id: str, limit: int) -> list[Leased]:
        if not await self._ledger.wait(device_id):
            return []
        taken = self._ledger.lease(device_id, limit)
        missing = [e.id for e in taken if e.body is None]
        bodies: dict[int, bytes] = {}
        if missing:
            loop = asyncio.get_running_loop()
            bodies = await loop.run_in_executor(self._io, self._read_bodies, missing)
        return [
            Leased(
                e.id,
                Envelope(
                    e.device,
                    e.header,
                    e.body if e.body is not None else bodies[e.id],
                    e.oldest_ts_ms,
                ),
            )
            for e in taken
        ]

    def _read_bodies(self, ids: list[int]) -> dict[int, bytes]:
        assert self._conn is not None
        marks = ",".join("?" * len(ids))
        return dict(_rows(self._conn, f"SELECT id, body FROM envelopes WHERE id IN ({marks})", ids))

    def ack(self, device_id: str, lease_id: int) -> None:
        entry = self._ledger.ack(device_id, lease_id)
        if entry is None:
            return
        if entry.body is not None:
            self._cached -= entry.size
        self._deletes.append(entry.id)
        self._delete_due.set()
        if self._high:
            self._watermark()

    def release(self, device_id: str) -> None:
        self._ledger.release(device_id)

    def close(self) -> None:
        if self.disk_full and self.refused_full:
            self._disk_writable(
                kind="store-intake-refused", reason="stopping while the disk is full"
            )
            self.disk_full = True
        self._ledger.close()

    async def _delete_acked(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._delete_due.wait()
            # Let acks gather so that one transaction deletes many rows.
            await asyncio.sleep(DELETE_DELAY)
            self._delete_due.clear()
            batch, self._deletes = self._deletes, []
            if not batch:
                continue
            try:
                await asyncio.shield(loop.run_in_executor(self._io, self._delete_now, batch))
            except apsw.FullError:
                # Not even room to delete: try again later (the rows are acked, never resent
                # while this process runs).
                self._deletes = batch + self._deletes
                await asyncio.sleep(PROBE_INTERVAL)
                self._delete_due.set()

    def _delete_now(self, ids: list[int]) -> None:
        if not ids or self._conn is None:
            return
        with self._conn:
            self._conn.executemany("DELETE FROM envelopes WHERE id=?", [(i,) for i in ids])
        if self.disk_full:
            # Hand the freed pages back to the file system's view: fold the WAL in, truncate it.
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except apsw.Error:
                pass

    # -- status -----------------------------------------------------------------------------

    def depth(self) -> list[DeviceDepth]:
        return self._ledger.depth()

    def holds(self, device_id: str) -> bool:
        return self._ledger.holds(device_id)

    def pending(self, device_id: str) -> int:
        return self._ledger.pending(device_id)


def _drop_counts(
    dropped: list[tuple[str, str, list[tuple[int, int]]]],
) -> dict[str, tuple[int, int]]:
    """Per device, (envelopes, readings) over every dropped or refused range."""
    out: dict[str, tuple[int, int]] = {}
    for device, _, ranges in dropped:
        envelopes, readings = out.get(device, (0, 0))
        out[device] = (envelopes + len(ranges), readings + sum(c for _, c in ranges))
    return out


# -- small read and write helpers for gateway/store/inspect.py (apsw stays in this module) ---


@contextmanager
def store_errors(what: str) -> Iterator[None]:
    """SQLite's errors as :class:`StoreError` ("what: error"), the cause kept."""
    try:
        yield
    except apsw.Error as err:
        raise StoreError(f"{what}: {err}") from err


class Reader:
    """A store file opened read-only (a running gateway may hold it)."""

    def __init__(self, conn: apsw.Connection) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return _rows(self._conn, sql, params)

    def sequence_problems(self, marks: SeqMarks | None = None) -> dict[str, str]:
        return sequence_problems(self._conn, marks)

    def close(self) -> None:
        self._conn.close()

    @classmethod
    def open(cls, path: Path) -> Reader:
        conn = open_database(path, readonly=True)
        made = _rows(conn, "SELECT count(*) FROM sqlite_master WHERE name = 'envelopes'")
        if made[0][0] == 0:
            conn.close()
            # A gateway creates the file, then its schema: read between the two, it is empty.
            raise StoreNotReady(f"{path}: no store schema yet (a gateway may be creating it)")
        return cls(conn)


@contextmanager
def reading(path: Path) -> Iterator[Reader]:
    db = Reader.open(path)
    try:
        yield db
    finally:
        db.close()


def copy_envelopes(source: Path, target: Path, devices: Sequence[str]) -> int:
    """Copy every envelope (oldest first) and drop count of ``devices`` from ``source`` into
    ``target`` in one transaction of the target; how many envelopes."""
    marks = ",".join("?" * len(devices))
    private_file(target)
    dst = open_database(target)
    try:
        dst.execute("ATTACH DATABASE ? AS src", (str(source),))
        with dst:
            dst.execute(
                "INSERT INTO main.envelopes(device, version, key_id, boot, first_seq, count, "
                "codec, oldest_ts_ms, body) SELECT device, version, key_id, boot, first_seq, "
                f"count, codec, oldest_ts_ms, body FROM src.envelopes WHERE device IN ({marks}) "
                "ORDER BY id",
                devices,
            )
            moved = dst.changes()
            dst.execute(
                "INSERT INTO main.drops(device, envelopes, readings) SELECT device, envelopes, "
                f"readings FROM src.drops WHERE device IN ({marks}) AND true "
                "ON CONFLICT(device) DO UPDATE SET envelopes=envelopes+excluded.envelopes, "
                "readings=readings+excluded.readings",
                devices,
            )
        dst.execute("DETACH DATABASE src")
    finally:
        dst.close()
    return int(moved)


def delete_envelopes(source: Path, devices: Sequence[str]) -> None:
    """Delete every envelope and drop count of ``devices`` from ``source``, one transaction."""
    marks = ",".join("?" * len(devices))
    src = open_database(source)
    try:
        with src:
            src.execute(f"DELETE FROM envelopes WHERE device IN ({marks})", devices)
            src.execute(f"DELETE FROM drops WHERE device IN ({marks})", devices)
    finally:
        src.close()
