"""The audit chain: 1,000 seeded random mutations of a recorded chain are all detected, each
naming the right record; the streaming verifier agrees and speaks as soon as it can."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.core import audit
from gateway.core.audit import AuditError, AuditRecord, ChainVerifier, Head, Verdict
from gateway.identity.auditkeys import Signer

CHAIN = "gw-1"
OTHER = "gw-2"
N = 300
EVERY = 20  # a head after every 20th record, and one after the last

KEY = Signer.of(ec.derive_private_key(0xA0D17, ec.SECP256R1()))
OTHER_KEY = Signer.of(ec.derive_private_key(0xBAD, ec.SECP256R1()))
PUB = KEY.public()

Item = AuditRecord | Head
KINDS = ["admission", "quarantine", "command-refused", "config-loaded", "tamper", "start"]


def record_chain(chain_id: str, key: Signer, seed: int) -> list[Item]:
    """The items in the order the gateway writes them: each head right after its record."""
    rng = random.Random(seed)
    items: list[Item] = []
    last = None
    for seq in range(N):
        ts = 1_795_900_000.0 + seq * 0.25 + rng.random() / 8
        if seq == 150:
            last = audit.lost(last, ts, 17, chain_id)
        else:
            device = rng.choice([None, "plc-1", "plc-2", "ble-3"])
            details = {"n": seq, "why": rng.choice(["fingerprint", "range", "ok"]), "v": 1.5}
            last = audit.append(last, ts, rng.choice(KINDS), device, details, chain_id)
        items.append(last)
        if seq % EVERY == EVERY - 1 or seq == N - 1:
            items.append(audit.sign_head(last, key, ts + 0.01))
    return items


ITEMS = record_chain(CHAIN, KEY, 1)
OTHER_ITEMS = record_chain(OTHER, OTHER_KEY, 2)


def split(items: list[Item]) -> tuple[list[AuditRecord], list[Head]]:
    return (
        [i for i in items if isinstance(i, AuditRecord)],
        [i for i in items if isinstance(i, Head)],
    )


def check(items: list[Item]) -> Verdict:
    records, heads = split(items)
    return audit.verify(records, heads, PUB, CHAIN)


def stream(items: list[Item]) -> Verdict:
    v = ChainVerifier(PUB, CHAIN)
    for item in items:
        if isinstance(item, AuditRecord):
            v.add(item)
        else:
            v.add_head(item)
    return v.verdict()


def rehash(r: AuditRecord) -> AuditRecord:
    return dataclasses.replace(r, hash=hashlib.sha256(r.canonical()).digest())


def pos(items: list[Item], seq: int) -> int:
    return next(i for i, x in enumerate(items) if isinstance(x, AuditRecord) and x.seq == seq)


def head_seqs() -> list[int]:
    return [h.seq for h in split(ITEMS)[1]]


def prior_head(seq: int) -> int:
    """The seq of the last head before ``seq`` (-1: none)."""
    return max([h for h in head_seqs() if h < seq], default=-1)


@dataclass
class Expect:
    reason: str
    seq: int
    through: int | None = None
    head: bool = False


# -- mutations: each returns the mutated items and what the verdict must say ------------------


def edit_field(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    """An edited field, the hash left as it was."""
    out = list(items)
    seq = rng.randrange(N)
    p = pos(out, seq)
    r = out[p]
    assert isinstance(r, AuditRecord)
    name = rng.choice(["ts", "kind", "device", "details", "prev", "seq", "chain", "hash"])
    changed = {
        "ts": {"ts": r.ts + rng.choice([-1.0, 0.001, 3600.0])},
        "kind": {"kind": "start" if r.kind != "start" else "stop"},
        "device": {"device": "plc-9" if r.device != "plc-9" else None},
        "details": {"details_json": audit.canonical_details({**r.details, "n": -1})},
        "prev": {"prev": rng.randbytes(32)},
        "seq": {"seq": r.seq + rng.choice([1, 2, 1000])},
        "chain": {"chain_id": OTHER},
        "hash": {"hash": rng.randbytes(32)},
    }[name]
    out[p] = dataclasses.replace(r, **changed)  # type: ignore[arg-type]
    return out, Expect("edited", seq)


def edit_and_rehash(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    """An edited field and the record's hash recomputed: its successor or the head give it
    away."""
    out = list(items)
    seq = rng.randrange(N)
    p = pos(out, seq)
    r = out[p]
    assert isinstance(r, AuditRecord)
    name = rng.choice(["ts", "details", "kind", "device", "prev", "seq", "chain"])
    if name == "prev" and seq == 0:
        name = "details"
    changed = {
        "ts": {"ts": r.ts + 0.5},
        "details": {"details_json": audit.canonical_details({**r.details, "edited": True})},
        "kind": {"kind": "audit-lost" if r.kind != "audit-lost" else "start"},
        "device": {"device": "intruder" if r.device != "intruder" else None},
        "prev": {"prev": rng.randbytes(32)},
        "seq": {"seq": r.seq + rng.choice([1, 5]) if rng.random() < 0.5 else max(0, r.seq - 3)},
        "chain": {"chain_id": OTHER},
    }[name]
    if name == "seq" and changed["seq"] == r.seq:
        changed = {"seq": r.seq + 1}
    out[p] = rehash(dataclasses.replace(r, **changed))  # type: ignore[arg-type]
    if name == "prev":
        return out, Expect("link", seq)
    if name == "seq":
        return out, Expect("renumbered", seq)
    if name == "chain":
        return out, Expect("foreign", seq)
    if seq == N - 1:
        # The last record, signed by the last head: nothing after it tells whether only it
        # changed, so the verdict names every record since the head before.
        return out, Expect("head-mismatch", prior_head(seq) + 1, seq)
    if seq in head_seqs():
        return out, Expect("head-mismatch", seq)
    return out, Expect("edited", seq)


def drop(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    out = list(items)
    seq = rng.randrange(N)
    del out[pos(out, seq)]
    if seq == N - 1:
        return out, Expect("truncated", seq)
    return out, Expect("missing", seq)


def swap(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    out = list(items)
    a = rng.randrange(N - 1)
    b = a + 1 if rng.random() < 0.5 else rng.randrange(a + 1, N)
    pa, pb = pos(out, a), pos(out, b)
    out[pa], out[pb] = out[pb], out[pa]
    return out, Expect("reordered", a)


def truncate_records(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    """The last records removed, the heads kept: the last head says how long the chain is."""
    n = rng.randint(1, 40)
    out = [i for i in items if not (isinstance(i, AuditRecord) and i.seq >= N - n)]
    return out, Expect("truncated", N - n, N - 1, head=True)


def cut(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    """The file cut anywhere but just after a head (a valid shorter log: see docs/audit.md)."""
    while True:
        k = rng.randrange(1, len(items))
        last = items[k - 1]
        if isinstance(last, AuditRecord) and last.seq not in head_seqs():
            break
    out = items[:k]
    assert isinstance(last, AuditRecord)
    return out, Expect("unsigned", prior_head(last.seq) + 1, last.seq)


def resign(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    """A head signed again with another key."""
    out = list(items)
    heads = [i for i, x in enumerate(out) if isinstance(x, Head)]
    p = rng.choice(heads)
    h = out[p]
    assert isinstance(h, Head)
    record = out[p - 1]
    assert isinstance(record, AuditRecord)
    out[p] = audit.sign_head(record, OTHER_KEY, h.ts)
    return out, Expect("signature", h.seq, head=True)


def rewrite_and_resign(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    """A record edited, the rest of the chain rehashed and every later head re-signed with
    another key: the first such head is named (the records before it are not proven)."""
    seq = rng.randrange(N)
    out: list[Item] = []
    last: AuditRecord | None = None
    for item in items:
        if isinstance(item, AuditRecord):
            if item.seq < seq:
                last = item
            else:
                details = item.details | ({"edited": 1} if item.seq == seq else {})
                last = audit.append(last, item.ts, item.kind, item.device, details, CHAIN)
            out.append(last)
        elif item.seq < seq:
            out.append(item)
        else:
            assert last is not None
            out.append(audit.sign_head(last, OTHER_KEY, item.ts))
    first_head = min(h for h in head_seqs() if h >= seq)
    return out, Expect("signature", first_head, head=True)


def strip_signature(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    out = list(items)
    p = rng.choice([i for i, x in enumerate(out) if isinstance(x, Head)])
    h = out[p]
    assert isinstance(h, Head)
    out[p] = dataclasses.replace(h, signature=b"")
    return out, Expect("unsigned-head", h.seq, head=True)


def splice_records(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    """Another gateway's records, with the same seq numbers, in place of ours (or inserted)."""
    seq = rng.randrange(N - 5)
    n = rng.randint(1, 5)
    theirs = [x for x in OTHER_ITEMS if isinstance(x, AuditRecord) and seq <= x.seq < seq + n]
    out = list(items)
    p = pos(out, seq)
    if rng.random() < 0.5:
        out[p : pos(out, seq + n - 1) + 1] = theirs
    else:
        out[p:p] = theirs
    return out, Expect("foreign", seq)


