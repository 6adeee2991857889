"""The bookkeeping both queues share, without an event loop (except for the wake-up)."""

from __future__ import annotations

import asyncio
import os

from gateway.core.readings import CODEC, Envelope, Header
from gateway.store.ledger import Entry, Ledger


def entry(id_: int, device: str, first: int, size: int = 100) -> Entry:
    header = Header(1, "k1", "b", first, 10, CODEC)
    return Entry(id_, device, header, size, 1_700_000_000_000 + id_, None)


def envelope(device: str, first: int, size: int = 100) -> Envelope:
    header = Header(1, "k1", "b", first, 10, CODEC)
    return Envelope(device, header, os.urandom(size), 1_700_000_000_000)


def seqs(entries: list[Entry]) -> list[int]:
    return [e.header.first_seq for e in entries]


def test_fifo_per_device_leases_acks_and_releases_in_order() -> None:
    ledger = Ledger()
    for i, (device, first) in enumerate([("a", 0), ("b", 0), ("a", 10), ("a", 20)], start=1):
        ledger.add(entry(i, device, first))
    assert ledger.bytes == 400
    leased = ledger.lease("a", 2)
    assert seqs(leased) == [0, 10]
    assert ledger.ack("a", leased[0].id) is leased[0]
    assert ledger.ack("a", leased[0].id) is None  # twice: nothing more leaves
    assert ledger.ack("nobody", 1) is None
    assert ledger.bytes == 300  # leased entries still count; acked ones do not
    ledger.release("a")
    assert seqs(ledger.lease("a", 10)) == [10, 20]
    depth = {d.device_id: d for d in ledger.depth()}
    assert (depth["a"].queued, depth["a"].leased, depth["a"].bytes) == (0, 2, 200)
    assert ledger.holds("a") and ledger.holds("b") and not ledger.holds("nobody")
    for item in ledger.lease("b", 1):
        ledger.ack("b", item.id)
    assert not ledger.holds("b")
    assert (depth["b"].queued, depth["b"].leased, depth["b"].oldest_ts_ms) == (
        1,
        0,
        1_700_000_000_002,
    )


def test_drop_victims_are_the_oldest_across_devices_and_never_out_on_lease() -> None:
    ledger = Ledger()
    for i, device in enumerate("ababab", start=1):
        ledger.add(entry(i, device, i * 10))
    ledger.lease("a", 1)  # id 1 is out on lease
    victims = ledger.oldest_to_drop(250)
    assert [v.id for v in victims] == [2, 3, 4]
    assert [v.id for v in ledger.oldest_to_drop(10_000)] == [2, 3, 4, 5, 6]  # all there is


def test_a_plan_by_policy_keeps_refuses_or_drops_and_names_the_ranges() -> None:
    ledger = Ledger()
    for i in range(8):
        ledger.add(entry(i + 1, "a" if i % 2 else "b", i * 10))
    incoming = [envelope("a", 80), envelope("b", 90), envelope("a", 100)]
    fits = ledger.plan(incoming, 10_000)
    assert (len(fits.keep), fits.refused, fits.victims) == (3, [], [])

    refuse = ledger.plan(incoming, 1000, "refuse-newest")
    assert [e.header.first_seq for e in refuse.keep] == [80, 90]
    assert [e.header.first_seq for e in refuse.refused] == [100]
    assert refuse.victims == []
    assert refuse.dropped("queue") == [("a", "queue full: refused newest", [(100, 10)])]

    drop = ledger.plan(incoming, 1000, "drop-oldest")
    assert len(drop.keep) == 3 and drop.refused == []
    assert [v.id for v in drop.victims] == [1]
    assert drop.dropped("store") == [("b", "store full: dropped oldest", [(0, 10)])]


def test_a_forgotten_victim_comes_back_in_its_place() -> None:
    ledger = Ledger()
    for i in range(1, 4):
        ledger.add(entry(i, "a", i * 10))
    victim = ledger.oldest_to_drop(1)[0]
    ledger.forget(victim)
    assert ledger.bytes == 200 and ledger.pending("a") == 2
    ledger.restore(victim)
    assert ledger.bytes == 300
    assert seqs(ledger.lease("a", 10)) == [10, 20, 30]


def test_wait_returns_when_something_is_pending_and_close_wakes_the_empty() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        ledger = Ledger()
        waiting = asyncio.create_task(ledger.wait("a"))
        idle = asyncio.create_task(ledger.wait("b"))
        await asyncio.sleep(0)
        assert not waiting.done() and not idle.done()
        ledger.add(entry(1, "a", 0))
        got = await waiting
        ledger.close()
        return got, await idle, await ledger.wait("a")  # closed, but "a" still has one

    assert asyncio.run(scenario()) == (True, False, True)
