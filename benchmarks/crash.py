"""kill -9 the gateway again and again under load; count what was lost and what came twice.

Starts the hub stand-in and simulated devices, then runs ``fieldgate run`` and kills it with
SIGKILL at a random moment, ``--kills`` times, then lets a last run stop cleanly. Every sequence
number the store accepted (its committed next_seq per device) must arrive at the hub. Prints
JSON: kills, accepted readings, unique readings delivered, lost (accepted but never delivered:
must be 0), duplicates (delivered more than once, which at-least-once allows).

    python benchmarks/crash.py --kills 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from e2e import fieldgate, hub_argv, stop, wait_for

from adapters.modbus.sim.run import simulator_argv
from gateway.consumer import SequenceTracker, open_all, read_record
from gateway.identity import pki as pki_mod
from gateway.identity.keyring import load as load_keyring
from gateway.store import status
from gateway.testbed.ports import free_ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--min-alive", type=float, default=0.5)
    parser.add_argument("--max-alive", type=float, default=2.5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fieldgate-crash-"))
    pki_dir = work / "pki"
    pki_mod.init(pki_dir)
    record, config, state = work / "record.jsonl", work / "gateway.toml", work / "state"
    helpers: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(work / f"{name}.log", "ab")
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    try:
        hub_port = free_ports(1)
        helpers.append(start("hub", fieldgate(*hub_argv(pki_dir, hub_port, record))))
        wait_for(work / "hub.log", "local hub listening")
        helpers.append(
            start(
                "sim",
                fieldgate(
                    *simulator_argv(
                        devices=args.devices,
                        port=free_ports(args.devices),
                        config=config,
                        pki=pki_dir,
                        hub_port=hub_port,
                        state_dir=state,
                        extra=("--period", "0.1", "--max-age", "0.3"),
                    )
                ),
            )
        )
        wait_for(work / "sim.log", "simulated Modbus devices on")
        for _ in range(args.kills):
            gateway = start("gateway", fieldgate("run", "--config", str(config)))
            time.sleep(rng.uniform(args.min_alive, args.max_alive))
            os.kill(gateway.pid, signal.SIGKILL)
            gateway.wait()
        final = start("gateway", fieldgate("run", "--config", str(config)))
        time.sleep(3)
        final_code = stop(final)
        promised = {
            d: row.get("next_seq", 0) for d, row in status(state / "store.db")["devices"].items()
        }
        p = pki_mod.Pki(pki_dir)
        ring = load_keyring(p.keyring, p.passphrase())
        deadline = time.monotonic() + 30
        while True:
            tracker = SequenceTracker()
            _, errors = open_all(read_record(record), ring, tracker)
            got = {d: s.count() for (d, _), s in tracker.streams.items()}
            if got == promised or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for proc in reversed(helpers):
            stop(proc)
    lost = sum(promised.values()) - sum(min(promised.get(d, 0), n) for d, n in got.items())
    print(
        json.dumps(
            {
                "kills": args.kills,
                "devices": args.devices,
                "accepted_readings": sum(promised.values()),
                "unique_readings_delivered": sum(got.values()),
                "lost": lost,
                "gaps": sum(len(g) for g in tracker.gaps().values()),
                "duplicates": tracker.duplicates,
                "duplicates_per_kill": round(tracker.duplicates / args.kills, 1),
                "refused_envelopes": len(errors),
                "final_exit_code": final_code,
                "boot_ids": len({b for _, b in tracker.streams}),
            },
            indent=2,
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
