"""A gateway that fails while starting leaves nothing held behind it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config import load
from gateway.store import StoreError
from gateway.testbed.ports import free_ports

from conftest import edit_config, start_simulator


def test_a_start_that_fails_after_the_lock_releases_it_and_closes_its_files(
    tmp_path: Path, pki_dir: Path, procs: list[object]
) -> None:
    config, _ = start_simulator(procs, tmp_path, pki_dir, free_ports(1), 1)  # type: ignore[arg-type]
    blocker = tmp_path / "not-a-store"
    blocker.mkdir()  # a store path that SQLite cannot open: the start fails after the lock
    edit_config(config, store={"path": str(blocker)})
    cfg = load(config)

    async def attempt() -> None:
        await Gateway(cfg).run(asyncio.Event())

    for _ in range(2):
        # Both fail on the store, the second not on "state dir is in use" by this very process.
        with pytest.raises((StoreError, OSError)) as failed:
            asyncio.run(attempt())
        assert "in use" not in str(failed.value)
