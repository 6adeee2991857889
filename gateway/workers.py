"""Several gateway processes over disjoint device sets: one event loop (one core) each.

``fieldgate run --workers W`` starts W children, ``fieldgate run --worker I/W`` each. Worker I
takes Modbus devices I, I+W, I+2W, ... of the config (a shared link's devices: links I, I+W,
...) and the BLE devices of every W-th adapter
(one process per radio), and has its own state folder
(``state_dir/worker-I``): its own store, security events and sessions. The parent forwards
SIGTERM/SIGINT, so every worker flushes, and SIGHUP, so every worker reloads its share of the
file (:class:`Hangups`); it restarts a worker that dies unexpectedly, with backoff. A worker
that exits 2 (refused config) stops them all: restarting cannot help.

A run whose layout differs from the last one (single after workers, workers after single, another
worker count) would find envelopes in store files no process drains. So before anything starts,
:func:`adopt_stranded` moves each such envelope, unchanged, into the store of the process that
now owns its device (the parent of ``--workers`` does it for all workers).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gateway import runtime
from gateway.config import Config
from gateway.core.backoff import backoff_delay
from gateway.core.errors import EXIT_REFUSED
from gateway.store import paths

log = logging.getLogger("fieldgate.workers")


def worker_config(cfg: Config, index: int, count: int) -> Config:
    """The share of ``cfg`` that worker ``index`` of ``count`` runs."""
    if not 0 <= index < count:
        raise ValueError(f"worker {index}/{count} does not exist")
    # Devices with their own host: every W-th; devices on a [[links]] entry go with their link
    # (one task per link, one connection), every W-th link.
    own = [d for d in cfg.devices if d.modbus is not None and d.modbus.link is None]
    links = {k.name for k in cfg.links[index::count]}
    modbus = own[index::count] + [
        d for d in cfg.devices if d.modbus is not None and d.modbus.link in links
    ]
    # A radio serves one process: discovery, pairing and connection slots are the adapter's.
    adapters = sorted({d.ble.adapter for d in cfg.devices if d.ble is not None})
    mine = set(adapters[index::count])
    ble = [d for d in cfg.devices if d.ble is not None and d.ble.adapter in mine]
    return cfg.model_copy(
        update={
            "devices": modbus + ble,
            # Each worker keeps its own audit chain (its own state folder). One identity cannot
            # hold W connections to IoT Hub (each new one closes the last), so the workers'
            # chains stay local, signed: `fieldgate audit verify` checks each worker's audit.db.
            "gateway": cfg.gateway.model_copy(
                update={
                    "state_dir": paths.worker_state_dir(cfg, index),
                    "id": f"{cfg.gateway.id}.w{index}",
                }
            ),
            "audit": cfg.audit.model_copy(update={"stream": False}),
            # One [metrics] address cannot serve several processes: workers serve none.
            "metrics": None,
            "store": cfg.store.model_copy(update={"path": paths.worker_store_setting(cfg, index)}),
        }
    )


def adopt_stranded(cfg: Config, count: int) -> None:
    """Move envelopes left in store files of another layout to the store that now owns them.

    ``count``: 1 for a single process, else the number of workers. The caller holds the main
    state folder's lock; every worker folder involved is locked while envelopes move.
    """
    from gateway import store
    from gateway.statelock import lock_state, release_all

    if cfg.store.kind == "memory":
        return
    shares = {i: worker_config(cfg, i, count) for i in range(count)} if count > 1 else {}
    owner: dict[str, Path] = {}
    if shares:
        for i, share in shares.items():
            owner.update({d.id: paths.worker_store_path(cfg, i) for d in share.devices})
    else:
        owner = {d.id: paths.store_path(cfg) for d in cfg.devices}
    others = sorted(paths.worker_indices(cfg) | set(shares))
    files = [paths.store_path(cfg), *(paths.worker_store_path(cfg, i) for i in others)]
    locks = []
    try:
        for i in others:
            locks += lock_state(paths.worker_state_dir(cfg, i), paths.worker_store_setting(cfg, i))
        for source in files:
            try:
                held = store.waiting(source)
            except store.StoreError as err:
                log.warning("cannot look for stranded envelopes in %s: %s", source, err)
                continue
            moves: dict[Path, list[str]] = {}
            for device in sorted(held):
                target = owner.get(device)
                if target is None:
                    log.warning(
                        "%s: %d envelopes of %s, a device no longer configured, stay there",
                        source,
                        held[device],
                        device,
                    )
                elif target != source:
                    moves.setdefault(target, []).append(device)
            for target, devices in moves.items():
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                try:
                    moved = store.move_envelopes(source, target, devices)
                except store.StoreError as err:  # e.g. a full disk: they stay, nothing lost
                    log.error("stranded envelopes stay in %s until the next start: %s", source, err)
                    continue
                log.warning(
                    "moved %d envelopes of %d devices from %s (an earlier layout) to %s",
                    moved,
                    len(devices),
                    source,
                    target,
                )
    finally:
        release_all(locks)


def parse_worker(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    return int(index), int(count)


# How long the parent waits for every worker's outcome of a forwarded SIGHUP.
RELOAD_TIMEOUT = 120.0


class Hangups:
    """SIGHUP in the parent of ``--workers``: forwarded to every worker, each reloads its share
    of the file (:func:`worker_config`) and writes its outcome in its own state folder; the
    parent writes them together to the main state folder's ``config-status.json``, where
    ``fieldgate reload`` reads it (applied when every worker applied; else the first that did
    not, named)."""

    def __init__(self, cfg: Config, count: int) -> None:
        self.cfg = cfg
        self.count = count
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> None:
        task = asyncio.get_running_loop().create_task(self._forward(), name="reload-workers")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self) -> None:
        from gateway.config import sources

        asked = time.time()
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGHUP)
        folders = [paths.worker_state_dir(self.cfg, i) for i in range(self.count)]
        found: dict[int, dict[str, Any]] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELOAD_TIMEOUT
        while len(found) < self.count and loop.time() < deadline:
            for i, folder in enumerate(folders):
                status = sources.read_status(folder)
                if i not in found and status is not None and float(status["at"]) >= asked:
                    found[i] = status
            # Other processes' files: nothing to wait on but the files themselves.
            await asyncio.sleep(0.1)
        bad = [
            (i, found.get(i))
            for i in range(self.count)
            if (found.get(i) or {}).get("status") != "applied"
        ]
        first = next(iter(found.values()), {})
        if not bad:
            outcome = sources.Outcome("applied", "SIGHUP", str(first.get("hash")))
        else:
            i, status = bad[0]
            if status is None:
                outcome = sources.Outcome(
                    "rolled-back",
                    "SIGHUP",
                    None,
                    f"worker {i}: no outcome within {RELOAD_TIMEOUT:.0f} s",
                )
            else:
                outcome = sources.Outcome(
                    status["status"],
                    "SIGHUP",
                    str(status.get("hash")),
                    f"worker {i}/{self.count}: {status.get('error')}",
                    status.get("field"),
                )
        try:
            sources.write_status(self.cfg.gateway.state_dir, outcome)
        except OSError as err:
            log.error("cannot write %s: %s", sources.STATUS_FILE, err)
        log.info("reload of %d workers: %s", self.count, outcome.status)


async def supervise(
    config: Path, count: int, stop: asyncio.Event, hangups: Hangups | None = None
) -> int:
    """Run ``count`` workers until ``stop``; returns the exit code for the parent."""
    refused = asyncio.Event()

    async def keep(index: int) -> int:
        attempt = 0
        while True:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.cli",
                "run",
                "--config",
                str(config),
                "--worker",
                f"{index}/{count}",
                stdin=asyncio.subprocess.DEVNULL,
                **runtime.child_process_options(),
            )
            log.info("worker %d/%d started as pid %d", index, count, proc.pid)
            if hangups is not None:
                hangups.procs[index] = proc
            waiter = asyncio.ensure_future(proc.wait())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if stop.is_set():
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                return await waiter
            code = waiter.result()
            if code == EXIT_REFUSED:
                log.error("worker %d exited 2 (refused): stopping all workers", index)
                refused.set()
                stop.set()
                return code
            attempt += 1
            delay = backoff_delay(attempt, 0.5, 30.0)
            log.error("worker %d exited with %s; restarting in %.1f s", index, code, delay)
            try:
                async with asyncio.timeout(delay):
                    await stop.wait()
                return code
            except TimeoutError:
                continue

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(keep(i), name=f"worker[{i}]") for i in range(count)]
    codes = [t.result() for t in tasks]
    if refused.is_set():
        return EXIT_REFUSED
    return 0 if all(c == 0 for c in codes) else 1


def run_workers(config: Path, count: int, cfg: Config | None = None) -> int:
    """Run ``count`` workers; the parent holds the main state folder's lock meanwhile."""
    from gateway.core.errors import StartupError
    from gateway.statelock import StateInUse, lock_state, release_all

    hangups = Hangups(cfg, count) if cfg is not None else None

    async def main(stop: asyncio.Event) -> int:
        return await supervise(config, count, stop, hangups)

    locks = []
    if cfg is not None:
        store_path = cfg.store.path if cfg.store.kind != "memory" else None
        try:
            locks = lock_state(cfg.gateway.state_dir, store_path)
            adopt_stranded(cfg, count)
        except StateInUse as err:
            release_all(locks)
            raise StartupError(str(err)) from None
    try:
        return int(runtime.run(main, on_hangup=hangups))
    finally:
        release_all(locks)
