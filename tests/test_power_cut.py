"""No acknowledged envelope is lost to a power cut; and the test can tell when one would be."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import apsw
import powercut
import pytest

TRIALS = 12


def one_cut(tmp: Path, synchronous: str, rng: random.Random) -> tuple[int, int]:
    """Write until a random moment, cut the power, reopen: (acknowledged, lost of those)."""
    db, journal = tmp / "store.db", tmp / "journal"
    for leftover in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), journal):
        leftover.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, powercut.__file__, str(db), str(journal), synchronous],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acked: list[int] = []
    stop_after = rng.randint(20, 400)
    while len(acked) < stop_after:
        line = child.stdout.readline()
        if not line:
            break
        acked.append(int(line.split()[1]))
    time.sleep(rng.uniform(0, 0.01))  # cut in the middle of whatever comes next
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # Acks the child printed before it died count too: they were promised.
    acked += [int(line.split()[1]) for line in child.stdout.read().splitlines() if line]
    child.stdout.close()
    powercut.cut(journal)
    Path(f"{db}-shm").unlink(missing_ok=True)
    conn = apsw.Connection(str(db))
    try:
        present = {row[0] // 10 for row in conn.execute("SELECT first_seq FROM envelopes")}
    except apsw.SQLError:  # the cut took even the table's creation: nothing survived
        present = set()
    finally:
        conn.close()
    return len(acked), len(set(acked) - present)


@pytest.mark.slow
def test_synchronous_full_loses_no_acknowledged_envelope(tmp_path: Path) -> None:
    rng = random.Random(11)
    results = [one_cut(tmp_path, "FULL", rng) for _ in range(TRIALS)]
    assert sum(acked for acked, _ in results) > TRIALS * 20
    assert [lost for _, lost in results] == [0] * TRIALS


@pytest.mark.slow
def test_the_same_cut_catches_synchronous_normal_losing_acknowledged_envelopes(
    tmp_path: Path,
) -> None:
    rng = random.Random(11)
    results = [one_cut(tmp_path, "NORMAL", rng) for _ in range(TRIALS)]
    # WAL with synchronous=NORMAL does not fsync at commit: acknowledged rows vanish.
    assert sum(lost for _, lost in results) > 0, results
