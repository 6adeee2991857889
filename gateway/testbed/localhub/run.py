"""``fieldgate localhub``: the broker and the hub-side consumer until Ctrl-C."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway import runtime
from gateway.identity.pki import Pki
from gateway.testbed.localhub.broker import Broker
from gateway.testbed.localhub.control import TwinHolder
from gateway.testbed.localhub.service import HubService


async def serve(
    pki: Pki,
    *,
    host: str,
    port: int,
    record: Path | None,
    quiet: bool,
    stop: asyncio.Event,
    log_path: Path | None = None,
    persist: Path | None = None,
    twins: Path | None = None,
) -> None:
    async with Broker(pki, host=host, port=port, log_path=log_path, persist=persist):
        service = HubService(pki, host=host, port=port, record=record)
        holder = TwinHolder(pki, host=host, port=port, path=twins_file(twins, record, persist))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(service.run(stop), name="hub-service")
                tg.create_task(holder.run(stop), name="hub-twins")
                # Ready once the twins are answered: a device's first twin GET must not be lost.
                await _first_of(holder.connected, stop)
                print(
                    f"local hub listening on {host}:{port} (TLS, client certificates required)",
                    flush=True,
                )
                if not quiet:
                    tg.create_task(_report(service, stop), name="hub-report")
        finally:
            service.close()


def twins_file(twins: Path | None, record: Path | None, persist: Path | None) -> Path | None:
    """Where the twins are kept: as asked, else in the persist folder, else next to the
    record; with none of them, in memory only (gone at the stand-in's stop)."""
    if twins is not None:
        return twins
    if persist is not None:
        persist.mkdir(parents=True, exist_ok=True)
        return persist / "twins.json"
    return record.with_name(record.stem + ".twins.json") if record is not None else None


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def _report(service: HubService, stop: asyncio.Event) -> None:
    last = 0
    while not stop.is_set():
        try:
            async with asyncio.timeout(5):
                await stop.wait()
        except TimeoutError:
            pass
        total = sum(v.readings for v in service.devices.values())
        print(
            f"{time.strftime('%H:%M:%S')} {len(service.devices)} devices, "
            f"{total} readings (+{total - last}), duplicates {service.tracker.duplicates}, "
            f"refused {len(service.refused)}, conflicts {len(service.tracker.conflicts)}",
            flush=True,
        )
        last = total


def run_localhub(
    pki_dir: Path,
    *,
    host: str,
    port: int,
    record: Path | None,
    quiet: bool,
    broker_log: Path | None = None,
    persist: Path | None = None,
    twins: Path | None = None,
) -> int:
    pki = Pki(pki_dir)

    async def main(stop: asyncio.Event) -> None:
        await serve(
            pki,
            host=host,
            port=port,
            record=record,
            quiet=quiet,
            stop=stop,
            log_path=broker_log,
            persist=persist,
            twins=twins,
        )

    runtime.run(main)
    return 0
