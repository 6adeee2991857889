"""The audit file: JSON lines, one ``{"record": {...}}`` or ``{"head": {...}}`` per line, in the
order the gateway wrote (or the hub delivered) them. ``docs/audit.md`` defines it.

:func:`read` also takes the gateway's own ``audit.db`` (the same lines, in the order written)
and a hub record (``fieldgate localhub --record``: the audit stream's messages are picked out
of it by their ``fg-stream`` property), so the one verifier checks all three.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core import codec
from gateway.core.audit import AuditError, AuditRecord, Head, canonical_json
from gateway.core.errors import EXIT_REFUSED, FieldgateError

# The audit stream's message properties (``gateway.audit.stream``).
P_STREAM = "fg-stream"
STREAM_AUDIT = "audit"


class AuditFileError(FieldgateError):
    """The file is not an audit file (unreadable, not JSON, a malformed record): exit 2,
    naming the file, the line and the field."""

    exit_code = EXIT_REFUSED


@dataclass
class AuditFile:
    records: list[AuditRecord] = field(default_factory=list)
    heads: list[Head] = field(default_factory=list)
    record_lines: list[int] = field(default_factory=list)
    head_lines: list[int] = field(default_factory=list)
    # The last record pruned from a local log (its quota): verification resumes after it.
    anchor: AuditRecord | None = None

    def line_of(self, index: int | None, *, head: bool) -> int | None:
        lines = self.head_lines if head else self.record_lines
        return lines[index] if index is not None and 0 <= index < len(lines) else None

    def add(self, item: AuditRecord | Head, number: int) -> None:
        if isinstance(item, AuditRecord):
            self.records.append(item)
            self.record_lines.append(number)
        else:
            self.heads.append(item)
            self.head_lines.append(number)


def parse(doc: Any, where: str) -> AuditRecord | Head:
    if not isinstance(doc, dict) or len(doc) != 1 or not {"record", "head"} & doc.keys():
        raise AuditFileError(f'{where}: expected {{"record": {{...}}}} or {{"head": {{...}}}}')
    try:
        if "record" in doc:
            return AuditRecord.from_json(doc["record"])
        return Head.from_json(doc["head"])
    except AuditError as err:
        raise AuditFileError(f"{where}: {err}") from err


def parse_line(line: str | bytes, where: str) -> AuditRecord | Head:
    try:
        doc = codec.loads(line)
    except codec.JSONDecodeError as err:
        raise AuditFileError(f"{where}: not JSON ({err})") from err
    return parse(doc, where)


def parse_lines(data: bytes, where: str, out: AuditFile, start: int = 1) -> int:
    """Add every item of ``data`` (JSON lines) to ``out``; returns the next line number."""
    number = start
    for number, line in enumerate(data.splitlines(), start=start):
        if line.strip():
            out.add(parse_line(line, f"{where} line {number}"), number)
    return number + 1


def read(path: Path) -> AuditFile:
    from gateway.store import auditdb

    if auditdb.is_audit_db(path):
        return _read_db(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AuditFileError(f"{path}: cannot read ({err.strerror or err})") from err
    first = data.lstrip().split(b"\n", 1)[0]
    if not first.startswith((b'{"record"', b'{"head"')) and b'"topic"' in first:
        return _read_hub_record(path, data)
    out = AuditFile()
    parse_lines(data, str(path), out)
    return out


def _read_db(path: Path) -> AuditFile:
    from gateway.store import auditdb

    try:
        items, meta = auditdb.read_items(path)
    except auditdb.StoreError as err:
        raise AuditFileError(str(err)) from err
    out = AuditFile()
    for pos, line in items:
        out.add(parse_line(line, f"{path} item {pos}"), pos)
    if "anchor" in meta:
        anchor = parse_line(meta["anchor"], f"{path} anchor")
        if isinstance(anchor, AuditRecord):
            out.anchor = anchor
    return out


def _read_hub_record(path: Path, data: bytes) -> AuditFile:
    """The audit messages of a hub record, in arrival order (line numbers: the record's)."""
    from gateway.core.iothub import parse_sender_topic

    out = AuditFile()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        try:
            doc = codec.loads(raw)
            _, props = parse_sender_topic(doc["topic"])
            if props.get(P_STREAM) != STREAM_AUDIT:
                continue
            body = base64.b64decode(doc["body"], validate=True)
        except (codec.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error) as err:
            raise AuditFileError(f"{where}: not a hub record line ({err})") from err
        for line in body.splitlines():
            if line.strip():
                out.add(parse_line(line, f"{where} (audit message)"), number)
    return out


def line(item: AuditRecord | Head) -> str:
    """One line of the file (canonical JSON, so equal items give equal lines)."""
    if isinstance(item, AuditRecord):
        return item.line()
    return canonical_json({"head": item.to_json()})


def write(path: Path, items: Iterable[AuditRecord | Head]) -> None:
    path.write_text("".join(line(item) + "\n" for item in items), encoding="utf-8")
