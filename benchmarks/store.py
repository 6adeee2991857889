"""The durable store's costs: commits with and without grouping, and the drain after an outage.

Prints JSON. Envelopes are ~3 KB sealed bodies of 500 readings (the e2e profile's size), put
into a real store file (WAL, synchronous=FULL) on this machine's disk.

- ``commit``: envelopes/s and points/s when every envelope is its own commit, and when the
  writer hands over groups (what the gateway does: one commit per writer wake-up);
- ``drain``: a backlog of N envelopes over D devices leased, "published" and acked as fast as
  the store allows (the store's share of a drain; the network's is in e2e.py).

    python benchmarks/store.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from gateway.core.readings import CODEC, Envelope, Header
from gateway.store import Store

READINGS_PER_ENVELOPE = 500
BODY_BYTES = 3000


def envelopes(device: str, start: int, count: int) -> list[Envelope]:
    return [
        Envelope(
            device,
            Header(1, "k1", "b", (start + i) * READINGS_PER_ENVELOPE, READINGS_PER_ENVELOPE, CODEC),
            os.urandom(BODY_BYTES),
            0,
        )
        for i in range(count)
    ]


async def commit_rate(folder: Path, total: int, group: int) -> dict[str, float]:
    path = folder / f"commit-{group}.db"
    batch = envelopes("dev", 0, total)
    async with Store(path, max_bytes=1 << 40) as store:
        start = time.perf_counter()
        for i in range(0, total, group):
            await store.put(batch[i : i + group])
        seconds = time.perf_counter() - start
        commits = store.commits
    return {
        "group": group,
        "envelopes_per_s": round(total / seconds),
        "points_per_s": round(total * READINGS_PER_ENVELOPE / seconds),
        "commits": commits,
        "ms_per_commit": round(seconds / commits * 1000, 2),
    }


async def drain_rate(folder: Path, total: int, devices: int) -> dict[str, float]:
    path = folder / "drain.db"
    async with Store(path, max_bytes=1 << 40) as store:
        for d in range(devices):
            await store.put(envelopes(f"dev-{d}", 0, total // devices))
    # A restart with the backlog on disk, as after an outage that outlasted the gateway.
    async with Store(path, max_bytes=1 << 40, cache_bytes=0) as store:
        start = time.perf_counter()

        async def drain(device: str) -> int:
            done = 0
            while done < total // devices:
                for item in await store.lease(device, 16):
                    store.ack(device, item.lease_id)
                    done += 1
            return done

        counts = await asyncio.gather(*(drain(f"dev-{d}") for d in range(devices)))
        seconds = time.perf_counter() - start
    return {
        "envelopes": sum(counts),
        "devices": devices,
        "envelopes_per_s": round(sum(counts) / seconds),
        "points_per_s": round(sum(counts) * READINGS_PER_ENVELOPE / seconds),
    }


async def main(args: argparse.Namespace) -> dict[str, object]:
    folder = Path(tempfile.mkdtemp(prefix="fieldgate-store-bench-", dir=args.dir))
    try:
        single = await commit_rate(folder, args.single, 1)
        grouped = [await commit_rate(folder, args.grouped, g) for g in (10, 100)]
        drain = await drain_rate(folder, args.drain, 10)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "disk_folder": str(folder.parent),
        "envelope": {"body_bytes": BODY_BYTES, "readings": READINGS_PER_ENVELOPE},
        "commit_one_per_envelope": single,
        "commit_grouped": grouped,
        "grouping_speedup": round(grouped[-1]["envelopes_per_s"] / single["envelopes_per_s"], 1),
        "drain_from_disk": drain,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=1000)
    parser.add_argument("--grouped", type=int, default=20000)
    parser.add_argument("--drain", type=int, default=20000)
    parser.add_argument("--dir", default=None, help="where the store files go (default: /tmp)")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
