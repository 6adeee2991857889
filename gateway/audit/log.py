"""The durable audit log: the shell around the pure chain (:mod:`gateway.core.audit`).

Every security event becomes a record of one hash chain (the gateway's id is its chain id) and is
committed to ``state_dir/audit.db`` (:mod:`gateway.store.auditdb`):

- **Group commit.** ``append`` chains the record at once (its seq and hash are fixed) and hands
  it to one I/O thread, which commits what gathered in the meantime, at most every
  ``COMMIT_INTERVAL``: a thousand events a second cost a hundred fsyncs, not a thousand, and the
  event loop never waits for a disk. Only committed records are counted, streamed or read back:
  a kill -9 can take the records of the last few milliseconds, never one the hub or a reader
  has seen. Without a running event loop (a command, a test) each append commits before it
  returns.
- **Signed heads, not signed records.** A head is signed after every ``head_every`` records,
  after ``head_interval`` seconds with records not yet covered, at start over a tail a crash left
  unsigned, and at stop.
- **A quota of its own.** Items the hub has acknowledged are pruned, oldest first, when the log
  reaches ``max_bytes`` (with no stream, the oldest committed ones: the local log is then the only
  copy, and keeps the newest). When even that leaves no room, events are counted instead of
  chained, and the first record that fits afterwards is an ``audit-lost`` record with the count:
  the chain goes on without a gap. A disk that refuses writes keeps records in memory (up to
  ``pending_max``) and commits them when it takes writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.audit import files
from gateway.core import audit
from gateway.core.audit import AuditRecord, Head, HeadSigner
from gateway.store import auditdb
from gateway.store.auditdb import AuditDb, Item

log = logging.getLogger("fieldgate.audit")

COMMIT_INTERVAL = 0.01  # seconds between commits, at least (group commit)
RETRY_INTERVAL = 1.0  # seconds between tries while the disk refuses writes
LOST_RESERVE = 512  # bytes kept for the audit-lost record when the quota is reached
COMMIT_TIMES = 4096  # commits remembered for the stream's lag (the last one absorbs the rest)


@dataclass(frozen=True)
class AuditSettings:
    max_bytes: int = 64 * 1024 * 1024
    head_every: int = 100
    head_interval: float = 10.0
    # Records kept in memory while the disk refuses them; beyond, they are counted as lost.
    pending_max: int = 10_000
    # No stream to a hub: the oldest committed records are pruned when the quota is reached.
    prune_unsent: bool = False


class AuditLog:
    def __init__(
        self,
        path: Path,
        chain_id: str,
        signer: HeadSigner | None,
        settings: AuditSettings = AuditSettings(),
        *,
        clock: Callable[[], float] = time.time,
        synchronous: str = "FULL",
        vfs: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.chain_id = chain_id
        self.settings = settings
        self._signer = signer
        self._clock = clock
        self._db_options: dict[str, Any] = {"synchronous": synchronous, "vfs": vfs}
        # What the first record of this run must say: the log could not go on (damaged, or
        # another chain's) and was kept aside.
        self._restart: tuple[str, str, dict[str, Any]] | None = None
        try:
            self._db = AuditDb(self.path, **self._db_options)
        except auditdb.StoreCorrupt as err:
            kept = auditdb.move_aside(self.path, "corrupt")
            log.error(
                "audit log %s is damaged (%s); kept as %s, a new chain starts", path, err, kept
            )
            self._db = AuditDb(self.path, **self._db_options)
            self._restart = (
                "tamper-audit-reset",
                f"the audit log was damaged ({err}); kept aside, a new chain starts",
                {"kept": str(kept)},
            )
        self._last: AuditRecord | None = None
        self._last_head_seq = -1
        self._load_tail()
        meta = self._db.meta()
        self.meta = dict(meta)  # as it was at open: the last run's baselines
        self._meta_dirty: dict[str, str] = {}
        self._pos = self._db.last_pos()
        self.committed_pos = self._pos
        self.acked_pos = int(meta.get("acked", "-1"))
        if signer is None or settings.prune_unsent:
            self.acked_pos = self.committed_pos
        self._bytes = self._db.bytes_through()
        self._acked_bytes = self._db.bytes_through(self.acked_pos) if self.acked_pos >= 0 else 0
        self._prune_bytes = 0
        self._pending: list[Item] = []
        self._pending_kinds: list[str] = []
        self.lost = 0  # events not chained yet (quota or memory full): the next audit-lost
        self.lost_total = 0
        self.unwritten = 0  # records waiting because the disk refused them
        self.counts: dict[str, int] = {}
        self.since_head = 0
        self._last_head_at = time.monotonic()
        self._failing = False
        self._io: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due: asyncio.Event | None = None
        self.committed = asyncio.Event()  # set at every commit (the stream waits on it)
        self._closed = False
        # (last pos, wall time) per commit the hub has not acknowledged: the stream's lag.
        self._commit_times: deque[tuple[int, float]] = deque()
        if self.committed_pos > self.acked_pos:
            self._commit_times.append((self.committed_pos, self._first_unacked_ts()))
        if self._last is not None and self._last.seq > self._last_head_seq:
            self.sign_head()  # a crash left the tail unsigned
            self._commit_now()
        if self._restart is not None:
            kind, reason, details = self._restart
            self.append(kind, None, {"reason": reason, **details})

    # -- opening ----------------------------------------------------------------------------

    def _load_tail(self) -> None:
        line = self._db.last_line(head=False)
        if line is not None:
            item = files.parse_line(line, where=str(self.path))
            assert isinstance(item, AuditRecord)
            if item.chain_id != self.chain_id:
                # Another chain's log (a changed gateway id, a copied state folder): kept aside
                # whole, so that none of its items is sent under this chain; a new chain
                # starts, and its first record says so.
                self._db.close()
                kept = auditdb.move_aside(self.path, f"chain-{item.chain_id}")
                log.warning(
                    "audit log %s holds chain %r, not %r: kept as %s, a new chain starts",
                    self.path,
                    item.chain_id,
                    self.chain_id,
                    kept,
                )
                self._db = AuditDb(self.path, **self._db_options)
                self._restart = (
                    "audit-chain-started",
                    f"the log held chain {item.chain_id!r}; kept aside, this chain starts",
                    {"previous_chain": item.chain_id, "kept": str(kept)},
                )
                return
            self._last = item
        head = self._db.last_line(head=True)
        if head is not None:
            parsed = files.parse_line(head, where=str(self.path))
            if isinstance(parsed, Head) and parsed.chain_id == self.chain_id:
                self._last_head_seq = parsed.seq

    def _first_unacked_ts(self) -> float:
        """When the oldest item the hub has not acknowledged was recorded (a head: when
        signed); now if it cannot be read."""
        for _, line in self._db.read(self.acked_pos, 1):
            try:
                return files.parse_line(line, str(self.path)).ts
            except files.AuditFileError:
                break
        return self._clock()

    # -- the loop side ----------------------------------------------------------------------

    async def run(self) -> None:
        """Commit what gathers, sign heads on time; until cancelled (then commit the rest)."""
        loop = self._loop = asyncio.get_running_loop()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-io")
        self._due = asyncio.Event()
        inflight: asyncio.Future[None] | None = None
        last = -COMMIT_INTERVAL
        try:
            while True:
                timeout = self.settings.head_interval
                if self._failing:
                    timeout = min(timeout, RETRY_INTERVAL)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._due.wait()
                self._due.clear()
                self._head_if_due()
                if not self._pending and not self._meta_dirty and not self._prune_bytes:
                    continue
                pause = last + COMMIT_INTERVAL - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                inflight = asyncio.ensure_future(self._commit())
                await asyncio.shield(inflight)
                last = loop.time()
        finally:
            # A commit under way when the run is cancelled settles first, outcome included:
            # close() must know whether its records were written before it signs a head.
            if inflight is not None and not inflight.done():
                await asyncio.wait([inflight])
            io, self._io = self._io, None
            self._loop = None
            io.shutdown(wait=True)

    def _head_if_due(self) -> None:
        if self.since_head and time.monotonic() - self._last_head_at >= self.settings.head_interval:
            self.sign_head()

    def _kick(self) -> None:
        if self._due is not None and self._loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._loop:
                self._due.set()
                return
            self._loop.call_soon_threadsafe(self._due.set)
            return
        self._commit_now()

    # -- appending --------------------------------------------------------------------------

    def append(self, kind: str, device: str | None, details: Mapping[str, Any]) -> None:
        """Chain an event; committed within ``COMMIT_INTERVAL`` (at once without a loop)."""
        if self._closed:
            # Only a callback that outlived the run gets here: say so, never crash the stop.
            log.error("audit log %s is closed: %s of %s not recorded", self.path, kind, device)
            return
        ts = self._clock()
        if self.lost:
            self._record_lost(ts)
        record = audit.append(self._last, ts, kind, device, details, self.chain_id)
        line = files.line(record)
        if self.lost or not self._room(len(line)):
            self._count_lost(kind)
        else:
            self._add(record.seq, 0, line, kind)
            self._last = record
            self.since_head += 1
            if self.since_head >= self.settings.head_every:
                self.sign_head()
        self._kick()

    def _count_lost(self, kind: str) -> None:
        if not self.lost:
            log.error(
                "audit log %s is full (quota %d bytes, or %d records waiting for the disk): "
                "counting events instead of recording them (an audit-lost record follows)",
                self.path,
                self.settings.max_bytes,
                len(self._pending),
            )
        self.lost += 1
        self.lost_total += 1

    def _record_lost(self, ts: float, *, final: bool = False) -> None:
        """The audit-lost record, once there is room for it and the reserve after it (else
        the count would go out one event at a time); at close, in the reserve itself."""
        record = audit.lost(self._last, ts, self.lost, self.chain_id)
        line = files.line(record)
        if not self._room(len(line), reserve=0 if final else LOST_RESERVE):
            return
        log.warning("audit log %s: %d events were lost; recording goes on", self.path, self.lost)
        self._add(record.seq, 0, line, audit.LOST_KIND)
        self._last = record
        self.since_head += 1
        self.lost = 0

    def _room(self, size: int, reserve: int = LOST_RESERVE) -> bool:
        """Whether ``size`` more bytes fit the quota (pruning what may be pruned) and the
        memory bound; keeps ``reserve`` bytes for the audit-lost record."""
        if len(self._pending) >= self.settings.pending_max:
            return False
        over = self._bytes + size + reserve - self.settings.max_bytes
        if over <= 0:
            return True
        free = self._acked_bytes - self._prune_bytes
        if free < over:
            return False
        # Prune a quarter of the quota at once, not one record at a time.
        want = min(free, over + self.settings.max_bytes // 4)
        self._prune_bytes += want
        self._bytes -= want
        return True

    def _add(self, seq: int, head: int, line: str, kind: str) -> None:
        self._pos += 1
        self._pending.append((self._pos, seq, head, line))
        self._pending_kinds.append(kind)
        self._bytes += len(line)

    def sign_head(self) -> Head | None:
        """Sign a head over the last record (none without a key or a new record)."""
        last = self._last
        if self._signer is None or last is None or last.seq <= self._last_head_seq:
            self.since_head = 0
            return None
        head = audit.sign_head(last, self._signer, self._clock())
        self._add(head.seq, 1, files.line(head), "")
        self._last_head_seq = head.seq
        self.since_head = 0
        self._last_head_at = time.monotonic()
        return head

    def set_meta(self, key: str, value: str) -> None:
        """A baseline for the next run (tamper checks); committed with the next records."""
        self.meta[key] = value
        self._meta_dirty[key] = value
        self._kick()

    # -- committing -------------------------------------------------------------------------

    def _take(self) -> tuple[list[Item], list[str], dict[str, str], int]:
        batch, kinds, meta = self._pending, self._pending_kinds, self._meta_dirty
        self._pending, self._pending_kinds, self._meta_dirty = [], [], {}
        prune = self._prune_bytes
        return batch, kinds, meta, prune

    def _write(self, batch: list[Item], meta: dict[str, str], prune: int) -> tuple[int, str | None]:
        """On the I/O thread (or the caller's): returns the bytes pruned and the last pruned
        record's line."""
        freed, through, anchor = 0, None, None
        if prune:
            freed, through, anchor = self._db.prune_plan(self.acked_pos, prune)
            if anchor is not None:
                meta = {**meta, "anchor": anchor}
        self._db.commit(batch, meta, through)
        return freed, anchor

    async def _commit(self) -> None:
        assert self._loop is not None and self._io is not None
        batch, kinds, meta, prune = self._take()
        try:
            freed, _ = await self._loop.run_in_executor(self._io, self._write, batch, meta, prune)
        except auditdb.DISK_ERRORS as err:
            self._refused(batch, kinds, meta, err)
            return
        self._committed(batch, kinds, prune, freed)

    def _commit_now(self) -> None:
        if self._loop is not None:
            return
        batch, kinds, meta, prune = self._take()
        if not batch and not meta and not prune:
            return
        try:
            freed, _ = self._write(batch, meta, prune)
        except auditdb.DISK_ERRORS as err:
            self._refused(batch, kinds, meta, err)
            return
        self._committed(batch, kinds, prune, freed)

    def _refused(
        self, batch: list[Item], kinds: list[str], meta: dict[str, str], err: Exception
    ) -> None:
        # Nothing of the transaction was written: back to the front, in order.
        self._pending[:0] = batch
        self._pending_kinds[:0] = kinds
        self._meta_dirty = {**meta, **self._meta_dirty}
        self.unwritten = sum(1 for _, _, head, _ in self._pending if not head)
        if not self._failing:
            self._failing = True
            log.error(
                "cannot write the audit log %s (%s): keeping records in memory", self.path, err
            )

    def _committed(self, batch: list[Item], kinds: list[str], prune: int, freed: int) -> None:
        if self._failing:
            self._failing = False
            log.warning(
                "audit log %s is written again (%d records had waited)", self.path, self.unwritten
            )
        self.unwritten = 0
        if prune:
            self._prune_bytes -= prune
            self._acked_bytes -= freed
            self._bytes += prune - freed
        if batch:
            self.committed_pos = batch[-1][0]
            for kind in kinds:
                if kind:
                    self.counts[kind] = self.counts.get(kind, 0) + 1
            if self._signer is None or self.settings.prune_unsent:
                self.acked(self.committed_pos, sum(len(item[3]) for item in batch))
            elif len(self._commit_times) < COMMIT_TIMES:
                self._commit_times.append((self.committed_pos, self._clock()))
            else:  # a long outage: the last entry's time stands for every commit after it
                self._commit_times[-1] = (self.committed_pos, self._commit_times[-1][1])
        self.committed.set()

    # -- the stream's side ------------------------------------------------------------------

    def acked(self, pos: int, size: int) -> None:
        """The hub took every item up to ``pos`` (``size`` bytes since the last ack)."""
        times = self._commit_times
        while times and times[0][0] <= pos:
            times.popleft()
        if pos > self.acked_pos:
            self.acked_pos = pos
            self._acked_bytes += size
            if self._signer is not None and not self.settings.prune_unsent:
                # Committed with the next records (or within head_interval): a crash before
                # that sends these items again, which the verifier skips as duplicates.
                self._meta_dirty["acked"] = str(pos)

    def read_sync(self, after: int, limit: int) -> list[tuple[int, str]]:
        return self._db.read(after, limit)

    async def read(self, after: int, limit: int) -> list[tuple[int, str]]:
        if self._loop is None or self._io is None:
            return self._db.read(after, limit)
        return await self._loop.run_in_executor(self._io, self._db.read, after, limit)

    @property
    def last(self) -> AuditRecord | None:
        return self._last

    def lag(self) -> tuple[int, float | None]:
        """The stream's lag: items committed and not acknowledged by the hub, and the age in
        seconds of the oldest of them (None when there is none, or no stream)."""
        pending = max(0, self.committed_pos - self.acked_pos)
        if not pending or not self._commit_times:
            return pending, None
        return pending, max(0.0, self._clock() - self._commit_times[0][1])

    @property
    def signed(self) -> bool:
        """Whether heads are signed (the gateway has its identity)."""
        return self._signer is not None

    @property
    def appended_pos(self) -> int:
        """The last item appended (committed or not)."""
        return self._pos

    def status(self) -> dict[str, Any]:
        return {
            "chain": self.chain_id,
            "path": str(self.path),
            "last_seq": self._last.seq if self._last is not None else None,
            "signed_seq": self._last_head_seq if self._last_head_seq >= 0 else None,
            "committed_pos": self.committed_pos,
            "acked_pos": self.acked_pos,
            "unsent": self.committed_pos - self.acked_pos,
            "bytes": self._bytes,
            "max_bytes": self.settings.max_bytes,
            "lost": self.lost_total,
            "waiting_for_disk": self.unwritten,
        }

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Sign a head over the tail and commit everything (call after :meth:`run` ended)."""
        if self._closed:
            return
        if self.lost:
            self._record_lost(self._clock(), final=True)
        self.sign_head()
        self._loop = None
        self._due = None
        self._failing = False
        self._commit_now()
        if self._pending:
            log.error(
                "audit log %s: %d records could not be written before the stop",
                self.path,
                self.unwritten,
            )
        self._closed = True
        self._db.close()
