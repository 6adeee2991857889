"""The audit chain: hash-chained records, signed heads, and the verifier that names the first
bad record. Pure functions over frozen values: no I/O and no clock (the caller passes ``ts``).

The exact bytes are documented in ``docs/audit.md`` (a test rebuilds its worked example):

- a record's canonical bytes are ``b"fieldgate-audit-record\\n"`` + the JSON object of its
  fields (``chain, details, device, kind, prev, seq, ts, v``) with sorted keys, no whitespace,
  UTF-8, floats as Python's ``repr`` (shortest round trip); its hash is SHA-256 of them, so
  every record commits to its predecessor through ``prev``;
- a head is signed, not each record (a signature costs 20 AEAD calls): its message is
  ``b"fieldgate-audit-head\\n"`` + the canonical JSON of ``alg, chain, hash, seq, ts, v``.

Signing and verifying keys come from ``gateway.identity.auditkeys`` (``cryptography`` lives in
identity/); here they are only the two small protocols below.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Protocol

FORMAT_VERSION = 1
ZERO_HASH = bytes(32)
RECORD_DOMAIN = b"fieldgate-audit-record\n"
HEAD_DOMAIN = b"fieldgate-audit-head\n"
LOST_KIND = "audit-lost"

KIND_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# A chain id is the gateway's id; a device is a device id (gateway/config's pattern).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
INT_LIMIT = 2**63
MAX_DEPTH = 16

Reason = Literal[
    "ok",
    "empty",  # no records at all
    "edited",  # the record's hash does not match its contents
    "foreign",  # a record or head of another chain (another gateway)
    "missing",  # a sequence gap: records dropped
    "reordered",  # a record that belongs earlier arrived later
    "renumbered",  # a record's seq was changed (and its hash recomputed)
    "replayed",  # a seq seen before, with other content
    "link",  # prev does not hold the predecessor's hash
    "head-mismatch",  # a validly signed head names another hash for its record
    "signature",  # a head's signature does not verify with the gateway's key
    "unsigned-head",  # a head without a signature
    "truncated",  # a signed head says the chain is longer than what is there
    "unsigned",  # records after the last valid head: not proven
]


class AuditError(ValueError):
    """A record or head refused before it enters a chain: names the field and why."""


class HeadSigner(Protocol):
    """The gateway's private key (``gateway.identity.auditkeys.Signer``)."""

    @property
    def algorithm(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


class HeadVerifier(Protocol):
    """The gateway's public key, from its certificate (``gateway.identity.auditkeys``)."""

    @property
    def algorithm(self) -> str: ...

    def verify(self, signature: bytes, message: bytes) -> bool: ...


# -- canonical encoding ----------------------------------------------------------------------


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise AuditError(f"{where}: nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, bool | str):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise AuditError(f"{where}: not valid Unicode (a lone surrogate)") from err
        return
    if isinstance(value, int):
        if not -INT_LIMIT <= value < INT_LIMIT:
            raise AuditError(f"{where}: integer {value} outside 64 bits (send it as a string)")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(f"{where}: {value} is not a finite number")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"{where}: key {key!r} is not a string")
            _check_json(key, f"{where}: key", depth + 1)
            _check_json(item, f"{where}.{key}", depth + 1)
        return
    raise AuditError(f"{where}: {type(value).__name__} is not a JSON value")


def canonical_json(value: Any) -> str:
    """The one JSON form hashes and signatures are computed over (the standard ``json``, not
    orjson: its float form, ``repr``, is the documented rule)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def canonical_details(details: Mapping[str, Any]) -> str:
    if not isinstance(details, Mapping):
        raise AuditError(f"details: expected a JSON object, got {type(details).__name__}")
    _check_json(details, "details")
    return canonical_json(details)


def _record_bytes(
    chain_id: str,
    details_json: str,
    device: str | None,
    kind: str,
    prev: bytes,
    seq: int,
    ts: float,
) -> bytes:
    # Keys in sorted order, built from parts so details are encoded once.
    text = (
        f'{{"chain":{canonical_json(chain_id)},"details":{details_json},'
        f'"device":{canonical_json(device)},"kind":{canonical_json(kind)},'
        f'"prev":"{prev.hex()}","seq":{seq},"ts":{ts!r},"v":{FORMAT_VERSION}}}'
    )
    return RECORD_DOMAIN + text.encode("utf-8")


@dataclass(frozen=True)
class AuditRecord:
    """One event of the chain. ``details_json`` is the canonical JSON of the details object
    (kept as text so the record stays immutable); ``details`` gives it parsed."""

    seq: int
    ts: float
    kind: str
    device: str | None
    details_json: str
    prev: bytes
    chain_id: str
    hash: bytes

    @cached_property
    def details(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.details_json)
        return parsed

    def canonical(self) -> bytes:
        """The bytes whose SHA-256 is this record's hash (``docs/audit.md``)."""
        return _record_bytes(
            self.chain_id, self.details_json, self.device, self.kind, self.prev, self.seq, self.ts
        )

    def computed_hash(self) -> bytes:
        return hashlib.sha256(self.canonical()).digest()

    def line(self) -> str:
        """``canonical_json({"record": self.to_json()})``, built from the parts already
        encoded (the details once): what the gateway's log and stream carry per record."""
        return (
            f'{{"record":{{"chain":{canonical_json(self.chain_id)},"details":{self.details_json},'
            f'"device":{canonical_json(self.device)},"hash":"{self.hash.hex()}",'
            f'"kind":{canonical_json(self.kind)},"prev":"{self.prev.hex()}","seq":{self.seq},'
            f'"ts":{self.ts!r},"v":{FORMAT_VERSION}}}}}'
        )

    def to_json(self) -> dict[str, Any]:
        """The record as the file and the stream carry it (``{"record": ...}``)."""
        return {
            "v": FORMAT_VERSION,
            "chain": self.chain_id,
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
            "device": self.device,
            "details": self.details,
            "prev": self.prev.hex(),
            "hash": self.hash.hex(),
        }

    @classmethod
    def from_json(cls, doc: Any) -> AuditRecord:
        """A record as read from a file or a message; refuses malformed fields by name. The
        hash is taken as written: the verifier checks it."""
        if not isinstance(doc, Mapping):
            raise AuditError("record: expected a JSON object")
        _version(doc, "record")
        seq = _int(doc, "seq", "record")
        return cls(
            seq=seq,
            ts=_ts(doc, "record"),
            kind=_str(doc, "kind", "record"),
            device=_opt_str(doc, "device", "record"),
            details_json=canonical_details(_field(doc, "details", "record")),
            prev=_hex32(doc, "prev", "record"),
            chain_id=_str(doc, "chain", "record"),
            hash=_hex32(doc, "hash", "record"),
        )


def _check_names(chain_id: str, kind: str, device: str | None) -> None:
    if not isinstance(chain_id, str) or not NAME_PATTERN.match(chain_id):
        raise AuditError(f"chain id {chain_id!r}: expected {NAME_PATTERN.pattern}")
    if not isinstance(kind, str) or not KIND_PATTERN.match(kind):
        raise AuditError(f"kind {kind!r}: expected {KIND_PATTERN.pattern}")
    if device is not None and (not isinstance(device, str) or not NAME_PATTERN.match(device)):
        raise AuditError(f"device {device!r}: expected {NAME_PATTERN.pattern} or null")


def append(
    prev_record: AuditRecord | None,
    ts: float,
    kind: str,
    device: str | None,
    details: Mapping[str, Any],
    chain_id: str,
) -> AuditRecord:
    """The record that follows ``prev_record`` (``None``: the chain's first, seq 0)."""
    _check_names(chain_id, kind, device)
    ts = float(ts)
    if not math.isfinite(ts):
        raise AuditError(f"ts {ts}: not a finite number")
    if prev_record is not None and prev_record.chain_id != chain_id:
        raise AuditError(
            f"chain id {chain_id!r}: the previous record is of chain {prev_record.chain_id!r}"
        )
    seq = 0 if prev_record is None else prev_record.seq + 1
    prev = ZERO_HASH if prev_record is None else prev_record.hash
    details_json = canonical_details(details)
    digest = hashlib.sha256(_record_bytes(chain_id, details_json, device, kind, prev, seq, ts))
    return AuditRecord(seq, ts, kind, device, details_json, prev, chain_id, digest.digest())


def lost(prev_record: AuditRecord | None, ts: float, count: int, chain_id: str) -> AuditRecord:
    """The record saying ``count`` records were lost (the audit quota was full): chain content,
    not a break."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise AuditError(f"count {count!r}: expected a positive integer")
    return append(prev_record, ts, LOST_KIND, None, {"count": count}, chain_id)


# -- heads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """A signed statement: chain ``chain_id`` holds ``seq + 1`` records and record ``seq``
    has hash ``hash``. One signature covers every record up to it through the prev links."""

    chain_id: str
    seq: int
    hash: bytes
    ts: float
    signature: bytes
    alg: str

    def message(self) -> bytes:
        """The bytes the signature is over (``docs/audit.md``)."""
        return head_message(self.chain_id, self.seq, self.hash, self.ts, self.alg)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "alg": self.alg,
            "chain": self.chain_id,
            "seq": self.seq,
            "hash": self.hash.hex(),
            "ts": self.ts,
            "sig": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, doc: Any) -> Head:
        if not isinstance(doc, Mapping):
            raise AuditError("head: expected a JSON object")
        _version(doc, "head")
        sig = _field(doc, "sig", "head")
        if not isinstance(sig, str):
            raise AuditError("head field 'sig': expected base64 text")
        try:
            signature = base64.b64decode(sig, validate=True)
        except binascii.Error as err:
            raise AuditError(f"head field 'sig': not base64 ({err})") from err
        return cls(
            chain_id=_str(doc, "chain", "head"),
            seq=_int(doc, "seq", "head"),
            hash=_hex32(doc, "hash", "head"),
            ts=_ts(doc, "head"),
            signature=signature,
            alg=_str(doc, "alg", "head"),
        )


def head_message(chain_id: str, seq: int, digest: bytes, ts: float, alg: str) -> bytes:
    text = (
        f'{{"alg":{canonical_json(alg)},"chain":{canonical_json(chain_id)},'
        f'"hash":"{digest.hex()}","seq":{seq},"ts":{float(ts)!r},"v":{FORMAT_VERSION}}}'
    )
    return HEAD_DOMAIN + text.encode("utf-8")


def sign_head(last: AuditRecord, key: HeadSigner, ts: float | None = None) -> Head:
    """A head over ``last`` (and so over every record before it). ``ts`` is the caller's
    clock at signing, by default the record's own time."""
    when = last.ts if ts is None else float(ts)
    message = head_message(last.chain_id, last.seq, last.hash, when, key.algorithm)
    return Head(last.chain_id, last.seq, last.hash, when, key.sign(message), key.algorithm)


def verify_head(head: Head, public_key: HeadVerifier) -> bool:
    """True only if the head is signed, with the key's algorithm, by that key."""
    if not head.signature or head.alg != public_key.algorithm:
        return False
    return public_key.verify(head.signature, head.message())


# -- verification ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a verifier concluded. When not ``ok``: ``seq`` is the first record the evidence
    shows to be bad (for a head's problem, the record the head is for), ``through`` the last
    record the evidence cannot tell apart from it (``seq`` when it is pinned down), ``head``
    whether the offending item is a head, ``index`` its position in the input (records and
    heads counted apart, as given to :func:`verify`), ``reason`` a code and ``message`` the
    sentence for a person."""

    ok: bool
    reason: Reason
    message: str
    seq: int | None = None
    through: int | None = None
    head: bool = False
    index: int | None = None
    records: int = 0
    heads: int = 0
    last_seq: int | None = None
    proven_seq: int | None = None
    lost: int = 0
    duplicates: int = 0


@dataclass
class _Pending:
    """A break whose blame the next item decides: ``blame_if_confirmed`` when the record at
    ``confirm_seq`` turns out genuine (its successor or a head agrees with it), else
    ``blame_if_not``."""

    kind: Literal["link", "head"]
    confirm_seq: int
    confirm_hash: bytes  # what the next record's prev / the head must hold to confirm
    on_confirmed: tuple[Reason, str, int, int]
    on_not: tuple[Reason, str, int, int]
    head_index: int | None = None


@dataclass
class ChainVerifier:
    """The streaming verifier, for a consumer that checks records as they arrive (in order,
    at least once: an identical resend is counted as a duplicate and skipped).

    ``add`` and ``add_head`` return the failing :class:`Verdict` once the first bad item is
    known (later items change nothing), else ``None``; :meth:`verdict` ends the input and
    checks the tail. ``after`` = (seq, hash) resumes after a record verified earlier.
    """

    public_key: HeadVerifier
    chain_id: str
    after: tuple[int, bytes] | None = None
    window: int = 1 << 17
    failure: Verdict | None = field(default=None, init=False)
    proven_seq: int = field(default=-1, init=False)
    records: int = field(default=0, init=False)
    heads: int = field(default=0, init=False)
    lost: int = field(default=0, init=False)
    duplicates: int = field(default=0, init=False)
    _expected: int = field(default=0, init=False)
    _last_hash: bytes = field(default=ZERO_HASH, init=False)
    _hashes: dict[int, bytes] = field(default_factory=dict, init=False)
    _index_of: dict[int, int] = field(default_factory=dict, init=False)
    _ahead: dict[int, tuple[Head, int]] = field(default_factory=dict, init=False)
    _pending: _Pending | None = field(default=None, init=False)
    _missing: tuple[int, int] | None = field(default=None, init=False)
    _record_index: int = field(default=-1, init=False)
    _head_index: int = field(default=-1, init=False)
    _first: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.after is not None:
            seq, digest = self.after
            self._expected = seq + 1
            self._last_hash = digest
            self._hashes[seq] = digest
            self.proven_seq = seq
            self._first = seq + 1

    # -- outcomes --

    def _fail(
        self,
        reason: Reason,
        message: str,
        seq: int,
        through: int | None = None,
        *,
        head: bool = False,
        index: int | None = None,
    ) -> Verdict:
        self._pending = None
        self.failure = Verdict(
            ok=False,
            reason=reason,
            message=message,
            seq=seq,
            through=seq if through is None else through,
            head=head,
            index=(self._head_index if head else self._record_index) if index is None else index,
            **self._counts(),
        )
        return self.failure

    def _counts(self) -> dict[str, Any]:
        last = self._expected - 1 if self._expected > self._first else None
        return {
            "records": self.records,
            "heads": self.heads,
            "last_seq": last,
            "proven_seq": self.proven_seq if self.proven_seq >= 0 else None,
            "lost": self.lost,
            "duplicates": self.duplicates,
        }

    def _resolve(self, confirmed: bool) -> Verdict:
        assert self._pending is not None
        reason, message, seq, through = (
            self._pending.on_confirmed if confirmed else self._pending.on_not
        )
        return self._fail(reason, message, seq, through, index=self._index_of.get(seq))

    # -- input --

    def add(self, record: AuditRecord) -> Verdict | None:
        self._record_index += 1
        if self.failure is not None:
            self._watch_missing(record)
            return self.failure
        e = self._expected
        computed = record.computed_hash()
        # An identical resend of a record already taken (at-least-once delivery).
        if record.seq < e and self._hashes.get(record.seq) == record.hash == computed:
            self.duplicates += 1
            return None
        if self._pending is not None:
            p = self._pending
            confirmed = (
                computed == record.hash
                and record.chain_id == self.chain_id
                and record.seq == p.confirm_seq + 1
                and record.prev == p.confirm_hash
            )
            return self._resolve(confirmed)
        said = f" (it says seq {record.seq})" if record.seq != e else ""
        if computed != record.hash:
            return self._fail(
                "edited", f"record {e}{said}: its hash does not match its contents (edited)", e
            )
        if record.chain_id != self.chain_id:
            return self._fail(
                "foreign",
                f"record {e}{said}: of chain {record.chain_id!r}, not {self.chain_id!r} "
                "(another gateway's record)",
                e,
            )
        if record.seq != e:
            if record.prev == self._last_hash:
                return self._fail(
                    "renumbered",
                    f"record {e}: says seq {record.seq} but follows record {e - 1} "
                    "(its number was changed)",
                    e,
                )
            if record.seq > e:
                self._missing = (e, record.seq - 1)
                return self._fail(
                    "missing",
                    f"record {e}: missing (seq jumps from {e - 1} to {record.seq})"
                    if record.seq == e + 1
                    else f"records {e}..{record.seq - 1}: missing (seq jumps from {e - 1} "
                    f"to {record.seq})",
                    e,
                    record.seq - 1,
                )
            return self._fail(
                "replayed",
                f"record {record.seq}: arrived again after record {e - 1}, with other content",
                record.seq,
            )
        if record.prev != self._last_hash:
            if e == self._first:
                return self._fail(
                    "link",
                    f"record {e}: its prev is not the "
                    + ("chain's start (32 zero bytes)" if e == 0 else "verified record's hash"),
                    e,
                )
            if self.proven_seq >= e - 1:
                return self._fail(
                    "link",
                    f"record {e}: its prev is not the hash of record {e - 1}, which a signed "
                    f"head proves (record {e} was changed)",
                    e,
                )
            self._pending = _Pending(
                "link",
                e,
                record.hash,
                on_confirmed=(
                    "edited",
                    f"record {e - 1}: is not the record that record {e} holds the hash of "
                    "(edited, and its hash recomputed)",
                    e - 1,
                    e - 1,
                ),
                on_not=(
                    "link",
                    f"record {e}: its prev is not the hash of record {e - 1} (changed)",
                    e,
                    e,
                ),
            )
        self._take(record)
        return None

    def _take(self, record: AuditRecord) -> None:
        self.records += 1
        self._hashes[record.seq] = record.hash
        self._hashes.pop(record.seq - self.window, None)
        self._index_of[record.seq] = self._record_index
        self._index_of.pop(record.seq - self.window, None)
        self._last_hash = record.hash
        self._expected = record.seq + 1
        if record.kind == LOST_KIND:
            count = record.details.get("count")
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                self.lost += count
        ahead = self._ahead.pop(record.seq, None)
        if ahead is not None:
            self._check_head(*ahead)

    def _watch_missing(self, record: AuditRecord) -> None:
        """After a gap: the missing record arriving later makes it a reordering."""
        f = self.failure
        if self._missing is None or f is None or f.reason != "missing":
            return
        lo, hi = self._missing
        if lo <= record.seq <= hi and record.chain_id == self.chain_id:
            self.failure = Verdict(
                ok=False,
                reason="reordered",
                message=f"record {lo}: out of order (record {hi + 1} came before it; "
                f"record {record.seq} arrived later)",
                seq=lo,
                through=lo,
                index=f.index,
                **{k: getattr(f, k) for k in self._counts()},
            )

    def add_head(self, head: Head) -> Verdict | None:
        self._head_index += 1
        return self._add_head(head, self._head_index)

    def _add_head(self, head: Head, index: int) -> Verdict | None:
        if self.failure is not None:
            return self.failure
        self._head_index = index
        if head.chain_id != self.chain_id:
            return self._fail(
                "foreign",
                f"head at seq {head.seq}: of chain {head.chain_id!r}, not {self.chain_id!r}",
                head.seq,
                head=True,
            )
        if not head.signature:
            return self._fail(
                "unsigned-head", f"head at seq {head.seq}: has no signature", head.seq, head=True
            )
        if not verify_head(head, self.public_key):
            unproven = _span(self.proven_seq + 1, head.seq)
            return self._fail(
                "signature",
                f"head at seq {head.seq}: its {head.alg} signature does not verify with the "
                f"gateway's {self.public_key.algorithm} key (forged, or signed by another key); "
                f"not proven: {unproven}",
                head.seq,
                head=True,
            )
        self.heads += 1
        if head.seq >= self._expected:
            self._ahead[head.seq] = (head, index)
            return None
        return self._check_head(head, index)

    def _check_head(self, head: Head, index: int) -> Verdict | None:
        if self.failure is not None:
            return self.failure
        held = self._hashes.get(head.seq)
        pending = self._pending
        if pending is not None and pending.confirm_seq == head.seq:
            return self._resolve(held == head.hash)
        if held is None:
            return None  # older than the window: nothing left to compare with
        if held != head.hash:
            lo = self.proven_seq + 1
            if head.seq == self._expected - 1:
                # Only this record changed if its successor holds the signed hash: wait for it.
                self._pending = _Pending(
                    "head",
                    head.seq,
                    head.hash,
                    on_confirmed=(
                        "head-mismatch",
                        f"record {head.seq}: is not the record the head at seq {head.seq} "
                        "signed (edited, and its hash recomputed)",
                        head.seq,
                        head.seq,
                    ),
                    on_not=(
                        "head-mismatch",
                        f"{_span(lo, head.seq)}: do not match the head signed at seq "
                        f"{head.seq} (changed, hashes recomputed)",
                        lo,
                        head.seq,
                    ),
                    head_index=index,
                )
                return None
            return self._fail(
                "head-mismatch",
                f"{_span(lo, head.seq)}: do not match the head signed at seq {head.seq}",
                lo,
                head.seq,
            )
        self.proven_seq = max(self.proven_seq, head.seq)
        return None

    def verdict(self) -> Verdict:
        """End of input: the verdict over everything added."""
        if self.failure is not None:
            return self.failure
        if self._pending is not None:
            p = self._pending
            if p.kind == "head":
                return self._resolve(False)
            # A link break at the last record with nothing after it: blame the predecessor,
            # but the evidence cannot tell the two apart.
            reason, message, seq, _ = p.on_confirmed
            return self._fail(
                reason, message + f"; record {p.confirm_seq} is not signed", seq, p.confirm_seq
            )
        last = self._expected - 1
        if self._ahead:
            top = max(self._ahead)
            return self._fail(
                "truncated",
                f"{_span(last + 1, top)}: missing: the head signed at seq {top} says the "
                f"chain holds {top + 1} records (truncated)",
                last + 1,
                top,
                head=True,
                index=self._ahead[top][1],
            )
        if self.records == 0:
            return self._fail("empty", "no records", self._first)
        if self.proven_seq < last:
            lo = self.proven_seq + 1
            return self._fail(
                "unsigned",
                f"{_span(lo, last)}: not covered by a signed head "
                "(cut after the last head, or not yet signed)",
                lo,
                last,
            )
        return Verdict(ok=True, reason="ok", message="the chain holds", **self._counts())


def verify(
    records: Sequence[AuditRecord],
    heads: Iterable[Head],
    public_key: HeadVerifier,
    chain_id: str,
    after: tuple[int, bytes] | None = None,
) -> Verdict:
    """Verify a whole chain. Records in the order given (a reordering is a break); each head
    is checked after the record it names, as the gateway sends them. ``after``: (seq, hash) of
    the record the input follows (a local log whose quota pruned what came before)."""
    v = ChainVerifier(public_key, chain_id, after=after)
    order = sorted(enumerate(heads), key=lambda item: item[1].seq)
    h = 0
    top = -1
    for record in records:
        v.add(record)  # after a failure it still looks for a reordering's missing record
        top = max(top, record.seq)
        while h < len(order) and order[h][1].seq <= top:
            v._add_head(order[h][1], order[h][0])
            h += 1
    for index, head in order[h:]:
        v._add_head(head, index)
    return v.verdict()


def _span(lo: int, hi: int) -> str:
    return f"record {lo}" if lo == hi else f"records {lo}..{hi}"


# -- field readers (from_json) ---------------------------------------------------------------


def _field(doc: Mapping[str, Any], name: str, what: str) -> Any:
    if name not in doc:
        raise AuditError(f"{what}: field {name!r} missing")
    return doc[name]


def _version(doc: Mapping[str, Any], what: str) -> None:
    v = _field(doc, "v", what)
    if v != FORMAT_VERSION or isinstance(v, bool):
        raise AuditError(f"{what} field 'v': version {v!r} unknown (this reads {FORMAT_VERSION})")


def _int(doc: Mapping[str, Any], name: str, what: str) -> int:
    value = _field(doc, name, what)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < INT_LIMIT:
        raise AuditError(f"{what} field {name!r}: expected a non-negative integer, got {value!r}")
    return value


def _ts(doc: Mapping[str, Any], what: str) -> float:
    value = _field(doc, "ts", what)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuditError(f"{what} field 'ts': expected a number, got {value!r}")
    ts = float(value)
    if not math.isfinite(ts):
        raise AuditError(f"{what} field 'ts': not finite")
    return ts


def _str(doc: Mapping[str, Any], name: str, what: str) -> str:
    value = _field(doc, name, what)
    if not isinstance(value, str) or not value:
        raise AuditError(f"{what} field {name!r}: expected a non-empty string, got {value!r}")
    return value


def _opt_str(doc: Mapping[str, Any], name: str, what: str) -> str | None:
    value = _field(doc, name, what)
    if value is None:
        return None
    if not isinstance(value, str):
        raise AuditError(f"{what} field {name!r}: expected a string or null, got {value!r}")
    return value


def _hex32(doc: Mapping[str, Any], name: str, what: str) -> bytes:
    value = _field(doc, name, what)
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise AuditError(f"{what} field {name!r}: expected 64 lowercase hex digits")
    return bytes.fromhex(value)
