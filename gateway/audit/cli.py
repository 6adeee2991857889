"""``fieldgate audit verify|show``: check an audit file's chain, or print its records.

verify exits 0 only if the whole chain holds, 1 naming the first bad record and why, 2 for a
file that is not an audit file or a key that cannot be read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from gateway.audit import files
from gateway.core import audit
from gateway.core.audit import AuditRecord
from gateway.core.errors import EXIT_FAILED


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def verify_file(
    path: Path, *, cert: Path | None, key_pub: Path | None, chain_id: str | None, as_json: bool
) -> int:
    from gateway.identity.auditkeys import load_verifier

    public_key = load_verifier(
        cert if cert is not None else key_pub,  # type: ignore[arg-type]  # argparse: one of
        certificate=cert is not None,
    )
    read = files.read(path)
    chain = chain_id or (read.records[0].chain_id if read.records else None)
    if chain is None:
        chain = read.heads[0].chain_id if read.heads else "-"
    after = (read.anchor.seq, read.anchor.hash) if read.anchor is not None else None
    verdict = audit.verify(read.records, read.heads, public_key, chain, after=after)
    line = read.line_of(verdict.index, head=verdict.head) if not verdict.ok else None
    if as_json:
        doc: dict[str, Any] = {
            "file": str(path),
            "chain": chain,
            "ok": verdict.ok,
            "reason": verdict.reason,
            "message": verdict.message,
            "seq": verdict.seq,
            "through": verdict.through,
            "line": line,
            "records": verdict.records,
            "heads": verdict.heads,
            "last_seq": verdict.last_seq,
            "proven_seq": verdict.proven_seq,
            "lost": verdict.lost,
            "duplicates": verdict.duplicates,
        }
        print(audit.canonical_json(doc))
    elif verdict.ok:
        if after is not None:
            print(
                f"{path}: records up to seq {after[0]} were pruned by the audit quota "
                "(the hub has them); verified from there on"
            )
        extra = f"; {verdict.lost} records lost (audit-lost)" if verdict.lost else ""
        dupes = f"; {verdict.duplicates} duplicates skipped" if verdict.duplicates else ""
        first = after[0] + 1 if after is not None else 0
        print(
            f"{path}: chain {chain} holds: {verdict.records} records "
            f"(seq {first}..{verdict.last_seq}), "
            f"{verdict.heads} signed heads, the last at seq {verdict.proven_seq}{extra}{dupes}"
        )
    else:
        where = f" (line {line})" if line is not None else ""
        print(f"{path}: chain {chain} BROKEN{where}: {verdict.message} [{verdict.reason}]")
    return 0 if verdict.ok else EXIT_FAILED


def parse_time(text: str) -> float:
    """A Unix time in seconds, or an ISO 8601 time (UTC unless it names a zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected Unix seconds or an ISO 8601 time (2026-12-02T03:00:00Z)"
        ) from err
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def selected(
    records: list[AuditRecord],
    kinds: list[str] | None,
    devices: list[str] | None,
    since: float | None,
    until: float | None,
) -> list[AuditRecord]:
    return [
        r
        for r in records
        if (not kinds or r.kind in kinds)
        and (not devices or r.device in devices)
        and (since is None or r.ts >= since)
        and (until is None or r.ts < until)
    ]


def show_file(
    path: Path,
    *,
    kinds: list[str] | None,
    devices: list[str] | None,
    since: float | None,
    until: float | None,
    as_json: bool,
) -> int:
    read = files.read(path)
    shown = selected(read.records, kinds, devices, since, until)
    out = sys.stdout
    for r in shown:
        if as_json:
            out.write(audit.canonical_json(r.to_json()) + "\n")
        else:
            out.write(
                f"{r.seq:>6} {_when(r.ts)} {r.kind:<20} {r.device or '-':<16} {r.details_json}\n"
            )
    print(
        f"{len(shown)} of {len(read.records)} records shown, {len(read.heads)} heads "
        f"(not verified: `fieldgate audit verify` checks the chain)",
        file=sys.stderr,
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    return verify_file(
        Path(args.file),
        cert=Path(args.cert) if args.cert else None,
        key_pub=Path(args.key_pub) if args.key_pub else None,
        chain_id=args.chain,
        as_json=args.json,
    )


def cmd_show(args: argparse.Namespace) -> int:
    return show_file(
        Path(args.file),
        kinds=args.kind,
        devices=args.device,
        since=args.since,
        until=args.until,
        as_json=args.json,
    )


def add_parser(verbs: Any) -> None:
    sub = verbs.add_parser(
        "audit", help="verify or show an audit log (hash-chained records, signed heads)"
    ).add_subparsers(dest="audit_verb", required=True)
    verify = sub.add_parser(
        "verify", help="check the chain: exit 0 only if it holds, else name the first bad record"
    )
    verify.add_argument("file", help='JSON lines of {"record": ...} and {"head": ...}')
    key = verify.add_mutually_exclusive_group(required=True)
    key.add_argument("--cert", help="the gateway's certificate (PEM; the first of a bundle)")
    key.add_argument("--key-pub", help="the gateway's public key (PEM, SubjectPublicKeyInfo)")
    verify.add_argument(
        "--chain", help="the chain id (the gateway's id) expected; default: the first record's"
    )
    verify.add_argument("--json", action="store_true", help="the verdict as one JSON object")
    verify.set_defaults(func=cmd_verify)
    show = sub.add_parser("show", help="print the records (not verified), filtered")
    show.add_argument("file")
    show.add_argument("--kind", action="append", metavar="K", help="only this kind (repeatable)")
    show.add_argument("--device", action="append", metavar="D", help="only this device")
    show.add_argument("--since", type=parse_time, metavar="TS", help="from this time (inclusive)")
    show.add_argument("--until", type=parse_time, metavar="TS", help="before this time")
    show.add_argument("--json", action="store_true", help="one record per line, as JSON")
    show.set_defaults(func=cmd_show)
