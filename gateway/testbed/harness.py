"""The one harness that starts a hub, simulators and a gateway: used by the demo, the load
test, ``benchmarks/e2e.py`` and the tests' fixtures.

What they share: free ports (:func:`free_ports`), the command lines (``fieldgate ...``, the hub
stand-in's), starting a ``fieldgate`` child whose output goes to a log, waiting for its "ready"
line or file, and stopping children by PID in the reverse order of their start (the gateway
before the devices and the hub, so it can flush). Two flavours: :class:`Proc` for synchronous
callers (tests, benchmarks) and :func:`spawn` / :func:`stop` / :func:`wait_for_file` for the
asyncio tools (demo, load test). Each caller keeps its own choices (which verbs, which logs,
how long to wait).
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from adapters.modbus.sim.run import simulator_argv
from gateway import runtime
from gateway.testbed.ports import free_ports

__all__ = [
    "Proc",
    "fieldgate",
    "free_ports",
    "hub_argv",
    "modbus_load_argv",
    "spawn",
    "stop",
    "stop_all",
    "wait_for_file",
]

# The lines (or files) that say a child is ready.
HUB_READY = "local hub listening"
MODBUS_READY = "simulated Modbus devices on"
BLE_READY = "simulated BLE peripherals"


def fieldgate(*args: str) -> list[str]:
    """The command line of ``fieldgate ARGS``, with this interpreter (no installed script
    needed)."""
    return [sys.executable, "-m", "gateway.cli", *args]


def hub_argv(
    pki_dir: Path,
    port: int,
    record: Path,
    *extra: str,
    broker_log: Path | None = None,
    quiet: bool = True,
) -> list[str]:
    """``fieldgate`` arguments for a hub stand-in that records every message it receives."""
    return [
        "localhub",
        "--pki",
        str(pki_dir),
        "--port",
        str(port),
        "--record",
        str(record),
        *(("--broker-log", str(broker_log)) if broker_log is not None else ()),
        *(("--quiet",) if quiet else ()),
        *extra,
    ]


def modbus_load_argv(
    *,
    devices: int,
    config: Path,
    pki: Path,
    hub_port: int,
    state_dir: Path,
    points: int,
    types: str,
    rate: float,
    max_age: float | None = None,
) -> list[str]:
    """``fieldgate simulate modbus`` arguments for a measured fleet (the load test and the
    benchmarks): ``devices`` on free ports, ``points`` of ``types`` polled ``rate`` times a
    second, values changing every 0.1 s so every poll reads news."""
    return simulator_argv(
        devices=devices,
        port=free_ports(devices),
        config=config,
        pki=pki,
        hub_port=hub_port,
        state_dir=state_dir,
        extra=(
            "--points",
            str(points),
            "--types",
            types,
            "--period",
            str(1 / rate),
            *(("--max-age", str(max_age)) if max_age is not None else ()),
            "--step",
            "0.1",
        ),
    )


# -- synchronous: tests and benchmarks --------------------------------------------------------


class Proc:
    """A child process whose output goes to a file; stopped by its PID."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "wb")
        self.popen = subprocess.Popen(
            args,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first match of ``pattern`` in the output; AssertionError (with the output's
        tail) if it does not come within ``timeout`` or the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.popen.poll() is not None:
                break
            # Another process's log: nothing to wait on but the file itself.
            time.sleep(0.05)
        raise AssertionError(
            f"{pattern!r} not seen (exit {self.popen.poll()}):\n{self.output()[-3000:]}"
        )

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then up to ``timeout`` for the exit; then SIGKILL. Its exit code."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                # Ask it where it is stuck before killing it, so the failure explains itself.
                os.kill(self.pid, signal.SIGUSR1)
                time.sleep(1)
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()
        self._out.close()
        return self.popen.returncode


# -- asyncio: the demo and the load test ------------------------------------------------------


def machine() -> dict[str, object]:
    """What a report says of the machine it was measured on."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def start_logged(
    procs: list[Proc],
    folder: Path,
    name: str,
    argv: list[str],
    ready: str | None = None,
    timeout: float = 60,
) -> Proc:
    """``fieldgate ARGV`` logged to ``folder/NAME.log`` and kept in ``procs`` (stop them in
    reverse), once its output says ``ready`` (if given)."""
    proc = Proc(fieldgate(*argv), folder / f"{name}.log")
    procs.append(proc)
    if ready is not None:
        proc.wait_for(ready, timeout=timeout)
    return proc


async def spawn(args: Sequence[str], log: BinaryIO) -> asyncio.subprocess.Process:
    """``fieldgate ARGS`` as a helper process, its output into ``log``."""
    return await asyncio.create_subprocess_exec(
        *fieldgate(*args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        **runtime.child_process_options(),
    )


async def stop(proc: asyncio.subprocess.Process, grace: float, name: str | None = None) -> int:
    """SIGTERM, then up to ``grace`` seconds for the exit; then SIGKILL (said on stderr when the
    child has a ``name``). Its exit code (-1 if none)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await proc.wait()
        except TimeoutError:
            if name is not None:
                print(f"{name} did not stop in {grace:.0f} s; killing it", file=sys.stderr)
            proc.kill()
            await proc.wait()
    return proc.returncode if proc.returncode is not None else -1


async def stop_all(children: Sequence[asyncio.subprocess.Process], grace: float) -> None:
    """Stop ``children`` in the reverse order of their start."""
    for proc in reversed(children):
        await stop(proc, grace)


async def wait_for_file(
    path: Path, proc: asyncio.subprocess.Process, within: float, text: str | None = None
) -> None:
    """Until ``path`` exists (and holds ``text``, if given); RuntimeError if ``proc`` exits
    first or ``within`` seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not (path.exists() and (text is None or text in path.read_text(errors="replace"))):
        if proc.returncode is not None:
            raise RuntimeError(f"{path.name}: the process exited early; see its log")
        if loop.time() > deadline:
            what = path if text is None else f"{text!r} in {path}"
            raise RuntimeError(f"{what} not seen within {within:.0f} s")
        # Another process's file: nothing to wait on but the file itself.
        await asyncio.sleep(0.05)
