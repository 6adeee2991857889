"""systemd's notification protocol (sd_notify(3)), without a dependency.

One datagram per message on the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an
abstract name written with a leading ``@``). ``READY=1`` once the gateway runs, ``WATCHDOG=1``
every ``WATCHDOG_USEC / 2`` from the event loop itself (a stuck loop stops the pings, and systemd
restarts the service: the point of the watchdog), ``STOPPING=1`` when the stop begins. Outside
systemd (no ``$NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("fieldgate.ops")


def socket_address(value: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as :func:`socket.socket.sendto` takes it: ``@name`` is the abstract
    name ``\\0name``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises; None when no watchdog is asked for, or it is asked of another process
    (``WATCHDOG_PID``)."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000


class Notifier:
    """Sends to ``$NOTIFY_SOCKET``; a failed send is logged once and never stops the gateway
    (systemd going away must not take the service with it)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        target = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = socket_address(target) if target else None
        self.watchdog = watchdog_interval(env) if target else None
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, message: str) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self.address)
            self._failed = False
        except OSError as err:
            if not self._failed:
                log.warning("systemd notification %r not sent to $NOTIFY_SOCKET: %s", message, err)
                self._failed = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