def splice_head(items: list[Item], rng: random.Random) -> tuple[list[Item], Expect]:
    out = list(items)
    p = rng.choice([i for i, x in enumerate(out) if isinstance(x, Head)])
    h = out[p]
    assert isinstance(h, Head)
    out[p] = next(x for x in OTHER_ITEMS if isinstance(x, Head) and x.seq == h.seq)
    return out, Expect("foreign", h.seq, head=True)


MUTATIONS: list[Callable[[list[Item], random.Random], tuple[list[Item], Expect]]] = [
    edit_field,
    edit_and_rehash,
    drop,
    swap,
    truncate_records,
    cut,
    resign,
    rewrite_and_resign,
    strip_signature,
    splice_records,
    splice_head,
]


def test_the_recorded_chain_holds() -> None:
    for verdict in (check(ITEMS), stream(ITEMS)):
        assert verdict.ok, verdict.message
        assert (verdict.records, verdict.last_seq, verdict.proven_seq) == (N, N - 1, N - 1)
        assert verdict.heads == len(head_seqs())
        assert verdict.lost == 17  # the "audit-lost" record is content, not a break


def test_a_thousand_random_mutations_are_all_detected_each_naming_the_right_record() -> None:
    rng = random.Random(20261202)
    seen: dict[str, int] = {}
    wrong = []
    for n in range(1000):
        mutate = MUTATIONS[n % len(MUTATIONS)] if n < 2 * len(MUTATIONS) else rng.choice(MUTATIONS)
        mutated, expect = mutate(ITEMS, rng)
        for how, verdict in (("verify", check(mutated)), ("stream", stream(mutated))):
            got = (verdict.ok, verdict.reason, verdict.seq, verdict.through, verdict.head)
            want = (False, expect.reason, expect.seq, expect.through or expect.seq, expect.head)
            if got != want:
                wrong.append(f"{n} {mutate.__name__} {how}: got {got} want {want}: {verdict}")
        seen[mutate.__name__] = seen.get(mutate.__name__, 0) + 1
    assert wrong == []
    assert set(seen) == {m.__name__ for m in MUTATIONS}
    assert sum(seen.values()) == 1000


