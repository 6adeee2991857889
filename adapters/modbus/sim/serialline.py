"""A serial cable for tests: a socat pty pair, one end for the simulator, one for the gateway.

``socat pty,raw,echo=0,link=A pty,raw,echo=0,link=B`` makes two pseudo-terminals and copies
bytes between them, as a null-modem cable would. Both ends are named by symlinks in a folder the
caller owns, so nothing depends on which /dev/pts numbers the kernel hands out. A pty has no
baud rate of its own (bytes cross it at once), which is why the simulated bus paces what it sends
(:mod:`adapters.modbus.sim.bus`).

socat is started as a child process, waited for until both ends exist, and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

READY = b"starting data transfer loop"


class SocatError(OSError):
    """socat is missing, or did not make the pty pair."""


class SerialLine:
    """``async with SerialLine(folder) as line``: ``line.device_end`` is the simulator's side,
    ``line.gateway_end`` the path a gateway (or pymodbus's serial client) opens."""

    def __init__(self, folder: Path, *, timeout: float = 10.0) -> None:
        self.folder = folder
        self.device_end = folder / "device"
        self.gateway_end = folder / "gateway"
        self.timeout = timeout
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._log = b""
        self._drain: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SerialLine:
        socat = shutil.which("socat")
        if socat is None:
            raise SocatError("socat is not installed (Debian: apt-get install socat)")
        self.folder.mkdir(parents=True, exist_ok=True)
        for end in (self.device_end, self.gateway_end):
            if end.is_symlink() or end.exists():
                raise SocatError(f"{end} exists: another serial line uses this folder")
        self._proc = await asyncio.create_subprocess_exec(
            socat,
            "-d",
            "-d",
            f"pty,raw,echo=0,link={self.device_end}",
            f"pty,raw,echo=0,link={self.gateway_end}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.pid = self._proc.pid
        try:
            await asyncio.wait_for(self._ready(), self.timeout)
        except BaseException as err:
            await self._stop()
            if isinstance(err, TimeoutError):
                said = self._log.decode(errors="replace").strip()
                raise SocatError(f"socat made no pty pair in {self.timeout:g} s: {said}") from None
            raise
        self._drain = asyncio.create_task(self._drain_log(), name=f"socat[{self.pid}]")
        return self

    async def _ready(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while READY not in self._log:
            line = await self._proc.stderr.readline()
            if not line:
                raise SocatError(f"socat exited: {self._log.decode(errors='replace').strip()}")
            self._log += line
        # socat makes the links before it says so; wait for both anyway (cheap, and it is the
        # thing a caller relies on).
        deadline = time.monotonic() + self.timeout
        while not (self.device_end.exists() and self.gateway_end.exists()):
            if time.monotonic() > deadline:
                raise SocatError(f"socat did not create {self.device_end} and {self.gateway_end}")
            await asyncio.sleep(0.01)

    async def _drain_log(self) -> None:
        """Keep reading socat's stderr so that it never blocks on a full pipe."""
        assert self._proc is not None and self._proc.stderr is not None
        while await self._proc.stderr.readline():
            pass

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            await asyncio.gather(self._drain, return_exceptions=True)
            self._drain = None
        for end in (self.device_end, self.gateway_end):
            with contextlib.suppress(FileNotFoundError):
                if end.is_symlink():
                    end.unlink()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()
