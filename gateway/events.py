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

from gateway.core import codec

log = logging.getLogger("fieldgate.security")

FILE_NAME = "security-events.jsonl"
# Recorded like every other event, but logged at INFO: they are the expected case.
ROUTINE = frozenset({"device-admitted", "command-accepted"})


class SecurityEvents:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = state_dir / FILE_NAME
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_mode & 0o077:  # written by an older fieldgate
            os.fchmod(self._fd, 0o600)
        self.counts: dict[str, int] = {}
        # Events that could not be written (a full disk): counted, logged once per spell.
        self.unwritten = 0
        self._failing = False

    def record(self, kind: str, device_id: str | None, reason: str, **fields: Any) -> None:
        event = {"ts": time.time(), "kind": kind, "device": device_id, "reason": reason, **fields}
        self._write(codec.dumps(event) + b"\n")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        level = logging.INFO if kind in ROUTINE else logging.WARNING
        # kind and device as fields of their own for `--log-format json` (gateway/ops/logs.py).
        extra = {"kind": kind, "device": device_id}
        log.log(level, "security event %s device=%s: %s", kind, device_id, reason, extra=extra)

    def _write(self, line: bytes) -> None:
        # One unbuffered append per event: a failed write leaves nothing queued behind it.
        # After a failure a newline first ends any line the failure cut short.
        data = (b"\n" + line) if self._failing else line
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(28, "short write")
        except OSError as err:
            self.unwritten += 1
            if not self._failing:
                self._failing = True
                log.error("cannot write security events to %s (%s): counting them", self.path, err)
            return
        if self._failing:
            self._failing = False
            log.warning(
                "security events are written to %s again (%d could not be)",
                self.path,
                self.unwritten,
            )

    def close(self) -> None:
        os.close(self._fd)


def read_events(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / FILE_NAME
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            try:
                out.append(codec.loads(line))
            except codec.JSONDecodeError:
                continue  # cut short by a full disk
    return out
