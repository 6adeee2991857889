"""Security events: admission, quarantine, refused commands, drops, tampering.

Every security event is a record of the gateway's audit log (:mod:`gateway.audit.log`): hash
chained, committed to ``state_dir/audit.db``, covered by heads signed with the gateway's key and
sent as its own stream. Nothing writes security events any other way. Each is also logged (at
INFO for the routine kinds, else WARNING), with its kind and device as fields of the log line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.audit.log import AuditLog, AuditSettings
from gateway.core.audit import HeadSigner
from gateway.store import auditdb

log = logging.getLogger("fieldgate.security")

FILE_NAME = auditdb.FILE_NAME
DEFAULT_CHAIN = "fieldgate"
# Recorded like every other event, but logged at INFO: they are the expected case.
ROUTINE = frozenset({"device-admitted", "command-accepted", "gateway-started", "gateway-stopped"})


def jsonable(value: Any, depth: int = 0) -> Any:
    """What an event's details may hold (the chain's canonical JSON): paths and other objects
    as text, tuples and sets as lists, non-finite floats and huge ints as text, bytes as hex."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -(2**63) < value < 2**63 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= 12:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [jsonable(v, depth + 1) for v in items]
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class SecurityEvents:
    """The gateway's security events, as audit records."""

    def __init__(
        self,
        state_dir: Path,
        *,
        chain_id: str = DEFAULT_CHAIN,
        signer: HeadSigner | None = None,
        settings: AuditSettings | None = None,
    ) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = state_dir / FILE_NAME
        self.audit = AuditLog(self.path, chain_id, signer, settings or AuditSettings())

    @property
    def counts(self) -> dict[str, int]:
        """Committed records per kind, in this run."""
        return self.audit.counts

    @property
    def unwritten(self) -> int:
        """Records waiting for the disk to take writes again."""
        return self.audit.unwritten

    def record(self, kind: str, device_id: str | None, reason: str, **fields: Any) -> None:
        details = jsonable({"reason": reason, **fields})
        self.audit.append(kind, device_id, details)
        level = logging.INFO if kind in ROUTINE else logging.WARNING
        log.log(
            level,
            "security event %s device=%s: %s",
            kind,
            device_id,
            reason,
            extra={"kind": kind, "device": device_id},
        )

    def close(self) -> None:
        self.audit.close()


def event_of(line: str) -> dict[str, Any] | None:
    """A record line as an event dict (``ts, kind, device, reason`` and the other details);
    None for a head."""
    from gateway.core import codec

    doc = codec.loads(line)
    record = doc.get("record")
    if record is None:
        return None
    return {
        "ts": record["ts"],
        "kind": record["kind"],
        "device": record["device"],
        "seq": record["seq"],
        **record["details"],
    }


def read_events(state_dir: Path, after: int = -1) -> list[dict[str, Any]]:
    """The committed security events of a state folder, oldest first (read-only: a running
    gateway may be writing)."""
    path = state_dir / FILE_NAME
    if not path.exists():
        return []
    items, _ = auditdb.read_items(path, after)
    out = []
    for _, line in items:
        event = event_of(line)
        if event is not None:
            out.append(event)
    return out
