"""Pure: what a link reads next, over all the units (devices) on it.

One link (a TCP connection, a serial bus) carries one request at a time, so its units share
one timeline. :class:`Schedule` keeps, per unit, the next due time of each of its read blocks
(drift-free: a block is due every period from its first due time; a read that overruns skips
the missed ticks instead of bursting) and whether the unit is backed off.

A unit that does not answer (a timeout) costs the others its timeout once: it is backed off at
once, and probed after a delay that doubles with each probe that fails, up to a cap. Until it
answers, its blocks are not read; the other units keep their rate. Its first answer ends the
backoff, and its blocks are due at once.

No clock and no I/O here: every method takes ``now``; the link's shell
(:mod:`adapters.modbus.link`) awaits the time :meth:`Schedule.next` names and does the read.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Due:
    """The next read: ``unit``'s block ``index`` at time ``at``; ``probe``: the unit is backed
    off and this read asks whether it answers again."""

    unit: Hashable
    index: int
    at: float
    probe: bool = False


@dataclass(slots=True)
class _Unit:
    due: list[float] = field(default_factory=list)
    failures: int = 0  # probes in a row that went unanswered
    probe_at: float | None = None  # backed off until then; None: polled at its rate
    last: int = 0  # when it was last read, in reads of the link (ties go to the longest wait)


def probe_delay(failures: int, first: float, cap: float) -> float:
    """How long a unit that failed ``failures`` times in a row waits for its next probe."""
    return float(min(cap, first * 2 ** min(max(failures - 1, 0), 30)))


class Schedule:
    """The due times of every unit's blocks on one link. ``first`` and ``cap``: a backed-off
    unit's first probe delay and the longest one."""

    def __init__(self, *, first: float = 0.5, cap: float = 30.0) -> None:
        self._first, self._cap = first, cap
        self._units: dict[Hashable, _Unit] = {}
        self._reads = 0  # reads of the link so far

    def add(self, unit: Hashable, blocks: int, start: float) -> None:
        """A unit with ``blocks`` read blocks, all first due at ``start``."""
        self._units[unit] = _Unit([start] * blocks)

    def remove(self, unit: Hashable) -> None:
        self._units.pop(unit, None)

    def __contains__(self, unit: Hashable) -> bool:
        return unit in self._units

    def blocks(self, unit: Hashable) -> int:
        return len(self._units[unit].due)

    def due(self, unit: Hashable, index: int) -> float:
        return self._units[unit].due[index]

    def next(self, now: float | None = None) -> Due | None:
        """The next read; None when no unit has a block to read.

        The earliest due read of any unit, except on a link that is behind (at ``now``, more
        than one unit is overdue): then the overdue unit read longest ago goes first, so that
        the units of a saturated link take turns rather than the ones whose ticks fall first
        winning every round. Ties go to the unit added first."""
        best: tuple[Hashable, _Unit] | None = None
        best_at = 0.0
        for key, unit in self._units.items():
            if not unit.due and unit.probe_at is None:
                continue  # nothing to read (every point set aside), nothing to probe
            at = unit.probe_at if unit.probe_at is not None else min(unit.due)
            if best is None:
                best, best_at = (key, unit), at
                continue
            overdue = now is not None and at <= now and best_at <= now
            if (unit.last < best[1].last) if overdue else (at < best_at):
                best, best_at = (key, unit), at
        if best is None:
            return None
        key, unit = best
        # The earliest block (the first of equals); a probe reads the one most overdue (or,
        # with every block set aside, the kept plan's first, which the link restores).
        index = unit.due.index(min(unit.due)) if unit.due else 0
        return Due(key, index, best_at, unit.probe_at is not None)

    def advance(self, unit: Hashable, index: int, period: float, now: float) -> bool:
        """Block ``index`` of ``unit`` was read at ``now``: its next due time, one period on
        (past ticks skipped). Returns True when the read overran its period."""
        state = self._units[unit]
        self._reads += 1
        state.last = self._reads
        due = state.due
        next_due = due[index] + period
        overrun = next_due < now
        if overrun:
            next_due = now + period - (now - due[index]) % period
        due[index] = next_due
        return overrun

    def replace(self, unit: Hashable, index: int, count: int, now: float) -> None:
        """Block ``index`` became ``count`` blocks (a refused read split), all due ``now``."""
        self._units[unit].due[index : index + 1] = [now] * count

    def reset(self, unit: Hashable, blocks: int, now: float) -> None:
        """A new plan for ``unit``: ``blocks`` blocks, all due ``now``."""
        self._units[unit].due = [now] * blocks

    def backed_off(self, unit: Hashable) -> bool:
        return self._units[unit].probe_at is not None

    def polled(self) -> list[Hashable]:
        """The units read at their rate (not backed off)."""
        return [key for key, unit in self._units.items() if unit.probe_at is None]

    def failed(self, unit: Hashable, now: float) -> float:
        """``unit`` did not answer (at ``now``): backed off; returns the delay to its probe."""
        state = self._units[unit]
        state.failures += 1
        delay = probe_delay(state.failures, self._first, self._cap)
        state.probe_at = now + delay
        return delay

    def answered(self, unit: Hashable, now: float) -> bool:
        """``unit`` answered: polled at its rate again. Returns True if it was backed off (its
        blocks are then due ``now``: nothing of the backoff is made up in a burst)."""
        state = self._units[unit]
        state.failures = 0
        if state.probe_at is None:
            return False
        state.probe_at = None
        state.due = [now] * len(state.due)
        return True
