"""One gateway per state folder (and per store file): an exclusive ``flock`` held for life.

Two gateways on one state folder would share one boot id and one sequence space; their
sessions would fight and the consumer would take real readings for duplicates. So a gateway
takes ``fieldgate.lock`` in its state folder (and ``<store>.lock`` beside a store kept
elsewhere) before it opens anything there, and a second one is refused with the holder's pid.
The kernel releases a ``flock`` when its holder dies, however it dies: no stale lock to clean.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from gateway.core.errors import FieldgateError

LOCK_NAME = "fieldgate.lock"


class StateInUse(FieldgateError):
    """Another live process holds the lock."""


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0700; tighten it if it already exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)


class StateLock:
    """An exclusive, non-blocking ``flock`` on ``lock_file``, naming its holder."""

    def __init__(self, lock_file: Path, what: str) -> None:
        self.path = lock_file
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        make_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateInUse(f"{self.what} is in use by {holder}") from None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        line = f"pid {os.getpid()} (started {stamp})\n".encode()
        try:
            os.pwrite(fd, line, 0)
            os.ftruncate(fd, len(line))
        except OSError:
            pass  # a full disk: the lock holds all the same, only its note is missing
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def lock_state(state_dir: Path, store_path: Path | None = None) -> list[StateLock]:
    """Lock a state folder and, when it lives elsewhere, the store file; all or nothing."""
    wanted = [StateLock(state_dir / LOCK_NAME, f"state dir {state_dir}")]
    if store_path is not None and store_path.parent.resolve() != state_dir.resolve():
        wanted.append(
            StateLock(store_path.with_name(store_path.name + ".lock"), f"store {store_path}")
        )
    held: list[StateLock] = []
    try:
        for lock in wanted:
            held.append(lock.acquire())
    except BaseException:
        release_all(held)
        raise
    return held


def release_all(locks: list[StateLock]) -> None:
    for lock in reversed(locks):
        lock.release()


def holder(lock_file: Path) -> int | None:
    """The pid of the live process holding ``lock_file`` (``fieldgate reload`` signals it), or
    None when nothing holds it. Asked of the kernel, not of the note alone: a note left by a
    process that died names no one."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            note = os.pread(fd, 200, 0).decode(errors="replace").split()
            if len(note) >= 2 and note[0] == "pid" and note[1].isdigit():
                return int(note[1])
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