def test_the_verdict_names_the_records_position_in_the_input() -> None:
    records, heads = split(ITEMS)
    records[42] = dataclasses.replace(records[42], ts=0.0)
    verdict = audit.verify(records, heads, PUB, CHAIN)
    assert (verdict.reason, verdict.seq, verdict.index) == ("edited", 42, 42)
    assert "record 42" in verdict.message


def test_the_streaming_verifier_speaks_when_the_bad_record_arrives() -> None:
    v = ChainVerifier(PUB, CHAIN)
    records, _ = split(ITEMS)
    for r in records[:10]:
        assert v.add(r) is None
    failure = v.add(dataclasses.replace(records[10], kind="stop"))
    assert failure is not None and (failure.reason, failure.seq) == ("edited", 10)
    assert v.add(records[11]) is failure  # the first bad record stays the verdict


def test_identical_resends_are_duplicates_not_breaks() -> None:
    items = list(ITEMS)
    resent = items[30:45]  # at-least-once: a reconnect resends what was not acknowledged
    items[45:45] = resent
    for verdict in (check(items), stream(items)):
        assert verdict.ok, verdict.message
        assert verdict.duplicates == sum(isinstance(x, AuditRecord) for x in resent)


def test_a_consumer_resumes_after_a_record_it_verified_earlier() -> None:
    records, _ = split(ITEMS)
    v = ChainVerifier(PUB, CHAIN, after=(records[99].seq, records[99].hash))
    for item in ITEMS[pos(ITEMS, 100) :]:
        v.add(item) if isinstance(item, AuditRecord) else v.add_head(item)
    assert v.verdict().ok
    bad = ChainVerifier(PUB, CHAIN, after=(99, bytes(32)))
    assert bad.add(records[100]) is not None and bad.failure is not None
    assert (bad.failure.reason, bad.failure.seq) == ("link", 100)


