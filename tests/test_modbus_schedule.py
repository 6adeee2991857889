"""The link schedule (pure, no loop): what is read next over the units of one link, and how a
unit that does not answer is backed off while the others keep their rate."""

from __future__ import annotations

from collections import Counter

from adapters.modbus.schedule import Schedule, probe_delay


def _simulate(
    schedule: Schedule, periods: dict[str, float], dead: set[str], until: float, timeout: float
) -> tuple[Counter[str], float]:
    """Run the schedule as a link would, with reads costing ``cost`` and timeouts ``timeout``:
    returns the reads per unit, and the longest any live unit's read waited past its due time."""
    now, reads, late = 0.0, Counter[str](), 0.0
    cost = 0.005
    while now < until:
        due = schedule.next()
        assert due is not None
        now = max(now, due.at)
        unit = str(due.unit)
        reads[unit] += 1
        if unit in dead:
            now += timeout
            schedule.failed(unit, now)
            continue
        if not due.probe:
            late = max(late, now - due.at)
        now += cost
        schedule.answered(unit, now)
        schedule.advance(unit, due.index, periods[unit], now)
    return reads, late


def test_a_dead_unit_costs_its_timeout_once_then_is_probed_rarely() -> None:
    schedule = Schedule(first=0.5, cap=8.0)
    periods = {f"u{i}": 0.1 for i in range(8)}
    for unit in periods:
        schedule.add(unit, 1, 0.0)
    reads, late = _simulate(schedule, periods, {"u7"}, until=30.0, timeout=0.2)
    for unit in list(periods)[:7]:
        assert 290 <= reads[unit] <= 301, reads  # the rate, 10/s, kept
    # Probes at 0.5, 1, 2, 4, 8, 8, 8 s after each failure: a handful, not one per period.
    assert 4 <= reads["u7"] <= 8, reads
    # Each timeout delays the others by at most the timeout (plus the reads queued meanwhile).
    assert late <= 0.2 + 8 * 0.005 + 1e-9


def test_probe_delay_doubles_up_to_its_cap() -> None:
    assert [probe_delay(n, 0.5, 5.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_unit_that_answers_again_is_read_at_once_and_at_its_rate() -> None:
    schedule = Schedule(first=1.0, cap=4.0)
    schedule.add("a", 2, 0.0)
    schedule.add("b", 1, 0.0)
    assert schedule.failed("a", 0.0) == 1.0
    assert schedule.backed_off("a") and schedule.polled() == ["b"]
    due = schedule.next()
    assert due is not None and due.unit == "b" and not due.probe
    schedule.advance("b", 0, 10.0, 0.01)
    probe = schedule.next()
    assert probe is not None and probe.unit == "a" and probe.probe and probe.at == 1.0
    assert schedule.failed("a", 1.2) == 2.0  # still dead: the next probe waits longer
    assert schedule.answered("a", 3.5) is True
    assert not schedule.backed_off("a")
    # Both blocks due at once (not the backlog of periods it missed).
    assert [schedule.due("a", i) for i in range(2)] == [3.5, 3.5]
    assert schedule.failed("a", 4.0) == 1.0  # its failures were forgotten when it answered


def test_reads_are_drift_free_and_an_overrun_skips_missed_ticks() -> None:
    schedule = Schedule()
    schedule.add("a", 1, 0.0)
    assert schedule.advance("a", 0, 1.0, 0.3) is False and schedule.due("a", 0) == 1.0
    assert schedule.advance("a", 0, 1.0, 3.5) is True
    assert schedule.due("a", 0) == 4.0  # ticks 2 and 3 skipped, the phase kept


def test_equal_periods_take_turns_and_splits_are_due_at_once() -> None:
    schedule = Schedule()
    for unit in "abc":
        schedule.add(unit, 1, 0.0)
    order = []
    for _ in range(6):
        due = schedule.next()
        assert due is not None
        order.append(due.unit)
        schedule.advance(due.unit, due.index, 1.0, 0.0)
    assert order == list("abcabc")
    schedule.replace("b", 0, 3, 1.5)
    assert schedule.blocks("b") == 3
    due = schedule.next()
    assert due is not None and (due.unit, due.at) == ("b", 1.5)


def test_a_unit_without_blocks_is_never_due() -> None:
    schedule = Schedule()
    schedule.add("a", 0, 0.0)
    assert schedule.next() is None
    schedule.add("b", 1, 5.0)
    due = schedule.next()
    assert due is not None and due.unit == "b"
    schedule.remove("b")
    assert "b" not in schedule and schedule.next() is None


def test_a_saturated_link_serves_its_units_in_turn() -> None:
    """8 units asking for more than the link carries (every 10 ms, a read costs 4 ms): each is
    overdue on the same ticks, and each gets an equal share instead of the first ones winning
    every tie (seen on the RTU benchmark at 115,200 baud before: 263 reads for unit 1, 209 for
    unit 8)."""
    schedule = Schedule()
    for i in range(8):
        schedule.add(f"u{i}", 1, 0.0)
    now, reads = 0.0, Counter[str]()
    while now < 10.0:
        due = schedule.next(now)
        assert due is not None
        now = max(now, due.at) + 0.004
        reads[str(due.unit)] += 1
        schedule.advance(due.unit, due.index, 0.010, now)
    assert max(reads.values()) - min(reads.values()) <= 1, reads
