"""The one place the event loop is chosen, and signals become a stop trigger."""

from __future__ import annotations

import asyncio
import faulthandler
import io
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.core.tasks import await_chain

log = logging.getLogger("fieldgate.runtime")

Main = Callable[[asyncio.Event], Coroutine[Any, Any, Any]]

# SIGHUP (a closed terminal, or an operator used to daemons) stops as gracefully as SIGTERM for
# every verb that does not reload on it: its default action would kill the process without a
# flush and leave its helpers (the hub stand-in's broker, the demo's simulators) running.
# ``fieldgate run`` passes ``on_hangup``: there SIGHUP reloads the config.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Hangup = Callable[[], None]


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def raise_open_file_limit() -> None:
    """Two sockets per device (its link and its hub session): lift the soft descriptor limit
    (often 1,024) to the hard one, which a thousand devices need."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def enable_crash_tracebacks() -> None:
    """A native crash (SIGSEGV, SIGABRT, ...) of a library under the loop prints every
    thread's Python stack to stderr before the process dies, instead of nothing (a BLE stop
    once ended in SIGABRT with no word). Left as it is where something already enabled it."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable()
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # stderr is not a real file here: nothing to write to


def run(main: Main, *, on_hangup: Hangup | None = None) -> Any:
    """Run ``main(stop)``; the first SIGINT/SIGTERM (and SIGHUP, unless ``on_hangup`` is given)
    sets ``stop``, a second one cancels. With ``on_hangup``, SIGHUP calls it on the loop
    instead (a config reload) and never stops."""
    raise_open_file_limit()
    enable_crash_tracebacks()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(_with_signals(main, on_hangup))


async def _with_signals(main: Main, on_hangup: Hangup | None = None) -> Any:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.current_task()
    assert task is not None

    def on_signal() -> None:
        if stop.is_set():
            task.cancel("second signal: stopping now")
        else:
            stop.set()

    stopping = [s for s in STOP_SIGNALS if on_hangup is None or s != signal.SIGHUP]
    for sig in stopping:
        loop.add_signal_handler(sig, on_signal)
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    try:
        return await main(stop)
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


def dump_tasks() -> None:
    """SIGUSR1: log every task and where it waits (for a gateway that seems stuck), down the
    whole chain of awaits: a task's own stack shows only its outermost coroutine."""
    for task in asyncio.all_tasks():
        log.warning("task %s:\n%s", task.get_name(), "\n".join(await_chain(task)))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def child_process_options() -> dict[str, Any]:
    """How fieldgate starts helper processes (broker, simulator, gateway under the demo).

    A session of their own, so a Ctrl-C at the terminal reaches only the owner, which stops
    them in the right order (the gateway must flush while the hub still runs); and, on Linux,
    SIGTERM when the owner dies, so that a killed owner leaves no orphans behind.
    """
    return {"start_new_session": True, "preexec_fn": _die_with_parent}
