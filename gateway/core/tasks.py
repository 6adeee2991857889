"""What every room's asyncio shell shares about its tasks."""

from __future__ import annotations

import asyncio


def raise_if_cancelled(who: str) -> None:
    """Re-raise a cancellation that a library swallowed (``who`` names it in the message).

    Libraries that await with ``asyncio.wait_for`` (pymodbus; dbus-fast and bleak in places)
    lose a cancellation on Python 3.11 when their result arrives in the same loop iteration as
    the cancel: ``wait_for`` returns the result and drops the ``CancelledError``. A loop that
    then goes on would make a stop hang (seen in CI). The task still records that a cancel was
    requested, so a loop calls this after such awaits.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError(f"{who} swallowed this cancellation; raised again")
