"""``fieldgate open``: open recorded envelopes, refuse tampered ones, account for sequences."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gateway.consumer import SequenceTracker, open_all, read_record
from gateway.core import codec
from gateway.core.errors import FieldgateError
from gateway.identity import keyring as keyring_mod
from gateway.identity.pki import PASSPHRASE_ENV, Pki


def load_keyring(pki_dir: Path | None, keyring_path: Path | None) -> keyring_mod.Keyring:
    if pki_dir is not None:
        pki = Pki(pki_dir)
        return keyring_mod.load(keyring_path or pki.keyring, pki.passphrase())
    if keyring_path is None:
        raise FieldgateError("give --pki DIR or --keyring FILE")
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if not passphrase:
        raise FieldgateError(f"set {PASSPHRASE_ENV} to the keyring's passphrase")
    return keyring_mod.load(keyring_path, passphrase.encode())


def open_record(
    record: Path, *, pki_dir: Path | None, keyring_path: Path | None, as_json: bool, summary: bool
) -> int:
    """Print every reading (deduplicated, conflicts flagged); exit 1 if any envelope was refused
    or in conflict."""
    ring = load_keyring(pki_dir, keyring_path)
    tracker = SequenceTracker()
    messages = read_record(record)
    opened, errors = open_all(messages, ring)
    out = sys.stdout
    unique = 0
    for item in opened:
        before = len(tracker.conflicts)
        fresh = tracker.add(item)
        conflict = len(tracker.conflicts) > before
        if conflict:
            h = item.header
            print(
                f"CONFLICT {item.device_id} boot {h.boot_id} seq {h.first_seq}.."
                f"{h.first_seq + h.count - 1}: numbers seen before with other content",
                file=sys.stderr,
            )
        else:
            unique += len(fresh)
        if summary:
            continue
        for r in fresh:
            if as_json:
                out.write(
                    codec.dumps(
                        {
                            "device": r.device_id,
                            "boot": r.boot_id,
                            "seq": r.seq,
                            "point": r.point,
                            "value": r.value,
                            "ts_ms": r.ts_ms,
                            "quality": r.quality,
                            **({"conflict": True} if conflict else {}),
                        }
                    ).decode()
                    + "\n"
                )
            else:
                out.write(
                    f"{r.device_id} {r.boot_id}:{r.seq} {r.point}={r.value!r} "
                    f"ts={r.ts_ms} {r.quality}{' CONFLICT' if conflict else ''}\n"
                )
    for line in errors:
        print(f"REFUSED {line}", file=sys.stderr)
    gaps = tracker.gaps()
    print(
        f"{len(messages)} messages: {len(opened)} opened, {len(errors)} refused; "
        f"{unique} readings, {tracker.duplicates} duplicates dropped, "
        f"{sum(len(g) for g in gaps.values())} gaps, {len(tracker.conflicts)} conflicts "
        f"({tracker.conflicting_readings} readings)",
        file=sys.stderr,
    )
    for (device, boot), holes in sorted(gaps.items()):
        print(f"  gap {device} boot {boot}: {holes[:5]}", file=sys.stderr)
    if summary:
        out.writelines(line + "\n" for line in summary_lines(tracker))
    return 1 if errors or tracker.conflicts else 0


def summary_lines(tracker: SequenceTracker) -> list[str]:
    """One line per device (readings, duplicates, gaps with the readings they miss, boots),
    then the total."""
    per: dict[str, list[int]] = {}
    for (device, _boot), stream in tracker.streams.items():
        row = per.setdefault(device, [0, 0, 0, 0, 0])
        holes = stream.gaps()
        row[0] += stream.count()
        row[1] += stream.duplicates
        row[2] += len(holes)
        row[3] += sum(end - start for start, end in holes)
        row[4] += 1
    width = max((len(d) for d in per), default=0)
    lines = [f"{device:<{width}}  {_counts(*row)}" for device, row in sorted(per.items())]
    total = [sum(column) for column in zip(*per.values(), strict=True)] or [0] * 5
    lines.append(f"{'total':<{width}}  {_counts(*total)} on {len(per)} devices")
    return lines


def _counts(readings: int, duplicates: int, gaps: int, missing: int, boots: int) -> str:
    return (
        f"{readings} readings, {duplicates} duplicates, {gaps} gaps "
        f"({missing} readings missing), {boots} boot{'s' if boots != 1 else ''}"
    )
