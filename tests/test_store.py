"""The durable store with real SQLite files: the queue contract, restarts, bounds, damage."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import apsw
import pytest

from gateway.core.readings import CODEC, Envelope, Header
from gateway.store import Store, status, verify
from gateway.store.memory import MemoryQueue
from gateway.store.queue import EnvelopeQueue

from conftest import fieldgate


def envelope(
    device: str, first: int, count: int = 10, size: int = 100, boot: str = "b"
) -> Envelope:
    body = os.urandom(size)
    return Envelope(device, Header(1, "k1", boot, first, count, CODEC), body, 1_700_000_000_000)


class Events:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def __call__(self, kind: str, device: str | None, reason: str, **fields: Any) -> None:
        self.items.append({"kind": kind, "device": device, "reason": reason, **fields})

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.items if e["kind"] == kind]


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())  # type: ignore[arg-type]


def test_fifo_lease_ack_release_and_everything_unacked_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "store.db"

    async def first_run() -> tuple[str, list[int]]:
        async with Store(path, max_bytes=10**7) as store:
            await store.put([envelope("a", 0), envelope("b", 0), envelope("a", 10)])
            await store.put([envelope("a", 20)])
            leased = await store.lease("a", 2)
            assert [x.envelope.header.first_seq for x in leased] == [0, 10]
            store.ack("a", leased[0].lease_id)
            store.release("a")  # connection lost: seq 10 goes back to the head
            again = await store.lease("a", 10)
            assert [x.envelope.header.first_seq for x in again] == [10, 20]
            return store.boot_id, [store.next_seq["a"], store.next_seq["b"]]

    boot, next_seq = run(first_run)
    assert next_seq == [30, 10]

    async def second_run() -> tuple[str, dict[str, int], list[int], list[int]]:
        async with Store(path, max_bytes=10**7) as store:
            a = [x.envelope.header.first_seq for x in await store.lease("a", 10)]
            b = [x.envelope.header.first_seq for x in await store.lease("b", 10)]
            return store.boot_id, store.next_seq, a, b

    boot2, seqs, a, b = run(second_run)
    assert boot2 == boot  # the boot id is the store's: sequence numbers continue under it
    assert seqs == {"a": 30, "b": 10}
    assert a == [10, 20] and b == [0]  # only the acked envelope is gone


def test_one_put_of_many_envelopes_is_one_commit(tmp_path: Path) -> None:
    async def scenario() -> int:
        async with Store(tmp_path / "s.db", max_bytes=10**8) as store:
            await store.put([envelope("a", i * 10) for i in range(500)])
            assert sum(d.queued for d in store.depth()) == 500
            return store.commits

    assert run(scenario) == 1


def test_lease_waits_for_a_put_and_close_wakes_it(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[int], list[Any]]:
        async with Store(tmp_path / "s.db", max_bytes=10**7) as store:
            waiting = asyncio.create_task(store.lease("a", 5))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            await store.put([envelope("a", 0)])
            got = [x.envelope.header.first_seq for x in await waiting]
            idle = asyncio.create_task(store.lease("b", 5))
            await asyncio.sleep(0.05)
            store.close()
            return got, await idle

    got, idle = run(scenario)
    assert got == [0] and idle == []


async def fill_and_lease(queue: EnvelopeQueue) -> list[int]:
    """15 envelopes of 100 bytes into a queue of 1,000: the first seqs it kept, both devices."""
    for i in range(15):
        await queue.put([envelope("a" if i % 2 else "b", i * 10)])
    a = [x.envelope.header.first_seq for x in await queue.lease("a", 20)]
    b = [x.envelope.header.first_seq for x in await queue.lease("b", 20)]
    return sorted(a + b)


def kept_by(policy: str) -> list[int]:
    """What each policy keeps of those: the newest ten, or the first ten."""
    return (
        [i * 10 for i in range(5, 15)] if policy == "drop-oldest" else [i * 10 for i in range(10)]
    )


@pytest.mark.parametrize("policy", ["drop-oldest", "refuse-newest"])
def test_a_full_store_drops_by_its_policy_and_counts_exactly(tmp_path: Path, policy: str) -> None:
    path = tmp_path / "s.db"
    events = Events()

    async def scenario() -> list[int]:
        async with Store(
            path,
            max_bytes=1000,
            policy=policy,  # type: ignore[arg-type]
            on_event=events,
        ) as store:
            return await fill_and_lease(store)

    kept = run(scenario)
    dropped = events.of("envelopes-dropped")
    assert sum(e["envelopes"] for e in dropped) == 5
    assert sum(e["readings"] for e in dropped) == 50
    assert kept == kept_by(policy)
    assert len(events.of("store-high-water")) == 1
    report = status(path)
    assert sum(d.get("dropped", {}).get("envelopes", 0) for d in report["devices"].values()) == 5
    assert sum(d.get("dropped", {}).get("readings", 0) for d in report["devices"].values()) == 50
    # Refused envelopes consumed their sequence numbers: the consumer sees a gap that the
    # drop events account for, never the same number twice.
    assert report["devices"]["a"]["next_seq"] == 140  # last "a" envelope: seq 130 + 10
    assert report["devices"]["b"]["next_seq"] == 150  # last "b" envelope: seq 140 + 10


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_store_is_kept_aside_and_a_new_one_starts(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "store.db"

    async def fill() -> str:
        async with Store(path, max_bytes=10**8) as store:
            await store.put([envelope("a", i * 10, size=4000) for i in range(50)])
            return store.boot_id

    old_boot = run(fill)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(data[:100] + os.urandom(len(data) - 100))
    else:
        path.write_bytes(data[: len(data) // 3])
    events = Events()

    async def reopen() -> tuple[str, int]:
        async with Store(path, max_bytes=10**8, on_event=events) as store:
            await store.put([envelope("a", 0)])
            return store.boot_id, sum(d.queued for d in store.depth())

    new_boot, queued = run(reopen)
    assert new_boot != old_boot and queued == 1
    [event] = events.of("store-corrupt")
    kept = Path(event["kept"])
    assert kept.exists() and kept.read_bytes()[:100] == data[:100]


def test_verify_and_status_commands(tmp_path: Path) -> None:
    path = tmp_path / "store.db"

    async def fill() -> None:
        async with Store(path, max_bytes=10**8) as store:
            await store.put([envelope("a", 0), envelope("a", 10), envelope("b", 0)])

    run(fill)
    ok = subprocess.run(
        fieldgate("store", "verify", "--path", str(path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "sound" in ok.stdout
    shown = subprocess.run(
        fieldgate("store", "status", "--path", str(path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0
    assert "a: 2 envelopes, 200 bytes" in shown.stdout and "next seq 20" in shown.stdout

    conn = apsw.Connection(str(path))
    conn.execute("UPDATE envelopes SET first_seq=5 WHERE first_seq=10 AND device='a'")
    conn.execute("UPDATE envelopes SET body=x'00' WHERE device='b'")
    conn.close()
    problems = verify(path)
    assert any("overlaps" in p for p in problems) and any("too short" in p for p in problems)
    bad = subprocess.run(
        fieldgate("store", "verify", "--path", str(path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "2 problems" in bad.stdout


def test_sequence_state_that_went_backwards_starts_a_new_boot_and_a_forged_mark_is_caught(
    tmp_path: Path,
) -> None:
    from gateway.store import SeqMarks

    path = tmp_path / "store.db"
    marks = SeqMarks.from_sealing("k1", {"k1": b"\x01" * 32})

    async def put() -> str:
        async with Store(path, max_bytes=10**7, marks=marks) as store:
            boot = store.boot_id
            await store.put([envelope("a", 0, boot=boot), envelope("a", 10, boot=boot)])
            await store.put([envelope("b", 0, boot=boot)])
            return boot

    def reopen() -> tuple[str, dict[str, int], Events]:
        events = Events()

        async def go() -> tuple[str, dict[str, int]]:
            async with Store(path, max_bytes=10**7, marks=marks, on_event=events) as store:
                return store.boot_id, dict(store.next_seq)

        boot, seqs = run(go)
        return boot, seqs, events

    boot = run(put)
    conn = apsw.Connection(str(path))
    # Below the end of an envelope still stored: caught even without a key.
    conn.execute("UPDATE sequences SET next_seq=5 WHERE device='a'")
    assert verify(path) == [
        "a: sequence state went backwards: next_seq 5 is below the end (20) of an envelope "
        "still stored"
    ]
    conn.close()
    boot2, seqs, events = reopen()
    assert boot2 != boot and seqs == {}  # numbers start afresh under a new boot, never reused
    assert [(e["device"], e["old_boot"], e["new_boot"]) for e in events.of("sequence-rewound")] == [
        ("a", boot, boot2)
    ]
    # A mark edited to match a rewound counter does not authenticate.
    run(put)
    conn = apsw.Connection(str(path))
    conn.execute("UPDATE sequences SET next_seq=100 WHERE device='b'")
    conn.execute("UPDATE meta SET value='100:k1:' || substr(value, -32) WHERE key='seqmark:b'")
    conn.close()
    boot3, _, events = reopen()
    assert boot3 != boot2
    assert [e["device"] for e in events.of("sequence-rewound")] == ["b"]
    assert "does not authenticate" in events.of("sequence-rewound")[0]["reason"]
    # A clean reopen keeps its boot.
    assert reopen()[0] == boot3
    # Deleting the marks along with the rewind does not hide it (an attack found in review):
    # every sequence row must have its mark.
    run(put)
    conn = apsw.Connection(str(path))
    conn.execute("DELETE FROM envelopes")
    conn.execute("DELETE FROM meta WHERE key LIKE 'seqmark%'")  # marks and any flag
    conn.execute("UPDATE sequences SET next_seq=0")
    conn.close()
    assert any("mark is missing" in p for p in verify(path, marks))  # with the keys
    boot4, seqs, events = reopen()
    assert boot4 != boot3 and seqs == {}
    assert {e["device"] for e in events.of("sequence-rewound")} == {"a", "b"}
    assert all("missing" in e["reason"] for e in events.of("sequence-rewound"))


@pytest.mark.parametrize("policy", ["drop-oldest", "refuse-newest"])
def test_a_full_memory_queue_drops_by_its_policy_like_the_store(policy: str) -> None:
    events = Events()

    async def scenario() -> list[int]:
        async with MemoryQueue(
            max_bytes=1000,
            policy=policy,  # type: ignore[arg-type]
            on_event=events,
        ) as queue:
            return await fill_and_lease(queue)

    kept = run(scenario)
    dropped = events.of("envelopes-dropped")
    assert sum(e["envelopes"] for e in dropped) == 5
    assert sum(e["readings"] for e in dropped) == 50
    assert {e["policy"] for e in dropped} == {policy}
    assert all(
        e.keys() == {"kind", "device", "reason", "envelopes", "readings", "seq_ranges", "policy"}
        for e in dropped
    )
    assert kept == kept_by(policy)


@pytest.mark.parametrize("outside", [False, True])
def test_the_store_path_rule_for_a_gateway_its_workers_and_what_they_left(
    tmp_path: Path, outside: bool
) -> None:
    from types import SimpleNamespace

    from gateway.store import paths

    state = tmp_path / "state"
    setting = tmp_path / "disk" / "q.db" if outside else None
    cfg: Any = SimpleNamespace(
        store=SimpleNamespace(path=setting), gateway=SimpleNamespace(state_dir=state)
    )
    single = setting or state / "store.db"
    worker = [
        (tmp_path / "disk" / f"q-worker-{i}.db") if outside else state / f"worker-{i}" / "store.db"
        for i in range(12)
    ]
    assert paths.store_path(cfg) == single
    assert paths.run_stores(cfg, 1) == [single]
    assert paths.run_stores(cfg, 3) == worker[:3]
    assert paths.stores_left(cfg) == [single]  # nothing yet: where the single store would be
    for i in (11, 2):
        worker[i].parent.mkdir(parents=True, exist_ok=True)
        worker[i].write_bytes(b"")
        paths.worker_state_dir(cfg, i).mkdir(parents=True, exist_ok=True)
    assert paths.worker_indices(cfg) == {2, 11}
    assert paths.stores_left(cfg) == [worker[2], worker[11]]  # in worker order
    single.parent.mkdir(parents=True, exist_ok=True)
    single.write_bytes(b"")
    assert paths.stores_left(cfg) == [single, worker[2], worker[11]]


def test_a_store_file_without_its_schema_yet_is_not_read_as_a_store(tmp_path: Path) -> None:
    """A gateway creates the file, then its schema: `fieldgate store status` in between says
    so in one line instead of failing on a missing table."""
    from gateway.store.sqlite import StoreNotReady

    path = tmp_path / "store.db"
    apsw.Connection(str(path)).close()  # the file, as a starting gateway has just made it
    with pytest.raises(StoreNotReady, match="no store schema yet"):
        status(path)
    result = subprocess.run(
        fieldgate("store", "status", "--path", str(path)), capture_output=True, text=True
    )
    assert result.returncode != 0 and "no store schema yet" in result.stderr, result
    assert "Traceback" not in result.stderr


def test_the_readings_held_are_counted_as_envelopes_come_go_drop_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    """``DeviceDepth.readings`` (the metrics' fieldgate_store_readings) is a running count in
    the ledger, not a scan: it must agree with the header counts held after every move."""
    path = tmp_path / "store.db"
    events = Events()

    def readings(store: Store) -> dict[str, int]:
        return {d.device_id: d.readings for d in store.depth()}

    async def first_run() -> None:
        # Room for about five 1,000-byte envelopes: the sixth drops the oldest.
        async with Store(path, max_bytes=5_500, on_event=events) as store:
            await store.put([envelope("a", 0, 10, 1000), envelope("b", 0, 7, 1000)])
            await store.put([envelope("a", 10, 3, 1000)])
            assert readings(store) == {"a": 13, "b": 7}
            leased = await store.lease("a", 2)
            assert readings(store) == {"a": 13, "b": 7}  # leased still held
            store.ack("a", leased[0].lease_id)
            assert readings(store) == {"a": 3, "b": 7}
            store.release("a")
            assert readings(store) == {"a": 3, "b": 7}
            await store.put([envelope("b", 7, 5, 1000), envelope("b", 12, 4, 1000)])
            await store.put([envelope("b", 16, 2, 1000)])
            assert readings(store) == {"a": 3, "b": 18}
            # Over the bound: the oldest pending envelope (b's first, 7 readings) is dropped.
            await store.put([envelope("b", 18, 1, 1000)])
            assert len(events.of("envelopes-dropped")) == 1
            assert readings(store) == {"a": 3, "b": 12}

    run(first_run)

    async def second_run() -> dict[str, int]:
        async with Store(path, max_bytes=5_500) as store:
            return readings(store)

    assert run(second_run) == {"a": 3, "b": 12}  # counted again from the file at the open
