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


def test_a_poller_that_swallows_its_cancel_is_cancelled_again_and_ends() -> None:
    from gateway.core.tasks import stops_firmly

    async def go() -> tuple[float, bool]:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        async def poller() -> None:
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # swallowed, as a library's wait_for may
            await asyncio.Event().wait()  # a clean-up waiting for a reply that never comes

        task = asyncio.create_task(stops_firmly(poller(), "ble[hci0]"))
        await started.wait()
        t0 = loop.time()
        task.cancel("stop")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        inner = [t for t in asyncio.all_tasks() if t.get_name() == "ble[hci0].inner"]
        return loop.time() - t0, not inner

    took, ended = asyncio.run(go())
    assert took < 2.0 and ended


def test_a_task_that_never_ends_is_left_behind_after_the_grace_saying_where_it_waits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.core import tasks

    monkeypatch.setattr(tasks, "STOP_GRACE", 1.5)

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    async def go() -> float:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(tasks.stops_firmly(stubborn(), "poll[plc-1]"))
        await asyncio.sleep(0.05)
        t0 = loop.time()
        task.cancel("stop")
        with pytest.raises(asyncio.CancelledError):
            await task
        took = loop.time() - t0
        for t in asyncio.all_tasks():  # let the test's loop end
            if t.get_name() == "poll[plc-1].inner":
                t.get_coro().close()  # type: ignore[union-attr]
        return took

    with caplog.at_level("WARNING", logger="fieldgate.tasks"):
        took = asyncio.run(go())
    assert 1.4 < took < 3.0
    assert "poll[plc-1] did not end within 2 s of the stop; left behind" in caplog.text
    assert "in stubborn" in caplog.text
