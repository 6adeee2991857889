"""The audit file: JSON lines, one ``{"record": {...}}`` or ``{"head": {...}}`` per line, in the
order the gateway wrote (or the hub delivered) them. ``docs/audit.md`` defines it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.core import codec
from gateway.core.audit import AuditError, AuditRecord, Head, canonical_json
from gateway.core.errors import EXIT_REFUSED, FieldgateError


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

    def line_of(self, index: int | None, *, head: bool) -> int | None:
        lines = self.head_lines if head else self.record_lines
        return lines[index] if index is not None and 0 <= index < len(lines) else None


def read(path: Path) -> AuditFile:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AuditFileError(f"{path}: cannot read ({err.strerror or err})") from err
    out = AuditFile()
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            doc = codec.loads(line)
        except codec.JSONDecodeError as err:
            raise AuditFileError(f"{where}: not JSON ({err})") from err
        if not isinstance(doc, dict) or len(doc) != 1 or not {"record", "head"} & doc.keys():
            raise AuditFileError(f'{where}: expected {{"record": {{...}}}} or {{"head": {{...}}}}')
        try:
            if "record" in doc:
                out.records.append(AuditRecord.from_json(doc["record"]))
                out.record_lines.append(number)
            else:
                out.heads.append(Head.from_json(doc["head"]))
                out.head_lines.append(number)
        except AuditError as err:
            raise AuditFileError(f"{where}: {err}") from err
    return out


def line(item: AuditRecord | Head) -> str:
    """One line of the file (canonical JSON, so equal items give equal lines)."""
    key = "record" if isinstance(item, AuditRecord) else "head"
    return canonical_json({key: item.to_json()})


def write(path: Path, items: Iterable[AuditRecord | Head]) -> None:
    path.write_text("".join(line(item) + "\n" for item in items), encoding="utf-8")
