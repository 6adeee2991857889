"""A stop that a library swallowed is not lost in the BLE link's pauses.

bleak and dbus-fast await with ``wait_for`` in places; on Python 3.11 a result that arrives in
the same loop iteration as the cancel wins and the ``CancelledError`` is dropped, though the
task still counts the cancel request. The link's loop then judges the session (a wrong challenge
answer: quarantine) and pauses before the next attempt; that pause must end the task at once,
not wait out the hold-off (what made a demo hang for 15 s in CI)."""

from __future__ import annotations

import asyncio

import pytest

from adapters.ble.link import _pause


def test_a_pause_after_a_swallowed_cancellation_ends_the_task_at_once() -> None:
    async def go() -> float:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        async def link_loop() -> None:
            started.set()
            try:
                await asyncio.sleep(10)  # the session's D-Bus call
            except asyncio.CancelledError:
                pass  # what the library's wait_for does when the reply came in the same turn
            await _pause(300)  # the quarantine's hold-off

        task = asyncio.create_task(link_loop())
        await started.wait()
        t0 = loop.time()
        task.cancel("stop")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        return loop.time() - t0

    assert asyncio.run(go()) < 1.0
