"""Store files read offline and moved between: ``fieldgate store status / verify``, what a
store holds, what it accepted, and the envelopes a run of another layout left stranded.

No SQLite here: the reads and writes are :mod:`gateway.store.sqlite`'s helpers (the only apsw
import).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.store.sqlite import (
    Reader,
    SeqMarks,
    StoreError,
    copy_envelopes,
    delete_envelopes,
    reading,
    store_errors,
)

# -- stranded stores: moving envelopes between store files -----------------------------------


def waiting(path: Path) -> dict[str, int]:
    """Per device, how many envelopes a store file holds (the gateway must not run on it)."""
    if not path.exists():
        return {}
    with store_errors(str(path)), reading(path) as db:
        if not db.rows("SELECT 1 FROM sqlite_master WHERE name='envelopes'"):
            return {}  # created a moment ago: no schema yet
        return {
            d: int(n) for d, n in db.rows("SELECT device, count(*) FROM envelopes GROUP BY device")
        }


def move_envelopes(source: Path, target: Path, devices: Sequence[str]) -> int:
    """Move every envelope of ``devices`` from one store file into another, oldest first.

    Header and body stay as they are, so the consumer sees each envelope's original boot and
    sequence numbers; drop counts move along. First one transaction in the target, then one in
    the source: a crash between the two leaves the envelopes in both, and they are sent twice
    (byte-identical: duplicates to the consumer), never lost.
    """
    if not devices:
        return 0
    with store_errors(f"moving envelopes from {source} to {target}"):
        moved = copy_envelopes(source, target, devices)
        delete_envelopes(source, devices)
    return moved


# -- offline inspection (fieldgate store status / verify) -------------------------------------


def status(path: Path) -> dict[str, Any]:
    """Depth per device, bytes, oldest age and drops, read from the file (the gateway may run)."""
    if not path.exists():
        raise StoreError(f"{path}: no store here")
    with reading(path) as db:
        now_ms = time.time() * 1000
        devices: dict[str, dict[str, Any]] = {}
        for device, count, size, oldest, readings in db.rows(
            "SELECT device, count(*), sum(length(body)), min(oldest_ts_ms), sum(count) "
            "FROM envelopes GROUP BY device ORDER BY device"
        ):
            devices[device] = {
                "envelopes": count,
                "bytes": size,
                "readings": readings,
                "oldest_age_s": round((now_ms - oldest) / 1000, 1),
            }
        for device, next_seq in db.rows("SELECT device, next_seq FROM sequences"):
            devices.setdefault(
                device, {"envelopes": 0, "bytes": 0, "readings": 0, "oldest_age_s": None}
            )["next_seq"] = next_seq
        for device, envelopes, readings in db.rows("SELECT device, envelopes, readings FROM drops"):
            devices.setdefault(device, {})["dropped"] = {
                "envelopes": envelopes,
                "readings": readings,
            }
        boot = db.rows("SELECT value FROM meta WHERE key='boot_id'")
        return {
            "path": str(path),
            "boot_id": boot[0][0] if boot else None,
            "bytes": sum(d.get("bytes") or 0 for d in devices.values()),
            "envelopes": sum(d.get("envelopes") or 0 for d in devices.values()),
            "devices": devices,
        }


def accepted(path: Path) -> dict[str, int]:
    """Per device, how many readings the store has accepted (its next sequence number)."""
    if not path.exists():
        return {}
    with reading(path) as db:
        return {d: int(n) for d, n in db.rows("SELECT device, next_seq FROM sequences")}


def verify(path: Path, marks: SeqMarks | None = None) -> list[str]:
    """``PRAGMA integrity_check``, a sanity check of every envelope header and of the sequence
    state (its marks authenticated when ``marks`` is given); [] if sound."""
    from gateway.core.envelope import NONCE_BYTES, TAG_BYTES
    from gateway.core.readings import CODEC, ENVELOPE_VERSION

    try:
        db = Reader.open(path)
    except StoreError as err:
        return [str(err)]
    problems: list[str] = []
    try:
        check = db.rows("PRAGMA integrity_check")
        if check != [("ok",)]:
            problems += [f"integrity_check: {row[0]}" for row in check[:20]]
        ends: dict[tuple[str, str], int] = {}
        for id_, device, version, codec, boot, first, count, size in db.rows(
            "SELECT id, device, version, codec, boot, first_seq, count, length(body) "
            "FROM envelopes ORDER BY id"
        ):
            where = f"envelope {id_} ({device} seq {first})"
            if version != ENVELOPE_VERSION or codec != CODEC:
                problems.append(f"{where}: version {version} codec {codec!r} unknown")
            if count <= 0 or first < 0:
                problems.append(f"{where}: bad count {count} or first seq {first}")
            if size < NONCE_BYTES + TAG_BYTES:
                problems.append(f"{where}: body of {size} bytes is too short")
            previous = ends.get((device, boot))
            if previous is not None and first < previous:
                problems.append(f"{where}: overlaps or precedes the envelope before it")
            ends[(device, boot)] = first + count
        for device, why in sorted(db.sequence_problems(marks).items()):
            problems.append(f"{device}: sequence state went backwards: {why}")
    finally:
        db.close()
    return problems
