"""What every room's asyncio shell shares about its tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("fieldgate.tasks")

# How long a stopping task is cancelled again and again before it is left behind.
STOP_GRACE = 10.0


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


async def stops_firmly(coro: Coroutine[Any, Any, Any], name: str) -> Any:
    """Run ``coro`` as a task of its own; when this is cancelled (a stop), cancel it again every
    second until it ends, for at most STOP_GRACE seconds, then leave it behind with a warning
    that says where it waits.

    A library that swallows one cancellation (``wait_for`` on Python 3.11), or awaits in its
    own clean-up for a reply that never comes (a D-Bus call to a radio that went away), would
    otherwise hold the whole stop: seen in CI as a gateway that did not stop in 20 s while a
    BLE link was in the middle of a session. Another cancel ends such a wait. An exception of
    ``coro`` propagates as it is.
    """
    inner = asyncio.get_running_loop().create_task(coro, name=f"{name}.inner")
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE
        while not inner.done() and loop.time() < deadline:
            inner.cancel(f"stop: {name} ends")
            await asyncio.wait([inner], timeout=1.0)
        if not inner.done():
            log.warning(
                "%s did not end within %.0f s of the stop; left behind:\n%s",
                name,
                STOP_GRACE,
                "\n".join(await_chain(inner)),
            )
        elif not inner.cancelled() and inner.exception() is not None:
            log.warning("%s failed while stopping: %r", name, inner.exception())
        raise


def await_chain(task: asyncio.Task[Any]) -> list[str]:
    """``file:line in function`` for each coroutine (or generator) the task waits in, outermost
    first, then what the innermost one waits on."""
    out = [f"  {task!r}"[:300]]
    awaiting: Any = task.get_coro()
    for _ in range(64):
        frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            out.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
        nxt = getattr(awaiting, "cr_await", None)
        if nxt is None:
            nxt = getattr(awaiting, "gi_yieldfrom", None)
        if nxt is None:
            break
        awaiting = nxt
    else:
        return out
    if awaiting is not None and frame is None:
        out.append(f"  waiting on {awaiting!r}"[:300])
    return out