def test_an_ed25519_key_signs_and_verifies_and_another_algorithm_is_refused() -> None:
    signer = Signer.of(ed25519.Ed25519PrivateKey.generate())
    records, _ = split(ITEMS)
    head = audit.sign_head(records[-1], signer)
    assert head.alg == "ed25519" and audit.verify_head(head, signer.public())
    assert not audit.verify_head(head, PUB)  # an ed25519 head, a P-256 gateway key
    verdict = audit.verify(records, [head], PUB, CHAIN)
    assert verdict.reason == "signature" and "ed25519" in verdict.message


def test_an_empty_chain_does_not_hold() -> None:
    verdict = audit.verify([], [], PUB, CHAIN)
    assert not verdict.ok and verdict.reason == "empty"


@pytest.mark.parametrize(
    ("details", "field"),
    [
        ({"x": float("nan")}, "details.x"),
        ({"x": [1, {"y": float("inf")}]}, "details.x[1].y"),
        ({"x": 2**64}, "details.x"),
        ({"x": "\ud800"}, "details.x"),
        ({"x": object()}, "details.x"),
        ({1: "a"}, "details"),
    ],
)
def test_details_that_are_not_json_are_refused_by_name(details: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(AuditError, match="^" + re.escape(field) + ":"):
        audit.append(None, 1.0, "start", None, details, CHAIN)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "Start!"}, "kind"),
        ({"device": ""}, "device"),
        ({"chain_id": "gw 1"}, "chain id"),
        ({"ts": float("inf")}, "ts"),
    ],
)
def test_bad_names_are_refused(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    args = {"ts": 1.0, "kind": "start", "device": None, "details": {}, "chain_id": CHAIN}
    args.update(kwargs)
    with pytest.raises(AuditError, match=match):
        audit.append(None, **args)


def test_a_record_reads_back_from_its_json_with_the_same_hash() -> None:
    records, heads = split(ITEMS)
    for r in records[:50]:
        again = AuditRecord.from_json(r.to_json())
        assert again == r and again.computed_hash() == r.hash
    for h in heads:
        assert Head.from_json(h.to_json()) == h


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seq": "3"}, "record field 'seq'"),
        ({"seq": True}, "record field 'seq'"),
        ({"prev": "00"}, "record field 'prev'"),
        ({"details": []}, "details: expected a JSON object"),
        ({"v": 2}, "version 2 unknown"),
    ],
)
def test_a_malformed_record_is_refused_naming_the_field(change: dict, match: str) -> None:  # type: ignore[type-arg]
    doc = split(ITEMS)[0][3].to_json() | change
    with pytest.raises(AuditError, match=match):
        AuditRecord.from_json(doc)
