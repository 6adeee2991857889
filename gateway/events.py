"""Security events: admission, quarantine, refused commands, drops, tampering.

Each event is one JSON line appended (and flushed) to ``security-events.jsonl`` in the state
folder and logged. The hash-chained, signed audit stream that forwards them to the hub builds on
this record.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("fieldgate.security")

FILE_NAME = "security-events.jsonl"
# Recorded like every other event, but logged at INFO: they are the expected case.
ROUTINE = frozenset({"device-admitted"})


class SecurityEvents:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / FILE_NAME
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        self.counts: dict[str, int] = {}

    def record(self, kind: str, device_id: str | None, reason: str, **fields: Any) -> None:
        event = {"ts": time.time(), "kind": kind, "device": device_id, "reason": reason, **fields}
        self._file.write(orjson.dumps(event) + b"\n")
        self._file.flush()
        self.counts[kind] = self.counts.get(kind, 0) + 1
        level = logging.INFO if kind in ROUTINE else logging.WARNING
        log.log(level, "security event %s device=%s: %s", kind, device_id, reason)

    def close(self) -> None:
        self._file.close()


def read_events(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / FILE_NAME
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
